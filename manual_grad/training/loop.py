"""The training loop (nanoGPT's train.py), callable from Python: :func:`train` runs named stages

1. :func:`prepare`: every input checked before anything is written (the output folder, the
   checkpoint to resume or not to replace, the base of a fine-tune, the text, the tokenizer,
   the model config);
2. :func:`initial_state`: fresh or restored parameters, optimizer state, key and history;
3. :func:`compile_step`: the shared step, compiled ahead of the first step; on one device
   XLA's estimate of its memory is checked against the device's (:mod:`.memory`);
4. :class:`Loop`: steps, periodic eval and checkpoints, a stop at the first non-finite loss,
   and on Ctrl-C a checkpoint at the step reached (:class:`TrainingInterrupted`);
5. :func:`finish`: metrics JSON/CSV, the loss-curve PNG, the merged model, a sample.

A fresh run never replaces a valid checkpoint unless ``overwrite`` is set.

Batches and dropout keys are pure functions of ``(seed, step)``, so a resumed run computes
exactly what the straight run computes.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad import data as data_lib
from manual_grad import parallel
from manual_grad.checkpoint import (Checkpoint, CheckpointError, load_checkpoint, save_checkpoint, save_state,
                                    verify_checkpoint)
from manual_grad.config import GPTConfig
from manual_grad.generate import generate
from manual_grad.loading import CHECKPOINT, LORA_CHECKPOINT, checkpoint_path, load_base
from manual_grad.model import count_params, merge_lora
from manual_grad.paths import check_out_dir, path_errors
from manual_grad.training.host_memory import keep_host_memory
from manual_grad.training.memory import check_fits
from manual_grad.training.config import TrainConfig
from manual_grad.training.optimizer import make_optimizer, make_schedule
from manual_grad.training.reporting import Progress, plot_losses, write_metrics
from manual_grad.training.step import (fresh_params, init_adapters, init_state, make_eval_fn,
                                       train_step)

__all__ = ["train", "TrainResult", "TrainingInterrupted", "Run", "prepare", "initial_state", "compile_step", "Loop",
           "finish"]

# Keys: step s of training uses fold_in(root, s); these two streams sit above any step count.
_LORA_INIT_STREAM, _SAMPLE_STREAM = 2**32 - 1, 2**32 - 2


@dataclass
class TrainResult:
    """What :func:`train` returns: final params (the trainable tree), config, tokenizer, history."""
    params: Any
    cfg: GPTConfig
    tokenizer: Any
    history: dict
    out_dir: Path
    final_val_loss: float | None
    wall_time_s: float
    sample: str | None = None
    summary: dict = field(default_factory=dict)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which step was saved and how to resume."""


@dataclass
class Run:
    """What :func:`prepare` checked: the run's config, model, data and files."""
    tc: TrainConfig
    cfg: GPTConfig
    tokenizer: Any
    splits: dict
    block_size: int                      # the batches' context length
    ckpt_path: Path
    resumed: Checkpoint | None = None
    base: Any = None                     # the frozen base of a fine-tune
    base_record: dict | None = None


def train(tc: TrainConfig, *, log: TextIO | None = None, stdout: TextIO | None = None) -> TrainResult:
    """Runs training (or a LoRA fine-tune) as ``tc`` says; see the module docstring."""
    keep_host_memory()                   # before JAX starts its CPU threads: see host_memory
    log = sys.stderr if log is None else log
    stdout = sys.stdout if stdout is None else stdout
    progress = Progress(tc.max_iters, log)
    run = prepare(tc)
    state, root_key, history, elapsed_before, note = initial_state(run)
    progress.message(f"{note}; data: {tc.data or 'Python stdlib sources'} "
                     f"({len(run.splits['train']):,} train / {len(run.splits['val']):,} val tokens, "
                     f"{run.tokenizer.kind} tokenizer, V={run.cfg.vocab_size}); backend: {tc.backend}")
    progress.status("compiling the train step")
    state, step_fn, put_batch = compile_step(run, state)
    with path_errors("--out-dir", tc.out_dir):
        Path(tc.out_dir).mkdir(parents=True, exist_ok=True)
    loop = Loop(run, state, root_key, history, progress, elapsed_before)
    loop.run(step_fn, put_batch)
    return finish(run, loop, stdout)


