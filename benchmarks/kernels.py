"""The Pallas kernels against their peers on an accelerator, forward + backward, interleaved:

- attention core (B, H, T, D), causal: ``flash_attention`` (Pallas) vs cuDNN's fused attention
  (``jax.nn.dot_product_attention(implementation="cudnn")``, GPU only) vs the XLA lean path
  (``flash_attend_fwd``/``_bwd``, a ``lax.scan`` over tiles);
- logits + loss of N tokens: ``linear_cross_entropy`` (Pallas, fused over vocabulary tiles) vs
  the chunked XLA loss (``logits_loss(..., backward="lean")``): time and XLA's temp memory.

    python -m benchmarks.kernels --dtype bfloat16        # on a GPU: GPT-2 widths, T = 1024..4096
    python -m benchmarks.kernels --quick                 # tiny shapes; runs anywhere (CPU: interpreted)

Writes ``<out>/<device-slug>/kernels.json`` and prints a table. The train step's MFU with the
kernels is ``python -m benchmarks.run --device gpu --dtype bfloat16 --presets gpt2 --set kernels=pallas``.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from benchmarks import hardware
from benchmarks.compiled import memory_bytes
from benchmarks.timing import ratio, summarise, time_interleaved
from manual_grad.kernels.flash_attention import flash_attention_bwd, flash_attention_fwd
from manual_grad.kernels.linear_cross_entropy import linear_cross_entropy_bwd, linear_cross_entropy_fwd
from manual_grad.layers.attention import flash_attend_bwd, flash_attend_fwd
from manual_grad.layers.loss import logits_loss_bwd, logits_loss_fwd
from manual_grad.training.host_memory import keep_host_memory

__all__ = ["main", "attention_calls", "loss_calls"]


def _compiled(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return (lambda: jax.block_until_ready(compiled(*args))), memory_bytes(compiled)


def attention_calls(B, H, T, D, dtype, tile=128):
    """``{name: (call, memory)}``: jitted forward + backward of each attention core."""
    q, k, v, g = (jax.random.normal(key, (B, H, T, D), dtype) for key in jax.random.split(jax.random.key(0), 4))

    def pallas(q, k, v, g):
        out, residuals = flash_attention_fwd(q, k, v, causal=True)
        return out, flash_attention_bwd(True, residuals, g)

    def xla_lean(q, k, v, g):
        out, lse = flash_attend_fwd(q, k, v, causal=True, block=tile)
        return out, flash_attend_bwd(q, k, v, out, lse, g, causal=True, block=tile)

    def cudnn(q, k, v, g):                      # (B, T, H, D) layout for jax.nn
        attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        out, vjp = jax.vjp(attend, *(a.swapaxes(1, 2) for a in (q, k, v)))
        return out, vjp(g.swapaxes(1, 2))

    fns = {"pallas": pallas, "xla lean": xla_lean}
    if jax.default_backend() == "gpu":
        fns["cudnn"] = cudnn
    return {name: _compiled(fn, q, k, v, g) for name, fn in fns.items()}


def loss_calls(N, C, V, dtype, chunk=1024):
    """``{name: (call, memory)}``: jitted loss + gradients (tied GPT-2 head) of each loss."""
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (1, N, C), dtype)
    w = (0.02 * jax.random.normal(keys[1], (V, C))).astype(dtype)
    targets = jax.random.randint(keys[2], (1, N), 0, V)
    one = jnp.ones((), jnp.float32)

    def fused(x, w):
        loss, residuals = linear_cross_entropy_fwd(x, w, None, targets, tied=True)
        return loss, linear_cross_entropy_bwd(True, residuals, one)

    def chunked(x, w):
        loss, residuals = logits_loss_fwd(x, w, None, targets, {}, tied=True, backward="lean", chunk=chunk)
        return loss, logits_loss_bwd(True, 1.0, "lean", chunk, None, residuals, one)

    return {name: _compiled(fn, x, w) for name, fn in (("pallas fused", fused), ("xla chunked", chunked))}


def measure(calls: dict, repeats: int) -> dict:
    times = time_interleaved({name: call for name, (call, _) in calls.items()}, repeats=repeats)
    out = {name: {"time_s": summarise(times[name]), "temp_bytes": mem["temp"]}
           for name, (_, mem) in calls.items()}
    for name in calls:
        if name not in ("pallas", "pallas fused"):
            mine = "pallas" if "pallas" in calls else "pallas fused"
            out[mine][f"time_ratio_vs_{name.replace(' ', '_')}"] = ratio(times[mine], times[name])
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few repeats")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=8, help="B of the attention cases (GPT-2: H = 12, D = 64)")
    p.add_argument("--tokens", type=int, default=8192, help="N of the loss case (GPT-2: C = 768, V = 50257)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    keep_host_memory()      # before JAX starts its CPU client (benchmarks/findings.md, finding 6)
    args = parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    if args.quick:
        args.seq_lens, args.batch, args.tokens, args.repeats = [64], 1, 128, 2
    H, D, C, V = (2, 16, 32, 500) if args.quick else (12, 64, 768, 50257)
    results = {"device": hardware.device_info(args.dtype), "versions": hardware.versions(),
               "date": hardware.now_utc(), "dtype": args.dtype, "attention": {}, "loss": {}}
    for T in args.seq_lens:
        key = f"B={args.batch} H={H} T={T} D={D}"
        results["attention"][key] = measure(attention_calls(args.batch, H, T, D, dtype), args.repeats)
        medians = {n: round(r["time_s"]["median"] * 1e3, 3) for n, r in results["attention"][key].items()}
        print("attention", key, medians, "ms")
    key = f"N={args.tokens} C={C} V={V}"
    results["loss"][key] = measure(loss_calls(args.tokens, C, V, dtype), args.repeats)
    print("loss", key, {n: (round(r["time_s"]["median"] * 1e3, 3), r["temp_bytes"])
                        for n, r in results["loss"][key].items()}, "(ms, temp bytes)")
    out_dir = os.path.join(args.out, hardware.device_slug(results["device"]) + ("-quick" if args.quick else ""))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
