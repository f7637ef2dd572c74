"""Training: the optimizer, the jitted train step, evaluation and the loop (nanoGPT's train.py).

- :func:`make_optimizer`: AdamW with linear warmup then cosine decay to ``min_lr``
  (``lr_t = min_lr + ½ (1 + cos(π (t - warmup) / (decay - warmup))) (lr - min_lr)``),
  global-norm gradient clipping first, weight decay only on the matrices (per layer: the
  stacked (L, in, out) block weights count as 2-D), never on biases or LayerNorm.
- :func:`train_step` / :func:`make_train_step`: ``step(state, batch, key) -> (state, metrics)``,
  a pure function of ``state = {"params", "opt_state", "step"}``; with ``frozen`` (LoRA), the
  state's params are the adapters only, the base is an argument that is never differentiated
  and has no optimizer state.
- :func:`train`: the loop, callable from Python: periodic eval, progress on stderr, metrics
  JSON/CSV, a loss-curve PNG, checkpoints (params + optimizer state + data position + RNG +
  configs), exact ``resume``, LoRA fine-tuning of a trained checkpoint (``init_from`` or
  ``from_hf``), and a sample printed at the end.

Batches and dropout keys are pure functions of ``(seed, step)``, so a resumed run computes
exactly what the straight run computes.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from manual_grad import data as data_lib
from manual_grad import parallel
from manual_grad.checkpoint import (CheckpointError, load_checkpoint, restore_like, save_checkpoint,
                                    verify_checkpoint)
from manual_grad.config import LORA_TARGETS, GPTConfig, LoRAConfig
from manual_grad.generate import generate
from manual_grad.layers.lora import SCALE_CONVENTIONS
from manual_grad.model import BACKENDS, attach_lora, count_params, init_params, loss_fn, merge_lora

__all__ = ["TrainConfig", "TrainResult", "make_schedule", "make_optimizer", "decay_mask", "train_step",
           "make_train_step", "make_eval_fn", "train", "load_model", "load_hf", "plot_losses",
           "CHECKPOINT", "LORA_CHECKPOINT"]

CHECKPOINT = "ckpt.mgc"          # a full model (a training run, or a merged fine-tune)
LORA_CHECKPOINT = "lora.mgc"     # LoRA adapters (+ their optimizer state) on a recorded base
# Keys: step s of training uses fold_in(root, s); these two streams sit above any step count.
_LORA_INIT_STREAM, _SAMPLE_STREAM = 2**32 - 1, 2**32 - 2


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; field names follow nanoGPT's train.py."""
    # data and output
    out_dir: str = "out"
    data: str | None = None               # a UTF-8 text file; None: the Python stdlib corpus
    max_chars: int = data_lib.DEFAULT_MAX_CHARS   # cap of the stdlib corpus
    tokenizer: str = "char"               # "char" | "byte" | "gpt2" (needs bpe_dir)
    bpe_dir: str | None = None            # folder with GPT-2's vocab.json and merges.txt
    val_fraction: float = 0.1
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int | None = 64           # None in a fine-tune: the base model's
    dropout: float = 0.0
    bias: bool = True
    backend: str = "manual"               # "manual" (hand-written VJPs) | "autodiff"
    dtype: str = "float32"                # compute dtype; "bfloat16"/"float16" keep float32 parameters
    # optimisation
    batch_size: int = 12
    max_iters: int = 500
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 50
    lr_decay_iters: int | None = None     # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0                # 0: no clipping
    # evaluation, logging, sampling
    eval_interval: int = 100
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 1337
    resume: bool = False
    sample_tokens: int = 300              # printed after training; 0: none
    sample_prompt: str | None = None     # None: "def " on the stdlib corpus, a newline on a file
    # LoRA fine-tuning of a trained model (init_from: a run folder; from_hf: a GPT-2 folder)
    init_from: str | None = None
    from_hf: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    lora_convention: str = "alpha/rank"
    merge: bool = False                   # also write the merged model as ckpt.mgc
    # several devices (manual_grad.parallel): None = one device
    mesh: str | None = None               # "data=8", "data=-1" (all devices), "data=4,model=2"
    shard: str = "replicated"             # "replicated" (data parallel) | "fsdp"

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.mesh is not None:
            parallel.parse_mesh_spec(self.mesh)
        if self.shard not in parallel.MODES:
            raise ValueError(f"shard must be one of {parallel.MODES}, got {self.shard!r}")
        if self.lr_decay_iters is None:
            object.__setattr__(self, "lr_decay_iters", self.max_iters)
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_interval",
                    "eval_iters", "log_interval", "lr_decay_iters", "max_chars", "lora_rank")
        for name in positive:
            value = getattr(self, name)
            if name == "block_size" and value is None and self.finetune:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_iters", "warmup_iters", "sample_tokens", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("learning_rate", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.tokenizer not in data_lib.TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {data_lib.TOKENIZERS}, got {self.tokenizer!r}")
        if self.tokenizer == "gpt2" and self.bpe_dir is None and self.from_hf is None:
            raise ValueError("tokenizer 'gpt2' needs bpe_dir (a folder with vocab.json and merges.txt)")
        if self.init_from is not None and self.from_hf is not None:
            raise ValueError("init_from and from_hf are exclusive: fine-tune one base")
        if self.merge and not self.finetune:
            raise ValueError("merge applies to a LoRA fine-tune (init_from or from_hf)")
        if self.finetune:   # validates rank, alpha, targets and convention
            LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_targets, self.lora_convention)

    @property
    def finetune(self) -> bool:
        return self.init_from is not None or self.from_hf is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --- optimizer ---------------------------------------------------------------------------------

