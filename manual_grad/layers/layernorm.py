"""LayerNorm over the feature axis, any ``eps >= 0``.

Forward:   x̂ = (x - μ) / σ,  σ = sqrt(var + eps),  y = x̂ ∘ scale + bias        (B, T, C)
Backward:  g = Δ ∘ scale
           dx = (g - mean_C(g) - x̂ ∘ mean_C(x̂ ∘ g)) / σ
           dscale = Σ_tokens x̂ ∘ Δ,   dbias = Σ_tokens Δ
Tangent:   dx̂ = (dx - mean_C(dx) - x̂ ∘ mean_C(x̂ ∘ dx)) / σ
           dy = dx̂ ∘ scale + x̂ ∘ dscale + dbias
Each token is normalised on its own, so a token's dx depends on no other token.

With ``eps = 0`` a constant row has σ = 0 and the result is not finite (as in the paper's
code); use ``eps > 0`` for inputs that may have constant rows.
"""
from __future__ import annotations

import jax.numpy as jnp

from manual_grad.config import BACKWARDS, check_choice
from manual_grad.vjp import manual_vjp

__all__ = ["layernorm", "layernorm_fwd", "layernorm_bwd", "layernorm_jvp", "layernorm_ref"]


def _statistics(x, eps):
    """(μ, 1/σ) over the last axis, in at least float32: (..., 1), (..., 1)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    return mean, 1.0 / jnp.sqrt((centred * centred).mean(-1, keepdims=True) + eps)


def _normalise(x, eps):
    """(x̂, 1/σ), x̂ in at least float32: (..., C), (..., 1)."""
    mean, rstd = _statistics(x, eps)
    return (x.astype(mean.dtype) - mean) * rstd, rstd


def layernorm_fwd(x, scale, bias, *, eps, backward="paper"):
    """``y = x̂ ∘ scale + bias``, statistics in at least float32, y in x's dtype.

    ``backward="paper"`` saves x̂ (B, T, C) and 1/σ (B, T, 1); ``backward="lean"``
    saves x itself (in its own dtype, half the bytes of a float32 x̂ under bf16) with μ and 1/σ
    (B, T, 1), and rebuilds x̂ in the backward.
    """
    check_choice("backward", backward, BACKWARDS)
    mean, rstd = _statistics(x, eps)
    xhat = (x.astype(mean.dtype) - mean) * rstd
    y = (xhat * scale + bias).astype(x.dtype)
    return y, ((x, mean, rstd) if backward == "lean" else (xhat, rstd), scale)


def layernorm_bwd(eps, backward, residuals, dy):
    saved, scale = residuals
    if backward == "lean":
        x, mean, rstd = saved
        xhat = (x.astype(mean.dtype) - mean) * rstd
    else:
        xhat, rstd = saved
    dy32 = dy.astype(xhat.dtype)
    g = dy32 * scale                                                    # (B, T, C)
    dx = (g - g.mean(-1, keepdims=True)
          - xhat * (xhat * g).mean(-1, keepdims=True)) * rstd            # (B, T, C)
    C = dy.shape[-1]
    dscale = (xhat * dy32).reshape(-1, C).sum(0)                        # (C,)
    dbias = dy32.reshape(-1, C).sum(0)                                  # (C,)
    return dx.astype(dy.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


def layernorm_jvp(residuals, tangents, **_):
    saved, scale = residuals
    if len(saved) == 3:                                                 # x, μ, 1/σ: rebuild x̂
        x, mean, rstd = saved
        xhat = (x.astype(mean.dtype) - mean) * rstd
    else:
        xhat, rstd = saved
    dx, dscale, dbias = tangents
    dx32 = dx.astype(xhat.dtype)
    dxhat = (dx32 - dx32.mean(-1, keepdims=True)
             - xhat * (xhat * dx32).mean(-1, keepdims=True)) * rstd      # (B, T, C)
    return (dxhat * scale + xhat * dscale + dbias).astype(dx.dtype)


layernorm = manual_vjp(layernorm_fwd, layernorm_bwd, jvp=layernorm_jvp, shapes=dict(x="... C", scale="C", bias="C"))


def layernorm_ref(x, scale, bias, *, eps, backward="paper"):
    """Plain-jnp twin of :func:`layernorm` (``backward`` only changes what the op saves)."""
    xhat, _ = _normalise(x, eps)
    return (xhat * scale + bias).astype(x.dtype)