def _check_replaceable(path: Path, overwrite: bool) -> None:
    """Refuses to replace a checkpoint that cannot be read (always) or a valid one (unless
    ``overwrite``): a fresh run never silently takes the place of a finished one."""
    if not path.exists():
        return
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; refusing to overwrite it: move it away or choose another --out-dir") from None
    if not overwrite:
        raise CheckpointError(f"{str(path)!r} holds a run: continue it with --resume, replace it with --overwrite "
                              "(TrainConfig resume=True / overwrite=True), or choose another --out-dir")


def prepare(tc: TrainConfig) -> Run:
    """Stage 1: checks every input (nothing is written) and builds the model config and the data."""
    out_dir = check_out_dir("--out-dir", tc.out_dir)
    ckpt_path = out_dir / (LORA_CHECKPOINT if tc.finetune else CHECKPOINT)
    resumed = load_checkpoint(ckpt_path) if tc.resume else None
    if resumed is None:
        _check_replaceable(ckpt_path, tc.overwrite)
    if tc.merge:
        _check_replaceable(out_dir / CHECKPOINT, tc.overwrite or tc.resume)
    base = base_record = None
    if tc.finetune:
        if tc.init_from is not None:
            base_path = checkpoint_path(tc.init_from)
            if base_path.resolve() in (ckpt_path.resolve(), (out_dir / CHECKPOINT).resolve()):
                raise ValueError("out_dir must differ from init_from: the base checkpoint is never overwritten")
            base_record = {"init_from": str(base_path), "sha256": verify_checkpoint(base_path)}
        else:
            base_record = {"from_hf": str(tc.from_hf)}
        with path_errors("--init-from" if tc.init_from is not None else "--from-hf", tc.init_from or tc.from_hf):
            base, base_cfg, tokenizer = load_base(base_record)
        block_size = tc.model.get("block_size", base_cfg.block_size)
        if block_size > base_cfg.block_size:
            raise ValueError(f"block_size={block_size} exceeds the base model's block_size={base_cfg.block_size}")
        cfg = tc.finetune_config(base_cfg)
    with path_errors("--data", tc.data):
        text = data_lib.load_text(tc.data) if tc.data is not None else data_lib.stdlib_corpus(tc.max_chars)
    if not tc.finetune:
        with path_errors("--bpe-dir", tc.bpe_dir):
            tokenizer = (data_lib.tokenizer_from_dict(resumed.meta["tokenizer"]) if resumed is not None
                         else data_lib.make_tokenizer(tc.tokenizer, text, bpe_dir=tc.bpe_dir))
        cfg = tc.model_config(tokenizer.vocab_size)
        block_size = cfg.block_size
    splits = data_lib.split_tokens(_encode(tokenizer, text, tc), tc.val_fraction)
    data_lib.check_block_size(splits, block_size)
    ours = json.loads(json.dumps(cfg.to_dict()))            # as stored: tuples become lists
    if resumed is not None and resumed.meta["model_config"] != ours:
        theirs = resumed.meta["model_config"]
        diffs = [f"{k}={theirs.get(k)!r} in the checkpoint, {v!r} now" for k, v in ours.items()
                 if theirs.get(k) != v]
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r} is from another config: {'; '.join(diffs)}")
    return Run(tc, cfg, tokenizer, splits, block_size, ckpt_path, resumed, base, base_record)


def _encode(tokenizer, text: str, tc: TrainConfig):
    """The text's ids; a fine-tune's text outside its base's vocabulary says what to do."""
    try:
        return tokenizer.encode(text)
    except ValueError as e:
        if not tc.finetune:
            raise
        raise ValueError(f"{e}: the base's tokenizer fixes the vocabulary; fine-tune on text it covers, or "
                         "train a new base that covers any text (manual-grad train --tokenizer byte)") from None


