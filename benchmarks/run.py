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
from manual_grad import GPTConfig, count_params, init_params, loss_fn
from manual_grad.training.host_memory import keep_host_memory

__all__ = ["main", "Plan", "make_plan", "bench_config", "parse_overrides"]

BACKENDS = ("manual", "autodiff")
PEERS = ("torch_eager", "torch_compile")
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
    long_steps: list[tuple[str, int, int, int]] = field(default_factory=list)   # (preset, B, T, repeats)
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
                    ("tiny", "shakespeare-char", "gpt2"), True,
                    long_steps=[("shakespeare-char", 8, 2048, 10), ("shakespeare-char", 8, 4096, 5)])
    else:
        # Sized for 2 CPU cores (about 45 min): gpt2 runs at batch 1; torch.compile (a minute
        # of C++ builds per shape) on tiny and shakespeare-char; shakespeare-char also at
        # T = 2048 and 4096 (batch 1). Medians over 7 rounds (tiny) and 3-4 (shakespeare-char)
        # moved by up to 0.2 between runs of the same code: 15 and 8 rounds, 6 and 5 at
        # T = 2048 and 4096. gpt2's manual / autodiff at T = 1024 moved from 0.63 to 0.71 over
        # 3 rounds (a manual step 5.4 s, then 5.8-6.6 s): 5 rounds.
        plan = Plan(False, args.platform, args.dtype, (128, 256, 512, 1024),
                    {"tiny": 8, "shakespeare-char": 4, "gpt2": 1},
                    {"tiny": 15, "shakespeare-char": 8, "gpt2": 5},
                    [("shakespeare-char", 8, 256, 7), ("gpt2", 1, 256, 3)], True,
                    ("tiny", "shakespeare-char"), False,
                    long_steps=[("shakespeare-char", 1, 2048, 6), ("shakespeare-char", 1, 4096, 5)])
    if args.presets:
        unknown = set(args.presets) - set(plan.batch) - {"tiny", "shakespeare-char", "gpt2"}
        if unknown:
            raise ValueError(f"--presets: unknown preset(s) {sorted(unknown)}")
        plan.batch = {p: plan.batch.get(p, 1) for p in args.presets}
        plan.repeats = {p: plan.repeats.get(p, 3) for p in args.presets}
    if args.seq_lens:
        plan.seq_lens, plan.long_steps = tuple(args.seq_lens), []
    if args.presets:
        plan.long_steps = [c for c in plan.long_steps if c[0] in args.presets]
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
    """Timed callables for the PyTorch peers, ``{name: (step, forward_backward)}``, and their
    records (or why they are absent: ``not_run`` by design, ``unavailable`` when it failed)."""
    calls, records = {}, {}
    if not plan.torch_eager:
        return calls, {"torch_eager": {"not_run": "--no-torch"}}
    try:
        import torch
        from benchmarks import torch_peer
    except ImportError as error:
        return calls, {"torch_eager": {"not_run": f"torch not installed: {error}"}}
    device = "cuda" if plan.platform != "cpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return calls, {"torch_eager": {"not_run": "torch has no CUDA here"}}
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
            forward_backward = step.forward_backward
        except Exception as error:
            records[name] = {"unavailable": f"{type(error).__name__}: {str(error)[:300]}"}
            log(f"  {name} failed: {records[name]['unavailable']}")
            continue
        calls[name] = (lambda s=step: s(idx, tgt), lambda f=forward_backward: f(idx, tgt))
        records[name] = {"first_call_s": first_call, "loss_at_init": theirs,
                         "loss_abs_diff_vs_jax": abs(theirs - ours)}
        peak = torch_peer.peak_bytes(device)
        if peak is not None:
            records[name]["device_peak_bytes"] = peak
    if "torch_compile" not in records:
        records["torch_compile"] = {"not_run": "not run for this preset "
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


def memory_budget() -> int | None:
    """Bytes a CPU step may plan for (80% of the machine's memory); None on an accelerator."""
    if jax.default_backend() != "cpu":
        return None
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# Every step call shorter than this is timed right after an untimed call of its own, as in a
# training loop. Timed straight after another contender, a call of seconds is not warm either:
# the other's allocations can take the hole its temporaries used, and the heap grows into
# pages the host must fault in (finding 6). Measured: the manual step at shakespeare-char
# T = 2048 took 1.33-1.82 s over six rounds after autodiff's 3.8 s calls (its forward+backward,
# timed without autodiff in the loop, 0.83-0.94x torch's throughout). Only autodiff at T = 4096
# (12 s) is timed cold.
SETTLE_BELOW_S = 10.0


def _jax_contenders(plan, cfg, case, record):
    """``{backend: (step, forward_backward)}`` callables; a backend whose compiled step would not
    fit in memory is recorded as ``out_of_memory`` (with XLA's estimate) and not run."""
    params, opt_state, inputs, targets = case
    optimizer, calls, budget = make_optimizer(), {}, memory_budget()
    for backend in BACKENDS:
        step = make_train_step(cfg, backend, optimizer)
        compiled, compile_time = compile_timed(step, params, opt_state, inputs, targets)
        memory = memory_bytes(compiled)
        entry = record["backends"][backend] = {**compile_time, "memory": memory, "hlo": hlo_census(compiled)}
        if budget is not None and memory["total"] > budget:
            entry["out_of_memory"] = (f"needs {memory['total'] / 2**30:.1f} GiB (XLA's estimate), "
                                      f"{budget / 2**30:.1f} GiB available")
            continue
        calls[backend] = (donating_step(step, params, opt_state, inputs, targets),
                          value_and_grad_call(cfg, backend, params, inputs, targets))
        entry["loss_at_init"] = float(calls[backend][0]())
        if plan.gpu_peak:
            from benchmarks.peak import step_peak_in_subprocess
            spec = {"preset": record["preset"], "backend": backend, "batch": record["batch"],
                    "seq_len": record["seq_len"], "overrides": {"dtype": plan.dtype, **plan.overrides}}
            entry["device_peak"] = step_peak_in_subprocess(spec)
    return calls


def value_and_grad_call(cfg, backend, params, inputs, targets):
    """``call() -> loss``: the forward and backward alone (no optimizer), compiled here, before
    any call. (Compiled lazily, its first call, the timed loop's warm-up, took seconds, so
    ``time_interleaved`` judged it a long call and timed it cold, without the untimed call of
    its own that the other contenders got: finding 7 of ``benchmarks/findings.md``.)"""
    compiled = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(3, 4)).lower(
        params, inputs, targets, cfg, backend).compile()

    def call():
        return jax.block_until_ready(compiled(params, inputs, targets)[0])
    return call


