"""Activations (GELU, tanh form as in GPT-2; ReLU) and the MLP block.

GELU:  g(x) = ½ x (1 + t),  t = tanh(u),  u = sqrt(2/π)(x + 0.044715 x³)
       g'(x) = ½ (1 + t) + ½ x (1 - t²) sqrt(2/π) (1 + 3·0.044715 x²)
ReLU:  g(x) = max(x, 0),  g'(x) = [x > 0]
MLP:   h = x W_fc + b_fc (B, T, F);  a = g(h);  y = a W_proj + b_proj (B, T, C)
       Δ_a = Δ W_proj^T;  Δ_h = Δ_a ∘ g'(h);  dx = Δ_h W_fc^T, and the linear layers' dw, db.
Tangents:  activation dy = dx ∘ g'(x);  MLP dh = dx W_fc + x dW_fc + db_fc;  da = dh ∘ g'(h);
           dy = da W_proj + a dW_proj + db_proj (with the LoRA terms of lora_project_jvp).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from manual_grad.layers.lora import lora_project_bwd, lora_project_fwd, lora_project_jvp, lora_project_ref
from manual_grad.vjp import manual_vjp

__all__ = ["gelu", "gelu_fwd", "gelu_bwd", "gelu_ref", "gelu_grad",
           "relu", "relu_fwd", "relu_bwd", "relu_ref", "relu_grad", "activation_jvp",
           "mlp", "mlp_fwd", "mlp_bwd", "mlp_jvp", "mlp_ref", "ACTIVATIONS"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


# --- GELU (tanh form) ------------------------------------------------------------------

def gelu_ref(x):
    """``½ x (1 + tanh(sqrt(2/π)(x + 0.044715 x³)))`` in plain jnp."""
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)))


def gelu_grad(x):
    """g'(x) = ½(1 + t) + ½ x (1 - t²) sqrt(2/π)(1 + 3·0.044715 x²)."""
    t = jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)


def gelu_fwd(x):
    """GELU. Saves its input x: g'(x) is recomputed from it."""
    return gelu_ref(x), x


def gelu_bwd(x, dy):
    return (dy * gelu_grad(x),)


def activation_jvp(grad):
    """The tangent formula ``dy = dx ∘ g'(x)`` of an activation with derivative ``grad``."""
    def jvp(x, tangents):
        return tangents[0] * grad(x)
    jvp.__name__ = grad.__name__.replace("_grad", "_jvp")
    return jvp


gelu = manual_vjp(gelu_fwd, gelu_bwd, jvp=activation_jvp(gelu_grad), shapes=dict(x="..."))


# --- ReLU ------------------------------------------------------------------------------

def relu_ref(x):
    """``max(x, 0)`` in plain jnp."""
    return jnp.maximum(x, 0)


def relu_grad(x):
    """g'(x) = 1 where x > 0, else 0 (0 at x = 0, as JAX's own ``maximum``)."""
    return (x > 0).astype(x.dtype)


def relu_fwd(x):
    """ReLU. Saves its input x."""
    return relu_ref(x), x


def relu_bwd(x, dy):
    return (dy * relu_grad(x),)


relu = manual_vjp(relu_fwd, relu_bwd, jvp=activation_jvp(relu_grad), shapes=dict(x="..."))

# activation name -> (g, g')
ACTIVATIONS = {"gelu": (gelu_ref, gelu_grad), "relu": (relu_ref, relu_grad)}


# --- MLP -------------------------------------------------------------------------------

def mlp_fwd(x, w_fc, b_fc, w_proj, b_proj, adapters, *, activation, lora_scale=1.0):
    """``y = g(x W_fc + b_fc) W_proj + b_proj`` with optional LoRA adapters "fc", "proj".

    Saves x (B, T, C) and the pre-activation h (B, T, F); the activation a = g(h) is
    recomputed in the backward (autodiff keeps both h and a).
    """
    act, _ = ACTIVATIONS[activation]
    fc_adapters, proj_adapters = _split_adapters(adapters)
    h, xa_fc = lora_project_fwd(x, w_fc, b_fc, fc_adapters, parts=("fc",), scale=lora_scale)
    a = act(h)                                                               # (B, T, F)
    y, xa_proj = lora_project_fwd(a, w_proj, b_proj, proj_adapters, parts=("proj",), scale=lora_scale)
    return y, (x, h, w_fc, b_fc, w_proj, b_proj, adapters, xa_fc, xa_proj)


def mlp_bwd(activation, lora_scale, residuals, dy):
    x, h, w_fc, b_fc, w_proj, b_proj, adapters, xa_fc, xa_proj = residuals
    act, act_grad = ACTIVATIONS[activation]
    fc_adapters, proj_adapters = _split_adapters(adapters)
    da, dw_proj, db_proj, dproj_adapters = lora_project_bwd(
        act(h), w_proj, b_proj, proj_adapters, xa_proj, dy, parts=("proj",), scale=lora_scale)
    dh = da * act_grad(h)                                                    # Δ_h = Δ_a ∘ g'(h): (B, T, F)
    dx, dw_fc, db_fc, dfc_adapters = lora_project_bwd(
        x, w_fc, b_fc, fc_adapters, xa_fc, dh, parts=("fc",), scale=lora_scale)
    return dx, dw_fc, db_fc, dw_proj, db_proj, {**dfc_adapters, **dproj_adapters}


def mlp_jvp(residuals, tangents, *, activation, lora_scale=1.0):
    x, h, w_fc, b_fc, w_proj, b_proj, adapters, xa_fc, xa_proj = residuals
    dx, dw_fc, db_fc, dw_proj, db_proj, dadapters = tangents
    act, act_grad = ACTIVATIONS[activation]
    (fc_adapters, proj_adapters), (dfc, dproj) = _split_adapters(adapters), _split_adapters(dadapters)
    dh = lora_project_jvp(x, w_fc, b_fc, fc_adapters, xa_fc, dx, dw_fc, db_fc, dfc,
                          parts=("fc",), scale=lora_scale)                  # (B, T, F)
    return lora_project_jvp(act(h), w_proj, b_proj, proj_adapters, xa_proj, dh * act_grad(h),
                            dw_proj, db_proj, dproj, parts=("proj",), scale=lora_scale)


mlp = manual_vjp(mlp_fwd, mlp_bwd, jvp=mlp_jvp, shapes=dict(
    x="... C", w_fc="C F", b_fc="optional F", w_proj="F C", b_proj="optional C"))


def mlp_ref(x, w_fc, b_fc, w_proj, b_proj, adapters, *, activation, lora_scale=1.0):
    """Plain-jnp twin of :func:`mlp`."""
    act, _ = ACTIVATIONS[activation]
    fc_adapters, proj_adapters = _split_adapters(adapters)
    h = lora_project_ref(x, w_fc, b_fc, fc_adapters, parts=("fc",), scale=lora_scale)
    return lora_project_ref(act(h), w_proj, b_proj, proj_adapters, parts=("proj",), scale=lora_scale)


def _split_adapters(adapters):
    unknown = set(adapters) - {"fc", "proj"}
    if unknown:
        raise ValueError(f"adapters: unknown MLP adapter(s) {sorted(unknown)}; expected 'fc', 'proj'")
    return ({k: v for k, v in adapters.items() if k == "fc"},
            {k: v for k, v in adapters.items() if k == "proj"})