def make_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_iters``, then cosine decay to
    ``min_lr`` at ``lr_decay_iters``, then ``min_lr`` (nanoGPT's get_lr)."""
    warmup = min(tc.warmup_iters, tc.lr_decay_iters)
    decay = max(tc.lr_decay_iters - warmup, 1)
    min_lr = min(tc.min_lr, tc.learning_rate)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = tc.learning_rate * (count + 1) / (warmup + 1)
        ratio = jnp.clip((count - warmup) / decay, 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (tc.learning_rate - min_lr)
        return jnp.where(count < warmup, warm, cosine)

    return schedule


def decay_mask(params) -> Any:
    """True for the matrices (weights and LoRA factors), False for biases and LayerNorm.

    A leaf is a matrix when it has 2 dims per layer: block parameters carry a leading layer
    axis L, so (L, C, 3C) is a matrix and (L, C) a bias.
    """
    def is_matrix(path, leaf):
        stacked = any(getattr(k, "key", None) == "blocks" for k in path)
        return leaf.ndim - int(stacked) >= 2
    return jax.tree_util.tree_map_with_path(is_matrix, params)


OPTIMIZER_FIELDS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "beta1",
                    "beta2", "grad_clip")


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on :func:`decay_mask` leaves).

    Equal settings give the same optimizer object, so runs that share them (a run and its
    resumption) share compiled steps.
    """
    return _optimizer(tuple(getattr(tc, name) for name in OPTIMIZER_FIELDS))


@lru_cache(maxsize=16)
def _optimizer(settings: tuple) -> optax.GradientTransformation:
    tc = TrainConfig(**dict(zip(OPTIMIZER_FIELDS, settings)))
    adamw = optax.adamw(make_schedule(tc), b1=tc.beta1, b2=tc.beta2, weight_decay=tc.weight_decay,
                        mask=decay_mask)
    clip = optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


# --- the step ----------------------------------------------------------------------------------

def train_step(state, batch, key, *, cfg: GPTConfig, optimizer, backend: str, frozen=None):
    """One AdamW step on the batch ``(inputs, targets)`` (B, T): pure, jit- and shard-friendly.

    ``state = {"params": trainable, "opt_state": ..., "step": int32}``. With ``frozen`` (the
    base parameters of a LoRA fine-tune) the trainable tree is ``params["lora"]`` and the
    gradient is taken with respect to it alone. ``key`` drives dropout (used when
    ``cfg.dropout > 0``). Metrics: ``loss`` (before the step) and ``grad_norm`` (before clipping).
    """
    inputs, targets = batch
    dropout_key = key if cfg.dropout > 0 else None

    def loss_of(trainable):
        params = trainable if frozen is None else {**frozen, "lora": trainable}
        return loss_fn(params, inputs, targets, cfg, backend, dropout_key=dropout_key)

    loss, grads = jax.value_and_grad(loss_of)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    return new_state, {"loss": loss, "grad_norm": grad_norm}


def make_train_step(cfg: GPTConfig, optimizer, backend: str = "manual", *, frozen=None) -> Callable:
    """``jax.jit`` of :func:`train_step`: ``step(state, batch, key) -> (state, metrics)``.

    ``frozen`` is passed to the compiled function as an argument (not baked in as a constant).
    """
    jitted = _jitted_step(cfg, optimizer, backend)
    return lambda state, batch, key: jitted(frozen, state, batch, key)


@lru_cache(maxsize=16)
def _jitted_step(cfg: GPTConfig, optimizer, backend: str):
    return jax.jit(lambda frozen, state, batch, key: train_step(
        state, batch, key, cfg=cfg, optimizer=optimizer, backend=backend, frozen=frozen))


def make_eval_fn(cfg: GPTConfig, backend: str = "manual", *, frozen=None) -> Callable:
    """``eval(trainable, inputs, targets) -> mean loss`` over stacked batches (N, B, T), no dropout."""
    jitted = _jitted_eval(cfg, backend)
    return lambda trainable, inputs, targets: jitted(frozen, trainable, inputs, targets)


@lru_cache(maxsize=16)
def _jitted_eval(cfg: GPTConfig, backend: str):
    @jax.jit
    def evaluate(frozen, trainable, inputs, targets):
        params = trainable if frozen is None else {**frozen, "lora": trainable}
        losses = jax.lax.map(lambda xy: loss_fn(params, xy[0], xy[1], cfg, backend), (inputs, targets))
        return losses.mean()
    return evaluate


_init_params = jax.jit(init_params, static_argnums=0)
_init_adapters = jax.jit(lambda base, key, cfg: attach_lora(base, cfg, key)["lora"], static_argnums=2)


@lru_cache(maxsize=16)
def _jitted_init(optimizer):
    return jax.jit(optimizer.init)


# --- loading models ------------------------------------------------------------------------------

def _checkpoint_path(path, name=CHECKPOINT) -> Path:
    path = Path(path)
    return path / name if path.is_dir() else path


def _params_like(ckpt, cfg: GPTConfig, *, lora_only: bool):
    """The checkpoint's params, checked path by path against the shapes ``cfg`` implies."""
    template = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    template = template["lora"] if lora_only else template
    return restore_like(template, ckpt.flat("params"), what="params")