def initial_state(run: Run):
    """Stage 2: ``(state, root_key, history, elapsed_before, note)``, fresh or restored."""
    tc, cfg, base = run.tc, run.cfg, run.base
    root_key = jax.random.key(tc.seed)
    if base is not None:
        trainable = init_adapters(base, jax.random.fold_in(root_key, _LORA_INIT_STREAM), cfg)
        note = (f"LoRA fine-tune: {count_params(trainable):,} trainable parameters "
                f"(rank {tc.lora.rank}, targets {','.join(tc.lora.targets)}); {count_params(base):,} frozen")
    else:
        trainable = fresh_params(cfg, root_key)
        note = f"model: {count_params(trainable):,} parameters"
    state = init_state(trainable, make_optimizer(tc.optim))
    if run.resumed is None:
        return state, root_key, {"train": [], "eval": []}, 0.0, note
    resumed = run.resumed
    state = {"params": resumed.restore("params", trainable), "opt_state": resumed.restore("opt_state", state["opt_state"]),
             "step": jnp.int32(resumed.meta["step"])}
    root_key = jax.random.wrap_key_data(jnp.asarray(resumed.array("rng/root")))
    return state, root_key, resumed.meta["metrics"], resumed.meta.get("elapsed_s", 0.0), note


def compile_step(run: Run, state):
    """Stage 3: ``(state, step_fn, put_batch)``: the shared step, sharded when ``tc.mesh`` is set."""
    tc, cfg, base = run.tc, run.cfg, run.base
    optimizer = make_optimizer(tc.optim)
    if tc.mesh is None:
        step = jax.jit(lambda frozen, s, b, k: train_step(s, b, k, cfg=cfg, optimizer=optimizer,
                                                           backend=tc.backend, frozen=frozen))
        ids = jax.ShapeDtypeStruct((tc.batch_size, run.block_size), jnp.int32)
        compiled = step.lower(base, state, (ids, ids), jax.random.key(0)).compile()
        check_fits(compiled)
        return state, lambda s, b, k: compiled(base, s, b, k), lambda batch: batch
    mesh = parallel.make_mesh(tc.mesh)
    n_data = mesh.shape[parallel.DATA_AXIS]
    if tc.batch_size % n_data:
        raise ValueError(f"batch_size={tc.batch_size} must be divisible by the mesh's data axis ({n_data})")
    shardings = parallel.state_shardings(state, mesh, tc.shard)
    state = parallel.shard_state(state, shardings)
    step = partial(train_step, cfg=cfg, optimizer=optimizer, backend=tc.backend, mesh=mesh)   # seq: ring attention
    if base is None:
        step_fn = parallel.jit_sharded_step(step, shardings, mesh)
    else:
        step_fn = parallel.jit_sharded_step(lambda frozen, s, b, k: step(s, b, k, frozen=frozen), shardings, mesh,
                                            frozen=base, frozen_shardings=parallel.state_shardings(base, mesh, tc.shard))
    return state, step_fn, lambda batch: parallel.shard_batch(batch, mesh, process_local=False)


