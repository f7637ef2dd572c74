"""Logits (tied to the token embedding, or untied with optional bias) and softmax
cross-entropy on next-token targets.

Logits:   z = x W_out + b,  with W_out = W_tok^T when tied                     (B, T, V)
Loss:     L = (1/N) Σ_{counted tokens} (logsumexp(z_t) - z_t[target_t]),  N = #counted
          a target of -100 is ignored; with no counted token L = 0 and every gradient is 0.
Backward: Δ_z = (softmax(z) - onehot(target)) ∘ counted / N ... then the linear layer's
          dx = Δ_z W_out^T,  dW_out = x^T Δ_z,  db = Σ_tokens Δ_z.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from manual_grad.layers.lora import lora_project_bwd, lora_project_fwd, lora_project_ref
from manual_grad.vjp import manual_vjp

__all__ = ["IGNORE_INDEX", "logits", "logits_fwd", "logits_bwd", "logits_ref",
           "logits_loss", "logits_loss_fwd", "logits_loss_bwd", "logits_loss_ref"]

IGNORE_INDEX = -100


def _out_weight(w, tied):
    """W_out (C, V): the embedding (V, C) transposed when tied, else the head itself."""
    return w.T if tied else w


def _check_adapters(adapters):
    unknown = set(adapters) - {"logits"}
    if unknown:
        raise ValueError(f"adapters: unknown logits adapter(s) {sorted(unknown)}; expected 'logits'")


# --- logits alone (generation, evaluation) ----------------------------------------------

def logits_fwd(x, w, b, adapters, *, tied, lora_scale=1.0):
    """``z = x W_out + b`` (+ LoRA "logits"). ``w`` is (V, C) when tied, (C, V) otherwise.

    Saves x (B, T, C), the parameters and ``x A`` (B, T, r) when adapted.
    """
    _check_adapters(adapters)
    z, xa = lora_project_fwd(x, _out_weight(w, tied), b, adapters, parts=("logits",), scale=lora_scale)
    return z, (x, w, b, adapters, xa)


def logits_bwd(tied, lora_scale, residuals, dz):
    x, w, b, adapters, xa = residuals
    dx, dw, db, dadapters = lora_project_bwd(
        x, _out_weight(w, tied), b, adapters, xa, dz, parts=("logits",), scale=lora_scale)
    return dx, _out_weight(dw, tied), db, dadapters


logits = manual_vjp(logits_fwd, logits_bwd)


def logits_ref(x, w, b, adapters, *, tied, lora_scale=1.0):
    """Plain-jnp twin of :func:`logits`."""
    _check_adapters(adapters)
    return lora_project_ref(x, _out_weight(w, tied), b, adapters, parts=("logits",), scale=lora_scale)


# --- logits + cross-entropy, fused ------------------------------------------------------

def _counted(targets):
    """(mask of counted tokens (B, T), N = max(#counted, 1))."""
    counted = targets != IGNORE_INDEX
    return counted, jnp.maximum(counted.sum(), 1)


def _cross_entropy(z, targets):
    """Mean next-token cross-entropy of logits z (B, T, V) and its softmax."""
    counted, n = _counted(targets)
    z = z - jax.lax.stop_gradient(z.max(-1, keepdims=True))
    lse = jnp.log(jnp.exp(z).sum(-1))                                            # (B, T)
    z_target = jnp.take_along_axis(z, jnp.where(counted, targets, 0)[..., None], -1)[..., 0]
    return jnp.where(counted, lse - z_target, 0).sum() / n


def logits_loss_fwd(x, w, b, targets, adapters, *, tied, lora_scale=1.0):
    """Mean cross-entropy of ``z = x W_out + b`` against ``targets`` (-100 = ignored).

    Saves x (B, T, C), the parameters and the softmax probabilities (B, T, V).
    """
    z, (_, _, _, _, xa) = logits_fwd(x, w, b, adapters, tied=tied, lora_scale=lora_scale)
    probs = jax.nn.softmax(z, axis=-1)                                          # (B, T, V)
    return _cross_entropy(z, targets), (x, w, b, targets, adapters, xa, probs)


def logits_loss_bwd(tied, lora_scale, residuals, dloss):
    x, w, b, targets, adapters, xa, probs = residuals
    counted, n = _counted(targets)
    onehot = jax.nn.one_hot(targets, probs.shape[-1], dtype=probs.dtype)       # 0 row for -100
    dz = (probs - onehot) * (counted[..., None] * (dloss / n)).astype(probs.dtype)  # Δ_z: (B, T, V)
    dx, dw, db, dadapters = logits_bwd(tied, lora_scale, (x, w, b, adapters, xa), dz)
    return dx, dw, db, None, dadapters


logits_loss = manual_vjp(logits_loss_fwd, logits_loss_bwd)


def logits_loss_ref(x, w, b, targets, adapters, *, tied, lora_scale=1.0):
    """Plain-jnp twin of :func:`logits_loss`."""
    return _cross_entropy(logits_ref(x, w, b, adapters, tied=tied, lora_scale=lora_scale), targets)
