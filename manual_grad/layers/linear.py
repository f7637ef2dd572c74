"""Linear layer ``y = x w + b`` with weights stored (in, out).

Backward (sums over tokens are over every leading axis):
    dx = Δ w^T        dw = x^T Δ        db = Σ_tokens Δ
Tangent:   dy = dx w + x dw + db
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from manual_grad.vjp import manual_vjp

__all__ = ["linear", "linear_fwd", "linear_bwd", "linear_jvp", "linear_ref", "matmul_tokens"]


def matmul_tokens(a, b):
    """``a^T b`` summed over every token (leading) axis: (..., m), (..., n) -> (m, n).

    Written as one 2-D contraction over the flattened tokens, so that no transposed copy of
    ``a`` is materialised first."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])             # (N, m), (N, n)
    return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())))


def linear_fwd(x, w, b):
    """``y = x @ w + b`` (``b`` may be None). Saves x and the (free) parameters."""
    y = jnp.matmul(x, w)                                      # (..., in) x (in, out) -> (..., out)
    if b is not None:
        y = y + b
    return y, (x, w, b)


def linear_bwd(residuals, dy):
    x, w, b = residuals
    dx = dy @ w.T                                             # (..., out) x (out, in) -> (..., in)
    dw = matmul_tokens(x, dy).astype(w.dtype)                 # (in, ...) x (..., out) -> (in, out)
    db = None if b is None else dy.reshape(-1, dy.shape[-1]).sum(0).astype(b.dtype)
    return dx, dw, db


def linear_jvp(residuals, tangents):
    x, w, b = residuals
    dx, dw, db = tangents
    dy = dx @ w + x @ dw                                      # (..., in) x (in, out) -> (..., out)
    return dy if b is None else dy + db


linear = manual_vjp(linear_fwd, linear_bwd, jvp=linear_jvp, shapes=dict(x="... C_in", w="C_in C_out", b="optional C_out"))


def linear_ref(x, w, b):
    """Plain-jnp twin of :func:`linear`."""
    y = jnp.matmul(x, w)
    return y if b is None else y + b
