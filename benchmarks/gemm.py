"""The GEMMs of a GPT-2 step, JAX (XLA:CPU) against PyTorch on the same shapes and threads.

Explains the gap between the manual training step and the PyTorch eager peer: both run the
same GEMMs, so the step's time ratio follows the GEMM libraries' ratio.

    python -m benchmarks.gemm [--tokens 1024] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# (name, m = tokens, k, n): the forward GEMMs of one GPT-2 124M block and of its head
SHAPES = [("qkv", 768, 2304), ("attn out", 768, 768), ("mlp fc", 768, 3072), ("mlp proj", 3072, 768),
          ("logits", 768, 50257)]


def _median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    import torch

    rows = []
    for name, k, n in SHAPES:
        a = np.random.default_rng(0).standard_normal((args.tokens, k), np.float32)
        b = np.random.default_rng(1).standard_normal((k, n), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        matmul = jax.jit(jnp.matmul)
        t_jax = _median_time(lambda: matmul(ja, jb).block_until_ready(), args.repeats)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        with torch.no_grad():
            t_torch = _median_time(lambda: torch.matmul(ta, tb), args.repeats)
        flops = 2 * args.tokens * k * n
        rows.append(dict(gemm=name, m=args.tokens, k=k, n=n, jax_s=t_jax, torch_s=t_torch,
                         jax_gflops=flops / t_jax / 1e9, torch_gflops=flops / t_torch / 1e9,
                         jax_over_torch=t_jax / t_torch))
        print(f"{name:>9} ({args.tokens}x{k})x({k}x{n}): jax {t_jax * 1e3:8.2f} ms ({flops / t_jax / 1e9:6.1f} GFLOP/s)"
              f"  torch {t_torch * 1e3:8.2f} ms ({flops / t_torch / 1e9:6.1f} GFLOP/s)  jax/torch {t_jax / t_torch:.2f}")
    meta = dict(jax=jax.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                cpus=os.cpu_count(), device=str(jax.devices()[0]))
    print(json.dumps(meta))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
