"""Inverted dropout.

Forward:   y = x ∘ m / (1 - p),   m ~ Bernoulli(1 - p) drawn from ``key``        (B, T, C)
Backward:  dx = Δ ∘ m / (1 - p)   (the mask is the residual; the key gets no gradient)
Tangent:   dy = dx ∘ m / (1 - p)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from manual_grad.vjp import manual_vjp

__all__ = ["dropout", "dropout_fwd", "dropout_bwd", "dropout_jvp", "dropout_ref"]


def _keep_scaled(key, shape, dtype, rate):
    """m / (1 - p) with m ~ Bernoulli(1 - p): the same draw in the op and its twin."""
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(dtype)


def dropout_fwd(x, key, *, rate):
    """``y = x ∘ m / (1 - p)``. Saves the scaled mask (x's shape; a bool mask would do as well)."""
    if rate == 0.0:
        return x, None
    keep_scaled = _keep_scaled(key, x.shape, x.dtype, rate)
    return x * keep_scaled, keep_scaled


def dropout_bwd(rate, keep_scaled, dy):
    return (dy if keep_scaled is None else dy * keep_scaled), None


def dropout_jvp(keep_scaled, tangents, **_):
    dx, _ = tangents
    return dx if keep_scaled is None else dx * keep_scaled


dropout = manual_vjp(dropout_fwd, dropout_bwd, jvp=dropout_jvp, shapes=dict(x="... C"))


def dropout_ref(x, key, *, rate):
    """Plain-jnp twin of :func:`dropout`."""
    return x if rate == 0.0 else x * _keep_scaled(key, x.shape, x.dtype, rate)
