"""The attention layer alone, forward + backward, at every context length: the lean attention
on each of its cores (``kernels="xla"``: tiles as a ``lax.scan`` of XLA ops; ``kernels="cpu"``:
the fused C++ kernel; ``kernels="pallas"`` on an accelerator) against autodiff of the twin and
PyTorch's ``scaled_dot_product_attention`` layer, interleaved in one process.

    python -m benchmarks.attention                      # shakespeare-char width, T = 128..4096
    python -m benchmarks.attention --seq-lens 256 1024 --batch 4

Writes ``<out>/<device-slug>/attention.json`` and ``attention.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hardware
from benchmarks.report import _ratio, _time
from benchmarks.timing import ratio, summarise, time_interleaved
from manual_grad import GPTConfig, kernels, layers
from manual_grad.training.host_memory import keep_host_memory

__all__ = ["main", "attention_calls"]


def attention_calls(cfg: GPTConfig, batch: int, seq_len: int, cores: tuple[str, ...]) -> dict:
    """``{name: call}``: jitted forward + backward of the attention layer for a random input
    and output cotangent, one per core, plus autodiff's and (if installed) PyTorch's."""
    C, H = cfg.n_embd, cfg.n_head
    k = jax.random.split(jax.random.key(0), 4)
    x, dy = (jax.random.normal(key, (batch, seq_len, C), cfg.dtype) for key in k[:2])
    w_qkv = 0.02 * jax.random.normal(k[2], (C, 3 * C), cfg.dtype)
    w_o = 0.02 * jax.random.normal(k[3], (C, C), cfg.dtype)
    b_qkv, b_o = jnp.zeros(3 * C, cfg.dtype), jnp.zeros(C, cfg.dtype)

    def layer_vjp(op, **settings):
        fn = jax.jit(lambda *a: jax.vjp(lambda *p: op(*p, {}, n_head=H, causal=True, **settings),
                                        *a[:-1])[1](a[-1]))
        return lambda: jax.block_until_ready(fn(x, w_qkv, b_qkv, w_o, b_o, dy))

    calls = {f"manual ({core})": layer_vjp(layers.attention, backward="lean", tile=cfg.attn_block_size,
                                           core=kernels.select(core, cfg.dtype)["attention"])
             for core in cores}
    if batch * H * seq_len ** 2 * 4 * 12 < 8 * 2 ** 30:    # autodiff keeps ~12 (B, H, T, T) arrays
        calls["autodiff"] = layer_vjp(layers.attention_ref)
    try:
        import torch
        from benchmarks import torch_peer
    except ImportError:
        return calls
    module = torch_peer.CausalSelfAttention(cfg).to(torch_peer.torch_dtype(cfg.dtype))
    tx, tdy = (torch.from_numpy(np.array(a)) for a in (x, dy))

    def torch_call():
        module.zero_grad(set_to_none=True)
        module(tx.clone().requires_grad_()).backward(tdy)
    calls["torch sdpa"] = torch_call
    return calls


def main(argv=None) -> dict:
    keep_host_memory()      # before JAX starts its CPU client (benchmarks/findings.md, finding 6)
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--seq-lens", nargs="+", type=int, default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    device = hardware.device_info("float32")
    cores = ("xla", "cpu") if jax.default_backend() == "cpu" else ("xla", "pallas")
    results = {"device": device, "versions": hardware.versions(), "date": hardware.now_utc(),
               "command": "python -m benchmarks.attention " + " ".join(sys.argv[1:] if argv is None else argv),
               "preset": args.preset, "batch": args.batch, "cells": []}
    for seq_len in args.seq_lens:
        cfg = GPTConfig.preset(args.preset, dropout=0.0, block_size=seq_len)
        times = time_interleaved(attention_calls(cfg, args.batch, seq_len, cores), repeats=args.repeats)
        base = f"manual ({cores[0]})"
        cell = {"seq_len": seq_len, "time_s": {n: summarise(t) for n, t in times.items()},
                "over_xla": {n: ratio(t, times[base]) for n, t in times.items() if n != base}}
        results["cells"].append(cell)
        print(f"T={seq_len}: " + "  ".join(f"{n} {np.median(t) * 1e3:.1f} ms" for n, t in times.items()),
              flush=True)
    out_dir = os.path.join(args.out, hardware.device_slug(device))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "attention.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "attention.md"), "w") as f:
        f.write("\n".join(markdown(results)) + "\n")
    return results


def markdown(results: dict) -> list[str]:
    names = list(results["cells"][0]["time_s"])
    base = names[0]
    lines = [f"# Attention layer, forward + backward ({results['preset']}, B={results['batch']})", "",
             f"- {results['device']['device_kind']}; {results['date']}; `{results['command']}`",
             f"- Ratios: median [quartiles] of per-round ratios to `{base}` (< 1: faster).", "",
             "| T | " + " | ".join(names) + " | " + " | ".join(f"{n} / {base}" for n in names[1:]) + " |",
             "|---|" + "---|" * (2 * len(names) - 1)]
    for c in results["cells"]:
        lines.append(f"| {c['seq_len']} | " + " | ".join(_time(c["time_s"].get(n)) for n in names) + " | "
                     + " | ".join(_ratio(c["over_xla"].get(n)) for n in names[1:]) + " |")
    lines += ["", "—: autodiff not run where its (B, H, T, T) arrays would not fit in 8 GiB."]
    return lines


if __name__ == "__main__":
    main()