class Loop:
    """Stage 4: the steps, with periodic eval, checkpoints and progress."""

    def __init__(self, run: Run, state, root_key, history: dict, progress: Progress, elapsed_before: float):
        self.run_, self.state, self.root_key, self.history = run, state, root_key, history
        self.progress, self.elapsed_before = progress, elapsed_before
        tc = run.tc
        self.eval_fn = make_eval_fn(run.cfg, tc.backend, frozen=run.base,
                                    mesh=parallel.make_mesh(tc.mesh) if tc.mesh else None)
        eval_spec = data_lib.BatchSpec(tc.seed + 1, tc.batch_size, run.block_size)
        self.eval_batches = {split: [np.stack(b) for b in zip(*(
            data_lib.get_batch(run.splits[split], eval_spec, split, i) for i in range(tc.eval_iters)))]
            for split in data_lib.SPLITS}
        self.start = int(state["step"])
        if self.start > tc.max_iters:
            raise ValueError(f"max_iters={tc.max_iters} is below the checkpoint's step {self.start}")
        self.last_saved = self.start if run.resumed is not None else None
        self.unchecked: list[tuple[int, dict]] = []      # (step, metrics) not yet read back from the device
        self.t0 = time.perf_counter()
        self.wall = 0.0

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def evaluate(self, step: int) -> dict:
        row = {"step": step, "elapsed_s": round(self.elapsed(), 3)}
        for split, (x, y) in self.eval_batches.items():
            row[split] = float(self.eval_fn(self.state["params"], x, y))
        self.history["eval"] = [e for e in self.history["eval"] if e["step"] != step] + [row]
        return row

    def save(self, step: int) -> None:
        run, tc = self.run_, self.run_.tc
        meta = {"kind": "lora" if tc.finetune else "full", "model_config": run.cfg.to_dict(),
                "train_config": tc.to_dict(), "tokenizer": run.tokenizer.to_dict(), "step": step,
                "data_position": {"seed": tc.seed, "step": step}, "metrics": self.history,
                "elapsed_s": self.elapsed(), "base": run.base_record}
        with path_errors("--out-dir", tc.out_dir):
            save_state(run.ckpt_path, meta, params=self.state["params"], opt_state=self.state["opt_state"],
                       rng={"root": jax.random.key_data(self.root_key)})
        self.last_saved = step

    def check_finite(self) -> None:
        """Stops at the first step whose loss or gradient norm is NaN or Inf, before its
        parameters can be evaluated or saved: the last checkpoint stays the last good one."""
        for s, m in self.unchecked:
            for name in ("loss", "grad_norm"):
                value = float(m[name])
                if not math.isfinite(value):
                    kept = (f"the last good checkpoint {self.run_.ckpt_path} (step {self.last_saved}) is kept: "
                            "continue from it with --resume (e.g. with a lower learning rate)"
                            if self.last_saved is not None else "no checkpoint was written")
                    raise FloatingPointError(f"non-finite {name} ({value}) at step {s}: training stopped; {kept}")
        self.unchecked.clear()

    def run(self, step_fn, put_batch) -> None:
        """The steps from the state's step to ``max_iters``; Ctrl-C saves the step reached."""
        run = self.run_
        if run.resumed is not None:
            self.progress.message(f"resuming from {run.ckpt_path} at step {self.start}")
        self.progress.start(self.start)
        try:
            self._steps(step_fn, put_batch)
        except KeyboardInterrupt:
            raise self._interrupted() from None
        self.wall = self.elapsed()

    def _steps(self, step_fn, put_batch) -> None:
        tc, run = self.run_.tc, self.run_
        spec = data_lib.BatchSpec(tc.seed, tc.batch_size, run.block_size)
        schedule = make_schedule(tc.optim)
        float(schedule(self.start)), jax.random.fold_in(self.root_key, self.start)   # their first calls compile:
        t_window, window_steps = time.perf_counter(), 0                              # not in the first tok/s
        for step in range(self.start, tc.max_iters + 1):
            if step % tc.eval_interval == 0 or step == tc.max_iters:
                self.check_finite()
                self.progress.status(f"evaluating at step {step} ({tc.eval_iters} batches per split)")
                row = self.evaluate(step)
                self.progress.message(f"step {step}: train loss {row['train']:.4f}, val loss {row['val']:.4f}")
                if step > self.start:
                    self.progress.status(f"saving {run.ckpt_path}")
                    self.save(step)
                t_window, window_steps = time.perf_counter(), 0
            if step == tc.max_iters:
                break
            x, y = data_lib.get_batch(run.splits["train"], spec, "train", step)
            self.state, metrics = step_fn(self.state, put_batch((jnp.asarray(x), jnp.asarray(y))),
                                          jax.random.fold_in(self.root_key, step))
            self.unchecked.append((step, metrics))
            window_steps += 1
            if step == self.start:     # the compiled step's first call pays one-off costs: not in tok/s or ETA
                jax.block_until_ready(metrics)
                t_window, window_steps = time.perf_counter(), 0
            if (step + 1) % tc.log_interval == 0 or step + 1 == tc.max_iters:
                self.check_finite()
                loss, lr = float(metrics["loss"]), float(schedule(step))
                self.history["train"].append([step, loss, lr, float(metrics["grad_norm"])])
                self.progress.update(step + 1, loss, lr, tokens=window_steps * tc.batch_size * run.block_size,
                                     seconds=time.perf_counter() - t_window, steps=window_steps)
                t_window, window_steps = time.perf_counter(), 0

    def _interrupted(self) -> TrainingInterrupted:
        """Saves the step reached (unless nothing changed since the last checkpoint, or a loss
        went non-finite) and says how to continue."""
        run, tc = self.run_, self.run_.tc
        with _sigint_ignored():
            self.check_finite()                   # a non-finite step is never saved
            step = int(self.state["step"])
            if step > (self.last_saved if self.last_saved is not None else 0):
                self.save(step)
        if self.last_saved is None:
            return TrainingInterrupted("stopped before the first step: nothing saved")
        again = (f"manual-grad train --resume --out-dir {tc.out_dir}" if not tc.finetune
                 else "the same finetune command with --resume")
        return TrainingInterrupted(f"checkpoint {run.ckpt_path} holds step {self.last_saved}; continue with: {again}")