def load_model(path) -> tuple[dict, GPTConfig, Any]:
    """``(params, cfg, tokenizer)`` of a run folder or checkpoint file: a full model, or a LoRA
    fine-tune (its adapters attached to its recorded, checksum-verified base). A folder holding
    both a merged ``ckpt.mgc`` and ``lora.mgc`` gives the merged model."""
    path = Path(path)
    if path.is_dir():
        path = path / (LORA_CHECKPOINT if (path / LORA_CHECKPOINT).is_file()
                       and not (path / CHECKPOINT).is_file() else CHECKPOINT)
    ckpt = load_checkpoint(path)
    try:
        cfg = GPTConfig.from_dict(ckpt.meta["model_config"])
        if ckpt.meta.get("kind") == "lora":
            base, _, tokenizer = _load_base(ckpt.meta["base"])
            return {**base, "lora": _params_like(ckpt, cfg, lora_only=True)}, cfg, tokenizer
        tokenizer = data_lib.tokenizer_from_dict(ckpt.meta["tokenizer"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks model metadata ({e})") from None
    return _params_like(ckpt, cfg, lora_only=False), cfg, tokenizer


def load_hf(path):
    from manual_grad.interop import load_gpt2          # optional: needs the interop extra
    params, cfg = load_gpt2(path)
    return params, cfg, data_lib.BPETokenizer.from_dir(path)


def _load_base(record: dict):
    """The frozen base of a fine-tune: ``(params, cfg, tokenizer)``, checked against ``record``."""
    if record.get("from_hf"):
        return load_hf(record["from_hf"])
    path = _checkpoint_path(record["init_from"])
    digest = verify_checkpoint(path)
    if record.get("sha256") and digest != record["sha256"]:
        raise CheckpointError(f"base checkpoint {str(path)!r} changed since the adapters were trained "
                              "(sha256 differs): the adapters belong to another model")
    params, cfg, tokenizer = load_model(path)
    if "lora" in params:
        raise CheckpointError(f"base {str(path)!r} is itself a LoRA fine-tune: merge it first (--merge)")
    return params, cfg, tokenizer


# --- progress, metrics and plots --------------------------------------------------------------------

class Progress:
    """A one-line progress bar on a terminal (``\\r``), plain log lines otherwise."""

    def __init__(self, total: int, stream, width: int = 24):
        self.total, self.stream, self.width = max(total, 1), stream, width
        self.live = hasattr(stream, "isatty") and stream.isatty()

    def update(self, step: int, text: str) -> None:
        filled = int(self.width * step / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] {text}"
        self.stream.write(("\r" + line + "\033[K") if self.live else line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
        self.stream.flush()


def _write_metrics(out_dir: Path, history: dict, summary: dict) -> None:
    (out_dir / "metrics.json").write_text(json.dumps({**summary, **history}, indent=1))
    evals = {e["step"]: e for e in history["eval"]}
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train_loss", "lr", "grad_norm", "eval_train_loss", "eval_val_loss", "elapsed_s"])
        steps = sorted({row[0] for row in history["train"]} | set(evals))
        rows = {row[0]: row for row in history["train"]}
        for s in steps:
            _, loss, lr, norm = rows.get(s, (s, "", "", ""))
            e = evals.get(s, {})
            writer.writerow([s, loss, lr, norm, e.get("train", ""), e.get("val", ""), e.get("elapsed_s", "")])


def plot_losses(runs: dict[str, dict], path, title: str = "") -> None:
    """Loss curves of one or more runs (label -> metrics history) into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, history) in enumerate(runs.items()):
        color = f"C{i}"
        if history["train"]:
            steps, losses = zip(*((row[0], row[1]) for row in history["train"]))
            ax.plot(steps, losses, color=color, alpha=0.3, lw=0.8, label=f"{label} train (batch)")
        if history["eval"]:
            steps = [e["step"] for e in history["eval"]]
            ax.plot(steps, [e["val"] for e in history["eval"]], marker="o", ls=("-", "--", ":")[i % 3], color=color,
                    ms=3 + 2 * (i == 0), label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the loop --------------------------------------------------------------------------------------

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


def _check_writable(path: Path) -> None:
    """Refuses to overwrite a checkpoint that exists but cannot be read."""
    if path.exists():
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; refusing to overwrite it: move it away or choose another --out-dir") from None


def _corpus(tc: TrainConfig) -> str:
    return data_lib.load_text(tc.data) if tc.data is not None else data_lib.stdlib_corpus(tc.max_chars)


def train(tc: TrainConfig, *, log=None, stdout=None) -> TrainResult:
    """Runs training (or a LoRA fine-tune) as ``tc`` says; see the module docstring."""
    log = sys.stderr if log is None else log
    stdout = sys.stdout if stdout is None else stdout
    out_dir = Path(tc.out_dir)
    ckpt_path = out_dir / (LORA_CHECKPOINT if tc.finetune else CHECKPOINT)

    # 1. Nothing is written before every input has been checked.
    resumed = None
    if tc.resume:
        resumed = load_checkpoint(ckpt_path)
    else:
        _check_writable(ckpt_path)
    if tc.merge:
        _check_writable(out_dir / CHECKPOINT)

    base, base_record = None, None
    if tc.finetune:
        if tc.init_from is not None:
            base_path = _checkpoint_path(tc.init_from)
            if base_path.resolve() in (ckpt_path.resolve(), (out_dir / CHECKPOINT).resolve()):
                raise ValueError("out_dir must differ from init_from: the base checkpoint is never overwritten")
            base_record = {"init_from": str(base_path), "sha256": verify_checkpoint(base_path)}
        else:
            base_record = {"from_hf": str(tc.from_hf)}
        base, base_cfg, tokenizer = _load_base(base_record)
        block_size = tc.block_size or base_cfg.block_size
        if block_size > base_cfg.block_size:
            raise ValueError(f"block_size={block_size} exceeds the base model's block_size={base_cfg.block_size}")
        cfg = base_cfg.replace(dropout=tc.dropout, lora=LoRAConfig(tc.lora_rank, tc.lora_alpha, tc.lora_targets,
                                                                      tc.lora_convention))
    text = _corpus(tc)
    if not tc.finetune:
        block_size = tc.block_size
        tokenizer = (data_lib.tokenizer_from_dict(resumed.meta["tokenizer"]) if resumed is not None
                     else data_lib.make_tokenizer(tc.tokenizer, text, bpe_dir=tc.bpe_dir))
        cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=tc.n_layer,
                        n_head=tc.n_head, n_embd=tc.n_embd, dropout=tc.dropout, bias=tc.bias,
                        dtype=tc.dtype)
    tokens = tokenizer.encode(text)
    splits = data_lib.split_tokens(tokens, tc.val_fraction)
    data_lib.check_block_size(splits, block_size)
    ours = json.loads(json.dumps(cfg.to_dict()))            # as stored: tuples become lists
    if resumed is not None and resumed.meta["model_config"] != ours:
        theirs = resumed.meta["model_config"]
        diffs = [f"{k}={theirs.get(k)!r} in the checkpoint, {v!r} now" for k, v in ours.items()
                 if theirs.get(k) != v]
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r} is from another config: {'; '.join(diffs)}")

    # 2. State: fresh or restored.
    root_key = jax.random.key(tc.seed)
    optimizer = make_optimizer(tc)
    if tc.finetune:
        trainable = _init_adapters(base, jax.random.fold_in(root_key, _LORA_INIT_STREAM), cfg)
        progress_note = (f"LoRA fine-tune: {count_params(trainable):,} trainable parameters "
                         f"(rank {tc.lora_rank}, targets {','.join(tc.lora_targets)}); "
                         f"{count_params(base):,} frozen")
    else:
        trainable = _init_params(cfg, root_key)
        progress_note = f"model: {count_params(trainable):,} parameters"
    state = {"params": trainable, "opt_state": _jitted_init(optimizer)(trainable), "step": jnp.int32(0)}
    history = {"train": [], "eval": []}
    elapsed_before = 0.0
    if resumed is not None:
        state = {"params": restore_like(trainable, resumed.flat("params"), "params"),
                 "opt_state": restore_like(state["opt_state"], resumed.flat("opt_state"), "opt_state"),
                 "step": jnp.int32(resumed.meta["step"])}
        root_key = jax.random.wrap_key_data(jnp.asarray(resumed.array("rng/root")))
        history = resumed.meta["metrics"]
        elapsed_before = resumed.meta.get("elapsed_s", 0.0)

    step_fn = make_train_step(cfg, optimizer, tc.backend, frozen=base)
    put_batch = lambda batch: batch
    if tc.mesh is not None:
        mesh = parallel.make_mesh(tc.mesh)
        n_data = mesh.shape[parallel.DATA_AXIS]
        if tc.batch_size % n_data:
            raise ValueError(f"batch_size={tc.batch_size} must be divisible by the mesh's data axis ({n_data})")
        shardings = parallel.state_shardings(state, mesh, tc.shard)
        state = parallel.shard_state(state, shardings)
        if base is None:
            step_fn = parallel.jit_sharded_step(
                partial(train_step, cfg=cfg, optimizer=optimizer, backend=tc.backend), shardings, mesh)
        else:
            step_fn = parallel.jit_sharded_step(
                lambda frozen, s, b, k: train_step(s, b, k, cfg=cfg, optimizer=optimizer,
                                                   backend=tc.backend, frozen=frozen),
                shardings, mesh, frozen=base,
                frozen_shardings=parallel.state_shardings(base, mesh, tc.shard))
        put_batch = lambda batch: parallel.shard_batch(batch, mesh, process_local=False)
    eval_fn = make_eval_fn(cfg, tc.backend, frozen=base)
    spec = data_lib.BatchSpec(tc.seed, tc.batch_size, block_size)
    eval_spec = data_lib.BatchSpec(tc.seed + 1, tc.batch_size, block_size)
    eval_batches = {split: [np.stack(b) for b in zip(*(data_lib.get_batch(splits[split], eval_spec, split, i)
                                                       for i in range(tc.eval_iters)))]
                    for split in data_lib.SPLITS}
    schedule = make_schedule(tc)

    def evaluate(step: int, elapsed: float) -> dict:
        row = {"step": step, "elapsed_s": round(elapsed, 3)}
        for split, (x, y) in eval_batches.items():
            row[split] = float(eval_fn(state["params"], x, y))
        history["eval"] = [e for e in history["eval"] if e["step"] != step] + [row]
        return row

    def save(step: int, elapsed: float) -> None:
        meta = {"kind": "lora" if tc.finetune else "full", "model_config": cfg.to_dict(),
                "train_config": tc.to_dict(), "tokenizer": tokenizer.to_dict(), "step": step,
                "data_position": {"seed": tc.seed, "step": step}, "metrics": history,
                "elapsed_s": elapsed, "base": base_record}
        host = parallel.gather_to_host({"params": state["params"], "opt_state": state["opt_state"]})
        if jax.process_index() == 0:
            save_checkpoint(ckpt_path, meta, **host, rng={"root": root_key})

    start = int(state["step"])
    if start > tc.max_iters:
        raise ValueError(f"max_iters={tc.max_iters} is below the checkpoint's step {start}")
    progress = Progress(tc.max_iters, log)
    progress.message(f"{progress_note}; data: {tc.data or 'Python stdlib sources'} "
                     f"({len(splits['train']):,} train / {len(splits['val']):,} val tokens, "
                     f"{tokenizer.kind} tokenizer, V={cfg.vocab_size}); backend: {tc.backend}")
    if resumed is not None:
        progress.message(f"resuming from {ckpt_path} at step {start}")
    t0, t_window, window_steps = time.perf_counter(), time.perf_counter(), 0
    out_dir.mkdir(parents=True, exist_ok=True)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    unchecked: list[tuple[int, dict]] = []       # (step, metrics) not yet read back from the device
    last_saved = start if resumed is not None else None

    def check_finite() -> None:
        """Stops at the first step whose loss or gradient norm is NaN or Inf, before its
        parameters can be evaluated or saved: the last checkpoint stays the last good one."""
        for s, m in unchecked:
            for name in ("loss", "grad_norm"):
                value = float(m[name])
                if not math.isfinite(value):
                    kept = (f"the last good checkpoint {ckpt_path} (step {last_saved}) is kept: continue "
                            "from it with --resume (e.g. with a lower learning rate)" if last_saved is not None
                            else "no checkpoint was written")
                    raise FloatingPointError(f"non-finite {name} ({value}) at step {s}: training stopped; {kept}")
        unchecked.clear()

    for step in range(start, tc.max_iters + 1):
        if step % tc.eval_interval == 0 or step == tc.max_iters:
            check_finite()
            row = evaluate(step, elapsed())
            progress.message(f"step {step}: train loss {row['train']:.4f}, val loss {row['val']:.4f}")
            if step > start:
                save(step, elapsed())
                last_saved = step
            t_window, window_steps = time.perf_counter(), 0
        if step == tc.max_iters:
            break
        x, y = data_lib.get_batch(splits["train"], spec, "train", step)
        state, metrics = step_fn(state, put_batch((jnp.asarray(x), jnp.asarray(y))),
                                 jax.random.fold_in(root_key, step))
        unchecked.append((step, metrics))
        window_steps += 1
        if (step + 1) % tc.log_interval == 0 or step + 1 == tc.max_iters:
            check_finite()
            loss = float(metrics["loss"])
            history["train"].append([step, loss, float(schedule(step)), float(metrics["grad_norm"])])
            rate = window_steps * tc.batch_size * block_size / max(time.perf_counter() - t_window, 1e-9)
            progress.update(step + 1, f"loss {loss:.4f} | {rate:,.0f} tok/s")
            t_window, window_steps = time.perf_counter(), 0
    wall = elapsed()

    # 3. Outputs: metrics, plot, merged model, sample.
    final = history["eval"][-1] if history["eval"] else {}
    summary = {"backend": tc.backend, "model_config": cfg.to_dict(), "train_config": tc.to_dict(),
               "parameters": count_params(state["params"]), "wall_time_s": round(wall, 2),
               "final_train_loss": final.get("train"), "final_val_loss": final.get("val"),
               "tokens_per_step": tc.batch_size * block_size}
    _write_metrics(out_dir, history, summary)
    plot_losses({tc.backend: history}, out_dir / "loss.png",
                title=f"{Path(tc.data).name if tc.data else 'Python stdlib'}: "
                      f"{cfg.n_layer} layers x {cfg.n_embd}, {tc.backend} backend")
    full_params = state["params"] if base is None else {**base, "lora": state["params"]}
    if tc.merge:
        merged, merged_cfg = merge_lora(full_params, cfg)
        save_checkpoint(out_dir / CHECKPOINT, {"kind": "full", "model_config": merged_cfg.to_dict(),
                                               "tokenizer": tokenizer.to_dict(), "merged_from": str(ckpt_path)},
                        params=merged)
        progress.message(f"merged model written to {out_dir / CHECKPOINT}")
    progress.message(f"done in {wall:.1f}s; final val loss {final.get('val', float('nan')):.4f}; "
                     f"wrote {ckpt_path}, {out_dir / 'metrics.json'}, {out_dir / 'loss.png'}")
    text_sample = None
    if tc.sample_tokens > 0:
        default_prompt = "\n" if tc.data is not None else "def "
        prompt = _prompt_tokens(tokenizer, tc.sample_prompt if tc.sample_prompt is not None else default_prompt)
        out = generate(full_params, cfg, prompt, tc.sample_tokens, key=jax.random.fold_in(root_key, _SAMPLE_STREAM),
                       temperature=0.8, top_k=200)
        text_sample = tokenizer.decode(np.asarray(out))
        stdout.write(f"--- sample ---\n{text_sample}\n")
        stdout.flush()
    return TrainResult(state["params"], cfg, tokenizer, history, out_dir, final.get("val"), wall,
                       text_sample, summary)


def _prompt_tokens(tokenizer, prompt: str) -> np.ndarray:
    """The prompt's ids; an empty prompt (or one the tokenizer cannot encode) starts from id 0."""
    try:
        ids = tokenizer.encode(prompt)
    except ValueError:
        ids = np.zeros(0, np.int32)
    return ids if len(ids) else np.zeros(1, np.int32)
