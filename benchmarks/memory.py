"""Peak memory of the compiled GPT-2 train step against context length, from XLA's own
accounting (``compiled.memory_analysis()``), for the manual backend's lean and paper
backwards and for autodiff. Compiles only (nothing runs), so it is quick on any machine.

    python -m benchmarks.memory [--preset gpt2] [--batch 8] [--seq-lens 128 256 512 1024 2048]

Writes ``benchmarks/results/<device>/memory_<preset>.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from benchmarks.compiled import memory_bytes
from benchmarks.hardware import device_info, device_slug, now_utc, versions
from benchmarks.train_step import make_optimizer, make_train_step
from manual_grad import GPTConfig, init_params

VARIANTS = {  # name -> (backend, GPTConfig overrides)
    "manual (lean)": ("manual", {"backward": "lean"}),
    "manual (paper)": ("manual", {"backward": "paper"}),
    "autodiff": ("autodiff", {}),
}


def step_memory(cfg: GPTConfig, backend: str, batch: int, seq_len: int) -> dict:
    """memory_analysis() of the jitted value_and_grad + AdamW step, lowered from shapes."""
    optimizer = make_optimizer()
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    opt_state = jax.eval_shape(optimizer.init, params)
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    step = make_train_step(cfg, backend, optimizer)
    return memory_bytes(jax.jit(step).lower(params, opt_state, ids, ids).compile())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    rows = []
    for T in args.seq_lens:
        row = {"seq_len": T}
        for name, (backend, overrides) in VARIANTS.items():
            cfg = GPTConfig.preset(args.preset, block_size=max(T, 1024), dtype=args.dtype, **overrides)
            row[name] = step_memory(cfg, backend, args.batch, T)
            print(f"T={T:5d} {name:15s} total {row[name]['total'] / 2**30:7.2f} GiB "
                  f"(temp {row[name]['temp'] / 2**30:.2f})", flush=True)
        rows.append(row)

    info = device_info(args.dtype)
    out_dir = os.path.join(args.out, device_slug(info))
    os.makedirs(out_dir, exist_ok=True)
    results = {"date": now_utc(), "device": info, "versions": versions(), "preset": args.preset,
               "batch": args.batch, "dtype": args.dtype,
               "note": "block_size = max(T, 1024) so that T = 2048 fits; total = temp + argument + output",
               "rows": rows}
    base = os.path.join(out_dir, f"memory_{args.preset}")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write("\n".join(markdown(results)) + "\n")
    plot(results, base + ".png")
    return results


def markdown(results: dict) -> list[str]:
    device = results["device"]
    name = device["cpu"]["model"] if device["platform"] == "cpu" else device["device_kind"]
    lines = [f"Peak memory of the compiled train step, {results['preset']}, batch {results['batch']}, "
             f"{results['dtype']} (XLA memory_analysis: temp + argument + output, GiB); "
             f"{name}, {results['date']}.", "",
             "| T | manual (lean) | manual (paper) | autodiff | lean / autodiff | paper / autodiff |",
             "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        gib = {n: row[n]["total"] / 2**30 for n in VARIANTS}
        lines.append(f"| {row['seq_len']} | {gib['manual (lean)']:.2f} | {gib['manual (paper)']:.2f} | "
                     f"{gib['autodiff']:.2f} | {gib['manual (lean)'] / gib['autodiff']:.2f}x | "
                     f"{gib['manual (paper)'] / gib['autodiff']:.2f}x |")
    return lines


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    seq = [r["seq_len"] for r in results["rows"]]
    for name in VARIANTS:
        ax.plot(seq, [r[name]["total"] / 2**30 for r in results["rows"]], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length T")
    ax.set_ylabel("peak memory of the train step (GiB)")
    ax.set_title(f"{results['preset']}, batch {results['batch']}, {results['dtype']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
