"""LayerNorm over the feature axis, any ``eps >= 0``.

Forward:   x̂ = (x - μ) / σ,  σ = sqrt(var + eps),  y = x̂ ∘ scale + bias        (B, T, C)
Backward:  g = Δ ∘ scale
           dx = (g - mean_C(g) - x̂ ∘ mean_C(x̂ ∘ g)) / σ
           dscale = Σ_tokens x̂ ∘ Δ,   dbias = Σ_tokens Δ
Each token is normalised on its own, so a token's dx depends on no other token.

With ``eps = 0`` a constant row has σ = 0 and the result is not finite (as in the paper's
code); use ``eps > 0`` for inputs that may have constant rows.
"""
from __future__ import annotations

import jax.numpy as jnp

from manual_grad.vjp import manual_vjp

__all__ = ["layernorm", "layernorm_fwd", "layernorm_bwd", "layernorm_ref"]


def _normalise(x, eps):
    """(x̂, 1/σ) with statistics over the last axis: (..., C), (..., 1)."""
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(-1, keepdims=True)
    rstd = 1.0 / jnp.sqrt(var + eps)
    return centred * rstd, rstd


def layernorm_fwd(x, scale, bias, *, eps):
    """``y = x̂ ∘ scale + bias``. Saves x̂ (B, T, C) and 1/σ (B, T, 1), plus the parameters."""
    xhat, rstd = _normalise(x, eps)
    return xhat * scale + bias, (xhat, rstd, scale)


def layernorm_bwd(eps, residuals, dy):
    xhat, rstd, scale = residuals
    g = dy * scale                                                      # (B, T, C)
    dx = (g - g.mean(-1, keepdims=True)
          - xhat * (xhat * g).mean(-1, keepdims=True)) * rstd            # (B, T, C)
    C = dy.shape[-1]
    dscale = (xhat * dy).reshape(-1, C).sum(0)                          # (C,)
    dbias = dy.reshape(-1, C).sum(0)                                    # (C,)
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


layernorm = manual_vjp(layernorm_fwd, layernorm_bwd)


def layernorm_ref(x, scale, bias, *, eps):
    """Plain-jnp twin of :func:`layernorm`."""
    xhat, _ = _normalise(x, eps)
    return xhat * scale + bias
