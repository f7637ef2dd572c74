"""Why one backend is slower or larger: the buffers XLA materialises for a layer's
forward+backward or a whole training step, side by side for manual and autodiff.

    python -m benchmarks.explain --layer attention --preset gpt2 --batch 1 --seq-len 256
    python -m benchmarks.explain --step --preset shakespeare-char --batch 4 --seq-len 256

Prints ``memory_analysis()``, the HLO census, and the largest top-level (non-fused) buffers
of the optimised HLO with the JAX operation each comes from.
"""
from __future__ import annotations

import argparse

import jax

from benchmarks.compiled import hlo_census, memory_bytes, top_level_buffers

__all__ = ["main"]

def _compiled_pair(args):
    from benchmarks.train_step import bench_config
    cfg = bench_config(args.preset, args.seq_len, {"dtype": args.dtype})
    if args.step:
        from benchmarks.train_step import make_optimizer, make_train_step, random_batch
        from manual_grad import init_params
        params = init_params(cfg, jax.random.key(0))
        optimizer = make_optimizer()
        state = optimizer.init(params)
        batch = random_batch(cfg, args.batch, args.seq_len, jax.random.key(1))
        return {b: jax.jit(make_train_step(cfg, b, optimizer)).lower(params, state, *batch).compile()
                for b in ("manual", "autodiff")}
    from benchmarks.layer_cases import layer_cases
    (case,) = [c for c in layer_cases(cfg, args.batch, args.seq_len, jax.random.key(0))
               if c.name == args.layer]
    return {b: jax.jit(case.value_and_grad(b)).lower(*case.args).compile() for b in ("manual", "autodiff")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.explain", description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--layer", choices=("embedding", "layernorm", "attention", "mlp", "logits_loss",
                                          "lora_linear"))
    what.add_argument("--step", action="store_true", help="the whole training step")
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    for backend, compiled in _compiled_pair(args).items():
        mem = memory_bytes(compiled)
        print(f"== {backend}: temp {mem['temp']:,} B, total {mem['total']:,} B; {hlo_census(compiled)}")
        for size, shape, opcode, op_name in top_level_buffers(compiled)[:args.top]:
            print(f"   {size:>14,} B  {shape:<26} {opcode:<12} {op_name[-90:]}")


if __name__ == "__main__":
    main()
