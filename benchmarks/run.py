"""Benchmark entry point: manual vs autodiff gradients, per layer and for the whole
training step, against PyTorch eager and ``torch.compile``.

    python -m benchmarks.run                  # the full CPU tables (~15 min on 2 cores)
    python -m benchmarks.run --quick          # a smoke run (~1 min)
    python -m benchmarks.run --device gpu --dtype bfloat16
    python -m benchmarks.run --set some_field=value   # benchmark a GPTConfig variant

Writes ``<out>/<device-slug>/results.json`` (every figure), ``results.md`` (tables) and
PNG plots. Manual and autodiff (and the PyTorch peers) run on the same inputs in the same
process, interleaved, so the ratios are robust to machine drift.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hardware
from benchmarks.compiled import compile_timed, hlo_census, memory_bytes, saved_residuals
from benchmarks.layer_cases import layer_cases
from benchmarks.timing import ratio, summarise, time_interleaved
from benchmarks.train_step import (OPTIMIZER, bench_config, make_optimizer, make_train_step, random_batch,
                                   train_flops_per_token)
from manual_grad import GPTConfig, count_params, init_params

__all__ = ["main", "Plan", "make_plan", "bench_config", "parse_overrides"]

BACKENDS = ("manual", "autodiff")
SCHEMA_VERSION = 1


@dataclass
class Plan:
    """What one run measures."""
    quick: bool
    platform: str
    dtype: str
    seq_lens: tuple[int, ...]
    batch: dict[str, int]                     # preset -> B of the training step
    repeats: dict[str, int]                   # preset -> timed rounds of the training step
    layer_shapes: list[tuple[str, int, int, int]]   # (preset, B, T, repeats)
    torch_eager: bool
    torch_compile_presets: tuple[str, ...]
    gpu_peak: bool
    overrides: dict = field(default_factory=dict)
    warmup: int = 1
    threads: int | None = None                # None: every core

    @property
    def presets(self) -> tuple[str, ...]:
        return tuple(self.batch)


def make_plan(args) -> Plan:
    """The default plan for ``--quick``, CPU or GPU, narrowed by the command-line options."""
    gpu = args.platform != "cpu"
    if args.quick:
        plan = Plan(True, args.platform, args.dtype, (16, 32), {"tiny": 4}, {"tiny": 3},
                    [("tiny", 2, 16, 3)], True, (), gpu)
    elif gpu:
        plan = Plan(False, args.platform, args.dtype, (128, 256, 512, 1024),
                    {"tiny": 64, "shakespeare-char": 64, "gpt2": 8},
                    {"tiny": 20, "shakespeare-char": 10, "gpt2": 10},
                    [("shakespeare-char", 64, 256, 20), ("gpt2", 8, 1024, 10)], True,
                    ("tiny", "shakespeare-char", "gpt2"), True)
    else:
        # Sized for 2 CPU cores (about 10-14 min): gpt2 runs at batch 1 with two timed rounds
        # per T; torch.compile (minutes of C++ builds per shape) on the tiny preset only.
        plan = Plan(False, args.platform, args.dtype, (128, 256, 512, 1024),
                    {"tiny": 8, "shakespeare-char": 4, "gpt2": 1},
                    {"tiny": 7, "shakespeare-char": 4, "gpt2": 2},
                    [("shakespeare-char", 8, 256, 7), ("gpt2", 1, 256, 3)], True,
                    ("tiny",), False)
    if args.presets:
        unknown = set(args.presets) - set(plan.batch) - {"tiny", "shakespeare-char", "gpt2"}
        if unknown:
            raise ValueError(f"--presets: unknown preset(s) {sorted(unknown)}")
        plan.batch = {p: plan.batch.get(p, 1) for p in args.presets}
        plan.repeats = {p: plan.repeats.get(p, 3) for p in args.presets}
    if args.seq_lens:
        plan.seq_lens = tuple(args.seq_lens)
    if args.batch:
        plan.batch = {p: args.batch for p in plan.batch}
    if args.repeats:
        plan.repeats = {p: args.repeats for p in plan.batch}
    if args.no_layers:
        plan.layer_shapes = []
    if args.no_torch:
        plan.torch_eager, plan.torch_compile_presets = False, ()
    if args.torch_compile is not None:
        plan.torch_compile_presets = tuple(args.torch_compile)
    if args.gpu_peak is not None:
        plan.gpu_peak = args.gpu_peak
    plan.overrides = parse_overrides(args.set or [])
    plan.threads = args.threads
    return plan


def parse_overrides(items: list[str]) -> dict:
    """``["key=value", ...]`` -> GPTConfig overrides; values are read as JSON when they parse
    (``true``, ``3``, ``1e-5``, ``"x"``), else kept as strings."""
    fields = set(GPTConfig.__dataclass_fields__)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set expects key=value with key a GPTConfig field "
                             f"({sorted(fields)}), got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _ratio_or_none(a: float, b: float):
    return a / b if b else None


# --- per layer -----------------------------------------------------------------------------

def bench_layers(plan: Plan, log) -> list[dict]:
    records = []
    for preset, batch, seq_len, repeats in plan.layer_shapes:
        cfg = bench_config(preset, seq_len, {"dtype": plan.dtype, **plan.overrides})
        for case in layer_cases(cfg, batch, seq_len, jax.random.key(0)):
            record = {"layer": case.name, "preset": preset, "shape": case.shape, "backends": {}}
            calls = {}
            for backend in BACKENDS:
                fn = case.value_and_grad(backend)
                compiled, compile_time = compile_timed(fn, *case.args)
                calls[backend] = (lambda c=compiled: jax.block_until_ready(c(*case.args)))
                record["backends"][backend] = {
                    **compile_time, "memory": memory_bytes(compiled), "hlo": hlo_census(compiled),
                    "residuals": saved_residuals(case.forward[backend], *case.inputs)}
            times = time_interleaved(calls, repeats=repeats, warmup=plan.warmup)
            for backend in BACKENDS:
                record["backends"][backend]["time_s"] = summarise(times[backend])
            m, a = (record["backends"][b]["memory"] for b in BACKENDS)
            record["manual_over_autodiff"] = {
                "time": ratio(times["manual"], times["autodiff"]),
                "memory_total": _ratio_or_none(m["total"], a["total"]),
                "memory_temp": _ratio_or_none(m["temp"], a["temp"])}
            records.append(record)
            r = record["manual_over_autodiff"]
            log(f"layer {preset:>16} {case.name:<12} time x{r['time']['median']:.2f} "
                f"temp {m['temp']:>11,d} vs {a['temp']:>11,d} B")
    return records


# --- whole training step -------------------------------------------------------------------

def _torch_contenders(plan, preset, cfg, params, inputs, targets, ours, log):
    """Timed callables for the PyTorch peers, and their records (or why they are absent)."""
    calls, records = {}, {}
    if not plan.torch_eager:
        return calls, {"torch_eager": {"unavailable": "not run (--no-torch)"}}
    try:
        import torch
        from benchmarks import torch_peer
    except Exception as error:
        return calls, {"torch_eager": {"unavailable": f"torch not importable: {error}"}}
    device = "cuda" if plan.platform != "cpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return calls, {"torch_eager": {"unavailable": "torch has no CUDA here"}}
    torch_peer.set_threads(plan.threads or hardware.cpu_info()["cores"])
    idx = torch.from_numpy(np.array(inputs)).long().to(device)
    tgt = torch.from_numpy(np.array(targets)).long().to(device)
    kinds = [("torch_eager", False)]
    kinds += [("torch_compile", True)] if preset in plan.torch_compile_presets else []
    for name, compile_model in kinds:
        try:
            model = torch_peer.from_params(params, cfg, device=device)
            with torch.no_grad():
                theirs = float(model(idx, tgt))
            step = torch_peer.torch_train_step(model, OPTIMIZER, compile_model=compile_model)
            torch_peer.reset_peak(device)
            start = time.perf_counter()
            step(idx, tgt)                       # the first call compiles under torch.compile
            first_call = time.perf_counter() - start
        except Exception as error:
            records[name] = {"unavailable": f"{type(error).__name__}: {str(error)[:300]}"}
            log(f"  {name} unavailable: {records[name]['unavailable']}")
            continue
        calls[name] = (lambda s=step: s(idx, tgt))
        records[name] = {"first_call_s": first_call, "loss_at_init": theirs,
                         "loss_abs_diff_vs_jax": abs(theirs - ours)}
        peak = torch_peer.peak_bytes(device)
        if peak is not None:
            records[name]["device_peak_bytes"] = peak
    if not plan.torch_compile_presets or preset not in plan.torch_compile_presets:
        records["torch_compile"] = {"unavailable": "not run for this preset "
                                    "(--torch-compile PRESET ... enables it)"}
    return calls, records


def donating_step(step, params, opt_state, inputs, targets):
    """``call() -> loss`` running ``step`` as training does (:mod:`manual_grad.training`): jitted
    with the parameters and AdamW state donated, each call consuming the previous call's state,
    so XLA updates them in place rather than writing 3x the parameters' bytes to fresh buffers
    every step (as the PyTorch peers update in place). Works on its own copy of the state."""
    jitted = jax.jit(step, donate_argnums=(0, 1))
    state = [jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state)]

    def call():
        state[0], state[1], loss = jitted(state[0], state[1], inputs, targets)
        return jax.block_until_ready(loss)
    return call


def bench_step(plan: Plan, preset: str, seq_len: int, peak: dict, log) -> dict:
    cfg = bench_config(preset, seq_len, {"dtype": plan.dtype, **plan.overrides})
    batch = plan.batch[preset]
    params = init_params(cfg, jax.random.key(0))
    optimizer = make_optimizer()
    opt_state = optimizer.init(params)
    inputs, targets = random_batch(cfg, batch, seq_len, jax.random.key(1))
    flops_per_token = train_flops_per_token(cfg, seq_len)
    record = {"preset": preset, "batch": batch, "seq_len": seq_len, "tokens_per_step": batch * seq_len,
              "n_params": count_params(cfg), "flops_per_token": flops_per_token,
              "config": cfg.to_dict(), "backends": {}}
    calls = {}
    for backend in BACKENDS:
        step = make_train_step(cfg, backend, optimizer)
        compiled, compile_time = compile_timed(step, params, opt_state, inputs, targets)
        calls[backend] = donating_step(step, params, opt_state, inputs, targets)
        loss = float(calls[backend]())
        record["backends"][backend] = {**compile_time, "memory": memory_bytes(compiled),
                                       "hlo": hlo_census(compiled), "loss_at_init": loss}
        if plan.gpu_peak:
            from benchmarks.peak import step_peak_in_subprocess
            spec = {"preset": preset, "backend": backend, "batch": batch, "seq_len": seq_len,
                    "overrides": {"dtype": plan.dtype, **plan.overrides}}
            record["backends"][backend]["device_peak"] = step_peak_in_subprocess(spec)
    torch_calls, torch_records = _torch_contenders(
        plan, preset, cfg, params, inputs, targets, record["backends"]["autodiff"]["loss_at_init"], log)
    calls.update(torch_calls)
    record["backends"].update(torch_records)
    times = time_interleaved(calls, repeats=plan.repeats[preset], warmup=plan.warmup)
    for name, samples in times.items():
        stats = summarise(samples)
        tokens_per_s = batch * seq_len / stats["median"]
        record["backends"][name].update(
            time_s=stats, tokens_per_s=tokens_per_s,
            mfu=flops_per_token * tokens_per_s / peak["flops"] if peak.get("flops") else None)
    m, a = (record["backends"][b]["memory"] for b in BACKENDS)
    record["ratios"] = {"manual/autodiff": {
        "time": ratio(times["manual"], times["autodiff"]),
        "memory_total": _ratio_or_none(m["total"], a["total"]),
        "memory_temp": _ratio_or_none(m["temp"], a["temp"])}}
    for peer in ("torch_eager", "torch_compile"):
        if peer in times:
            for backend in BACKENDS:
                record["ratios"][f"{backend}/{peer}"] = {"time": ratio(times[backend], times[peer])}
    r = record["ratios"]["manual/autodiff"]
    line = (f"step {preset:>16} B={batch:<3} T={seq_len:<5} manual {record['backends']['manual']['time_s']['median']:.3f}s "
            f"autodiff {record['backends']['autodiff']['time_s']['median']:.3f}s time x{r['time']['median']:.2f} "
            f"temp x{r['memory_temp'] or float('nan'):.2f}")
    for peer in ("torch_eager", "torch_compile"):
        if peer in times:
            line += f" {peer} {record['backends'][peer]['time_s']['median']:.3f}s"
    log(line)
    return record


# --- command line --------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run at tiny sizes")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="results root; files go to OUT/<device-slug>/ (default benchmarks/results)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="JAX platform (default: the default backend)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="GPTConfig.dtype of every case")
    p.add_argument("--presets", nargs="+", help="training-step presets (tiny shakespeare-char gpt2)")
    p.add_argument("--seq-lens", nargs="+", type=int, help="context lengths T of the training step")
    p.add_argument("--batch", type=int, help="one batch size for every preset")
    p.add_argument("--repeats", type=int, help="timed rounds for every preset")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="GPTConfig override for every case (repeatable), e.g. --set ln_eps=1e-6")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer cases")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    p.add_argument("--torch-compile", nargs="*", metavar="PRESET",
                   help="presets that also run the torch.compile peer (none: empty list)")
    p.add_argument("--gpu-peak", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the allocator's peak per step in a fresh process (default: on GPU)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--threads", type=int,
                   help="CPU threads for JAX and torch (default: every core). On a shared, busy "
                        "machine --threads 1 keeps OpenMP barriers from stalling the peers")
    p.add_argument("--tag", default="", help="suffix of the device directory, e.g. 'bf16'")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "gpu" and jax.default_backend() == "cpu":
        raise SystemExit("--device gpu: JAX sees no GPU here (jax.default_backend() is 'cpu')")
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    if args.threads is not None:       # before JAX starts its CPU client
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.threads == 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    args.platform = jax.devices()[0].platform
    plan = make_plan(args)
    if plan.torch_compile_presets and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # A fresh kernel cache: first_call_s is a cold compile, and no stale or half-written
        # kernel from another process is picked up.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    device = hardware.device_info(plan.dtype)
    if plan.threads and device["platform"] == "cpu":     # the peak of the cores in use
        used = {**device["cpu"], "cores": min(plan.threads, device["cpu"]["cores"])}
        device["peak"] = hardware.cpu_peak_flops(plan.dtype, used)
    slug = hardware.device_slug(device) + (f"-{args.tag}" if args.tag else "")
    out_dir = os.path.join(args.out, slug)
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    log(f"device {slug}: {device['device_kind']}, peak {device['peak']['formula']}")
    results = {
        "schema_version": SCHEMA_VERSION, "date": hardware.now_utc(), "device": device,
        "versions": hardware.versions(), "manual_grad_source_sha256": hardware.source_digest(),
        "command": "python -m benchmarks.run " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "plan": {**plan.__dict__, "layer_shapes": [list(s) for s in plan.layer_shapes]},
        "method": {
            "timing": "wall clock of the jitted call incl. block_until_ready; warm-up rounds excluded; "
                      "contenders interleaved in ABBA order; median and quartiles over rounds; ratios "
                      "are per-round pairs",
            "flops_per_token": "6 N + 12 L T C (N: parameters without the position table)",
            "memory": "compiled.memory_analysis(): total = temp + argument + output bytes (no donation)",
            "mfu": "flops_per_token x tokens/s / peak",
            "optimizer": {"name": "adamw", **OPTIMIZER}},
        "complete": False, "layers": [], "steps": [], "wall_s": 0.0,
    }
    path = os.path.join(out_dir, "results.json")

    def save():      # after every record, so an interrupted run still leaves its figures
        results["wall_s"] = time.perf_counter() - started
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    results["layers"] = bench_layers(plan, log)
    save()
    # T outermost: a run cut short still covers every preset at the shorter contexts.
    for seq_len in plan.seq_lens:
        for preset in plan.presets:
            results["steps"].append(bench_step(plan, preset, seq_len, device["peak"], log))
            save()
    results["complete"] = True
    save()
    from benchmarks import report
    report.write_markdown(results, os.path.join(out_dir, "results.md"))
    if not args.no_plots:
        report.write_plots(results, out_dir)
    log(f"wrote {out_dir}/ (results.json, results.md{'' if args.no_plots else ', plots'})")
    return results


if __name__ == "__main__":
    main()
