"""Pallas kernels with hand-written backwards, for GPUs and TPUs (interpreted on CPU).

Each kernel op is registered with :func:`manual_grad.vjp.manual_vjp` like a layer, has a
plain-jnp ``*_ref`` twin, and plugs into its layer as that layer's ``core`` (see
:func:`select`): ``flash_attention`` is the core of self-attention, ``linear_cross_entropy``
the core of the logits + loss layer. Which platform's kernel runs is decided when the step is
lowered (:mod:`manual_grad.kernels.launch`).
"""
from __future__ import annotations

import jax

from manual_grad.kernels.cpu_attention import available as cpu_attention_available
from manual_grad.kernels.cpu_attention import cpu_attention, cpu_attention_ref
from manual_grad.kernels.flash_attention import flash_attention, flash_attention_ref
from manual_grad.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

__all__ = ["cpu_attention", "cpu_attention_ref", "cpu_attention_available", "flash_attention",
           "flash_attention_ref", "linear_cross_entropy",
           "linear_cross_entropy_ref", "resolve", "select"]


def resolve(kernels: str, backend: str | None = None, dtype: str = "float32") -> str:
    """``"pallas"``, ``"cpu"`` or ``"xla"`` for a config's ``kernels`` setting: ``"auto"`` is
    Pallas on a GPU or TPU; on a single CPU device, the C++ attention kernel where it serves
    ``dtype`` (built, float32/float64); else XLA (``backend``: a JAX backend name, default the
    current one). Several CPU devices (a mesh) take XLA: XLA's partitioner cannot split the
    kernel's call, so it would gather q, k, v onto every device."""
    if kernels != "auto":
        return kernels
    backend = backend or jax.default_backend()
    if backend in ("gpu", "cuda", "tpu"):
        return "pallas"
    single = jax.device_count() == 1
    return "cpu" if backend == "cpu" and single and cpu_attention_available(dtype) else "xla"


def select(kernels: str, dtype: str = "float32") -> dict:
    """The layers' ``core`` settings for a ``kernels`` setting: the Pallas ops, the C++ CPU
    attention (the loss keeps its XLA path), or ``None`` (the layers' own XLA lean path).
    float64 takes the XLA path under Pallas (its kernels accumulate in float32); the C++
    kernel computes in the input's dtype, float64 included."""
    chosen = resolve(kernels, dtype=dtype)
    if chosen == "cpu":
        return {"attention": cpu_attention, "loss": None}
    pallas = chosen == "pallas" and dtype != "float64"
    return {"attention": flash_attention if pallas else None,
            "loss": linear_cross_entropy if pallas else None}
