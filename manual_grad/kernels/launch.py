"""What the Pallas kernels share: one call per platform, padding to whole tiles, the tile product.

A kernel wrapper is written once as ``fn(platform, *arrays)``; :func:`per_platform` stages
it for every platform with ``lax.platform_dependent``, and the branch of the platform being
lowered for is the only one compiled: Mosaic on TPU, Triton on CUDA GPUs, the Pallas
interpreter (``interpret=True``: the kernel body run as XLA ops, tile by tile) on CPU and
anything else. So one jitted train step lowers for CPU, GPU and TPU alike, and each platform
gets its own tile sizes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["PLATFORMS", "per_platform", "pallas_call", "pad_axis", "pow2_at_least", "tile_dot",
           "round_up", "MASK"]

PLATFORMS = ("cpu", "cuda", "tpu")
# A score that no visible one reaches: exp(MASK - m) is exactly 0 and MASK - MASK is no NaN.
MASK = -1e30


def per_platform(fn, *arrays):
    """``fn(platform, *arrays)`` for the platform the computation is lowered for."""
    branches = {p: functools.partial(fn, p) for p in PLATFORMS}
    return jax.lax.platform_dependent(*arrays, default=branches.pop("cpu"), **branches)


def pallas_call(kernel, platform, *, name, **kwargs):
    """``pl.pallas_call`` with the platform's lowering: interpreted on CPU, Triton on CUDA,
    Mosaic on TPU."""
    if platform == "cuda":
        from jax.experimental.pallas import triton as pltriton
        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(kernel, interpret=platform == "cpu", name=name, **kwargs)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The smallest power of two >= max(n, floor) (Triton tiles are powers of two, >= 16 for a dot)."""
    p = floor
    while p < n:
        p *= 2
    return p


def pad_axis(x, axis: int, size: int, value=0):
    """``x`` zero-padded (or ``value``-padded) at the end of ``axis`` to ``size``; no copy when it fits."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def tile_dot(a, b, contract=(1, 0)):
    """A tile product accumulated in float32, contracting axis ``contract[0]`` of ``a`` with
    ``contract[1]`` of ``b`` (so transposed operands need no copy). float32 tiles run at full
    float32 precision (Triton would otherwise use TF32)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)
