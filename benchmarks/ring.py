"""Ring attention: per-device memory and step time against the ring size, on 8 virtual CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set here before JAX starts).

    python -m benchmarks.ring                    # T = 4096 and 16384, seq = 1, 2, 4, 8
    python -m benchmarks.ring --T 1024 --repeat 1

One value-and-grad of ``loss_fn`` (float32, a 2-layer C=64 model, 4 heads, batch 1) on the
mesh ``data=1,seq=s`` (s = 1: one device, no ring: the lean flash-attention path). Memory is
XLA's per-device figure from ``compiled.memory_analysis()`` (temporaries, i.e. activations and
residuals; arguments are the replicated parameters and the batch). The virtual devices share
the machine's cores, so a time is informative only as a ratio to s = 1 (the same total work,
plus the ring's bookkeeping). Also the causal balance: visible scores per device of the ring's
layout against contiguous blocks. Writes ``benchmarks/results/<device>/ring.json`` and
``ring.md``.
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from manual_grad import GPTConfig, init_params, loss_fn, parallel  # noqa: E402
from manual_grad.layers.ring_attention import ring_order  # noqa: E402
from manual_grad.training.host_memory import keep_host_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20


def measure(T: int, n: int, repeat: int) -> dict:
    """Memory (MiB per device) and median seconds of one value-and-grad at length T on seq=n."""
    cfg = GPTConfig(vocab_size=64, block_size=T, n_layer=2, n_head=4, n_embd=64)
    params = init_params(cfg, jax.random.key(0))
    inputs = np.asarray(jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size))
    targets = np.roll(inputs, -1, axis=1)
    mesh = None if n == 1 else parallel.make_mesh(f"data=1,seq={n}")
    step = jax.jit(jax.value_and_grad(lambda p, i, t: loss_fn(p, i, t, cfg, mesh=mesh)))
    start = time.perf_counter()
    compiled = step.lower(params, inputs, targets).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(params, inputs, targets))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, inputs, targets))
        times.append(time.perf_counter() - start)
    return {"T": T, "seq": n, "temp_mib": memory.temp_size_in_bytes / MIB,
            "argument_mib": memory.argument_size_in_bytes / MIB, "seconds": statistics.median(times),
            "compile_seconds": compile_s}


def balance(n: int, T: int = 4096) -> dict:
    """Visible (query, key) scores per device under the causal mask (query p sees p + 1 keys):
    max / min over devices, the ring's layout and contiguous blocks."""
    ratio = lambda order: (lambda w: float(max(w) / min(w)))([(p + 1).sum() for p in order.reshape(n, -1)])
    return {"seq": n, "ring": ratio(ring_order(T, n, True)), "contiguous": ratio(np.arange(T))}


def table(rows: list[dict], balances: list[dict]) -> str:
    lines = ["# Ring attention: per-device memory and step time on 8 virtual CPU devices", "",
             "One value-and-grad of `loss_fn`, float32, 2 layers, C=64, 4 heads, batch 1, mesh `data=1,seq=s` "
             "(s=1: one device, lean flash attention). Memory: `compiled.memory_analysis()` per device. "
             "Time: relative to s=1 at the same T (the virtual devices share the CPU's cores).", "",
             "| T | seq | temp MiB / device | temp x seq / temp(seq=1) | time / time(seq=1) |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["T"] == r["T"] and b["seq"] == 1)
        scaled = r["temp_mib"] * r["seq"] / base["temp_mib"]
        lines.append(f"| {r['T']} | {r['seq']} | {r['temp_mib']:.1f} | {scaled:.2f} | {r['seconds'] / base['seconds']:.2f} |")
    lines += ["", "Causal balance: visible scores per device, max / min over the devices "
              "(T = 4096).", "", "| seq | ring layout | contiguous blocks |", "|---:|---:|---:|"]
    lines += [f"| {b['seq']} | {b['ring']:.2f} | {b['contiguous']:.2f} |" for b in balances]
    return "\n".join(lines) + "\n"


def main(argv=None):
    keep_host_memory()      # before JAX starts its CPU client (benchmarks/findings.md, finding 6)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    args = parser.parse_args(argv)
    from benchmarks.hardware import device_info, device_slug
    out = Path(args.out) if args.out else RESULTS / device_slug(device_info())
    rows = []
    for T in args.T:
        for n in args.seqs:
            rows.append(measure(T, n, args.repeat))
            print(json.dumps(rows[-1]), flush=True)
    balances = [balance(n) for n in args.seqs if n > 1]
    out.mkdir(parents=True, exist_ok=True)
    (out / "ring.json").write_text(json.dumps({"rows": rows, "balance": balances}, indent=1) + "\n")
    (out / "ring.md").write_text(table(rows, balances))
    print(table(rows, balances))


if __name__ == "__main__":
    main()