@contextmanager
def _sigint_ignored():
    """A second Ctrl-C while the checkpoint is written waits until it is written (main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def finish(run: Run, loop: Loop, stdout) -> TrainResult:
    """Stage 5: metrics, plot, merged model, sample; the :class:`TrainResult`."""
    tc, cfg, tokenizer, out_dir, history = run.tc, run.cfg, run.tokenizer, Path(run.tc.out_dir), loop.history
    final = history["eval"][-1] if history["eval"] else {}
    summary = {"backend": tc.backend, "model_config": cfg.to_dict(), "train_config": tc.to_dict(),
               "parameters": count_params(loop.state["params"]), "wall_time_s": round(loop.wall, 2),
               "final_train_loss": final.get("train"), "final_val_loss": final.get("val"),
               "tokens_per_step": tc.batch_size * run.block_size}
    with path_errors("--out-dir", out_dir):
        write_metrics(out_dir, history, summary)
        plot_losses({tc.backend: history}, out_dir / "loss.png",
                    title=f"{Path(tc.data).name if tc.data else 'Python stdlib'}: "
                          f"{cfg.n_layer} layers x {cfg.n_embd}, {tc.backend} backend")
    full_params = loop.state["params"] if run.base is None else {**run.base, "lora": loop.state["params"]}
    if tc.merge:
        merged, merged_cfg = merge_lora(full_params, cfg)
        with path_errors("--out-dir", out_dir):
            save_checkpoint(out_dir / CHECKPOINT, {"kind": "full", "model_config": merged_cfg.to_dict(),
                                                   "tokenizer": tokenizer.to_dict(),
                                                   "merged_from": str(run.ckpt_path)}, params=merged)
        loop.progress.message(f"merged model written to {out_dir / CHECKPOINT}")
    loop.progress.message(f"done in {loop.wall:.1f}s; final val loss {final.get('val', float('nan')):.4f}; "
                          f"wrote {run.ckpt_path}, {out_dir / 'metrics.json'}, {out_dir / 'loss.png'}")
    text_sample = None
    if tc.sample_tokens > 0:
        prompt = tc.sample_prompt if tc.sample_prompt is not None else ("\n" if tc.data is not None else "def ")
        out = generate(full_params, cfg, _prompt_tokens(tokenizer, prompt), tc.sample_tokens,
                       key=jax.random.fold_in(loop.root_key, _SAMPLE_STREAM), temperature=0.8, top_k=200)
        text_sample = tokenizer.decode(np.asarray(out))
        stdout.write(f"--- sample ---\n{text_sample}\n")
        stdout.flush()
    return TrainResult(loop.state["params"], cfg, tokenizer, history, out_dir, final.get("val"), loop.wall,
                       text_sample, summary)


def _prompt_tokens(tokenizer, prompt: str) -> np.ndarray:
    """The prompt's ids; an empty prompt (or one the tokenizer cannot encode) starts from id 0."""
    try:
        ids = tokenizer.encode(prompt)
    except ValueError:
        ids = np.zeros(0, np.int32)
    return ids if len(ids) else np.zeros(1, np.int32)