def _ratios(times: dict, pairs) -> dict:
    return {f"{a}/{b}": {"time": ratio(times[a], times[b])} for a, b in pairs
            if a in times and b in times}


def bench_step(plan: Plan, preset: str, seq_len: int, peak: dict, log, batch=None, repeats=None) -> dict:
    """One training-step cell: the full step (value_and_grad + AdamW) and the forward+backward
    alone, manual and autodiff against the PyTorch peers, interleaved."""
    cfg = bench_config(preset, seq_len, {"dtype": plan.dtype, **plan.overrides})
    batch = batch or plan.batch[preset]
    params = init_params(cfg, jax.random.key(0))
    case = (params, make_optimizer().init(params), *random_batch(cfg, batch, seq_len, jax.random.key(1)))
    flops_per_token = train_flops_per_token(cfg, seq_len)
    record = {"preset": preset, "batch": batch, "seq_len": seq_len, "tokens_per_step": batch * seq_len,
              "n_params": count_params(cfg), "flops_per_token": flops_per_token,
              "config": cfg.to_dict(), "backends": {}}
    calls = _jax_contenders(plan, cfg, case, record)
    ours = next((e["loss_at_init"] for e in record["backends"].values() if "loss_at_init" in e), 0.0)
    torch_calls, torch_records = _torch_contenders(plan, preset, cfg, params, *case[2:], ours, log)
    calls.update(torch_calls)
    record["backends"].update(torch_records)
    repeats = repeats or plan.repeats[preset]
    times = time_interleaved({n: c[0] for n, c in calls.items()}, repeats=repeats, warmup=plan.warmup,
                             settle_below=SETTLE_BELOW_S)
    fb_names = [n for n in calls if n != "autodiff"]
    fb_times = time_interleaved({n: calls[n][1] for n in fb_names}, repeats=repeats, warmup=plan.warmup,
                                settle_below=SETTLE_BELOW_S)
    for name, samples in times.items():
        stats = summarise(samples)
        tokens_per_s = batch * seq_len / stats["median"]
        record["backends"][name].update(
            time_s=stats, forward_backward_s=summarise(fb_times[name]) if name in fb_times else None,
            tokens_per_s=tokens_per_s,
            mfu=flops_per_token * tokens_per_s / peak["flops"] if peak.get("flops") else None)
    pairs = [("manual", "autodiff")] + [(b, p) for p in PEERS for b in BACKENDS]
    record["ratios"] = _ratios(times, pairs)
    if "manual/autodiff" in record["ratios"]:
        m, a = (record["backends"][b]["memory"] for b in BACKENDS)
        record["ratios"]["manual/autodiff"].update(memory_total=_ratio_or_none(m["total"], a["total"]),
                                                   memory_temp=_ratio_or_none(m["temp"], a["temp"]))
    record["forward_backward_ratios"] = _ratios(fb_times, [("manual", p) for p in PEERS])
    log(f"step {preset:>16} B={batch:<3} T={seq_len:<5} " + " ".join(
        f"{n} {np.median(times[n]):.3f}s" for n in times) + " | fwd+bwd " + " ".join(
        f"{n} {np.median(fb_times[n]):.3f}s" for n in fb_times))
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
    keep_host_memory()      # for every contender in this process, before JAX starts its CPU client
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
                      "contenders interleaved in ABBA order, a call under 1 s preceded by an untimed "
                      "call of its own; median and quartiles over rounds; ratios are per-round pairs; "
                      "host memory kept (keep_host_memory)",
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
    for preset, batch, seq_len, repeats in plan.long_steps:
        results["steps"].append(bench_step(plan, preset, seq_len, device["peak"], log, batch, repeats))
        save()
    results["complete"] = True
    save()
    from benchmarks import report
    report.write_markdown(results, os.path.join(out_dir, "results.md"))
    if not args.no_plots:
        report.write_plots(results, out_dir)
    log(f"wrote {out_dir}/ (results.json, results.md{'' if args.no_plots else ', plots'})")
    for failure in peer_failures(results):
        log(f"PEER FAILED: {failure}")
    return results


def peer_failures(results: dict) -> list[str]:
    """Every PyTorch peer that was meant to run and crashed (``unavailable``), as "T=.. preset:
    peer: error". A peer absent by design (``not_run``: --no-torch, torch not installed, not
    enabled for the preset) is not a failure; a crash is, and makes the command exit with status 1."""
    return [f"{step['preset']} T={step['seq_len']}: {name}: {record['unavailable']}"
            for step in results.get("steps", []) for name, record in step.get("backends", {}).items()
            if name in PEERS and "unavailable" in record]


if __name__ == "__main__":
    sys.exit(1 if peer_failures(main()) else 0)
