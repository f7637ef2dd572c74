"""Pallas kernels with hand-written backwards, for GPUs and TPUs (interpreted on CPU).

Each kernel op is registered with :func:`manual_grad.vjp.manual_vjp` like a layer, has a
plain-jnp ``*_ref`` twin, and plugs into its layer as that layer's ``core`` (see
:func:`select`): ``flash_attention`` is the core of self-attention, ``linear_cross_entropy``
the core of the logits + loss layer. Which platform's kernel runs is decided when the step is
lowered (:mod:`manual_grad.kernels.launch`).
"""
from __future__ import annotations

import jax

from manual_grad.kernels.flash_attention import flash_attention, flash_attention_ref
from manual_grad.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

__all__ = ["flash_attention", "flash_attention_ref", "linear_cross_entropy",
           "linear_cross_entropy_ref", "resolve", "select"]


def resolve(kernels: str, backend: str | None = None) -> str:
    """``"pallas"`` or ``"xla"`` for a config's ``kernels`` setting: ``"auto"`` is Pallas on a
    GPU or TPU and XLA on CPU (``backend``: a JAX backend name, default the current one)."""
    if kernels != "auto":
        return kernels
    return "pallas" if (backend or jax.default_backend()) in ("gpu", "cuda", "tpu") else "xla"


def select(kernels: str, dtype: str = "float32") -> dict:
    """The layers' ``core`` settings for a ``kernels`` setting: the Pallas ops, or ``None``
    (the layers' own XLA lean path). float64 always takes the XLA path: the kernels
    accumulate in float32."""
    pallas = resolve(kernels) == "pallas" and dtype != "float64"
    return {"attention": flash_attention if pallas else None,
            "loss": linear_cross_entropy if pallas else None}
