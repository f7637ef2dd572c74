"""Multi-head (causal) self-attention, and the scaled dot-product core it shares with
cross-attention.

One head, with S = q k^T / sqrt(D) and ρ = softmax(mask(S)) row by row:
Forward:   out = ρ v                                                   (T, D)
Backward:  dv = ρ^T Δ;   G = Δ v^T;   dS = (G - rowsum(G ∘ ρ)) ∘ ρ     (each row of dS sums to 0)
           dS_raw = dS / sqrt(D);   dq = dS_raw k;   dk = dS_raw^T q
Masked entries need no special case: ρ is 0 there, so dS is 0 there.

The layer: [q | k | v] = x W_qkv + b_qkv (columns of head h at h*D:(h+1)*D of each part);
heads run side by side on a head axis; y = merge(heads) W_o + b_o. Its backward runs the output
projection's backward, every head's softmax backward at once, then the input projection's.
The key bias gets exactly zero gradient: db_k = 1^T (dS_raw^T q) = (dS_raw 1)^T q = 0 because
every row of dS sums to 0 (q b_k^T shifts a row of scores by a constant, which softmax ignores).
The backward writes that exact 0 instead of summing rounding noise.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from manual_grad.layers.lora import lora_project_bwd, lora_project_fwd, lora_project_ref
from manual_grad.vjp import manual_vjp

__all__ = ["attention", "attention_fwd", "attention_bwd", "attention_ref",
           "attend_fwd", "attend_bwd", "attend_ref", "softmax_bwd",
           "split_heads", "merge_heads", "causal_mask"]


# --- shape helpers ---------------------------------------------------------------------

def split_heads(x, n_head):
    """(B, T, C) -> (B, H, T, D)."""
    *batch, T, C = x.shape
    return x.reshape(*batch, T, n_head, C // n_head).swapaxes(-2, -3)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, C)."""
    x = x.swapaxes(-2, -3)
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def causal_mask(t_query, t_key):
    """(Tq, Tk) bool: query i (the last Tq of Tk positions) sees keys j <= i + Tk - Tq."""
    return jnp.tril(jnp.ones((t_query, t_key), bool), k=t_key - t_query)


# --- scaled dot-product attention: the core shared by self- and cross-attention --------

def _probs(q, k, causal):
    """ρ = softmax(mask(q k^T / sqrt(D))): (B, H, Tq, D) x (B, H, Tk, D) -> (B, H, Tq, Tk)."""
    scores = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        scores = jnp.where(causal_mask(q.shape[-2], k.shape[-2]), scores, -jnp.inf)
    scores = scores - scores.max(-1, keepdims=True)
    e = jnp.exp(scores)
    return e / e.sum(-1, keepdims=True)


def attend_fwd(q, k, v, *, causal):
    """``out = ρ v``; returns ``(out (B, H, Tq, D), ρ (B, H, Tq, Tk))``."""
    probs = _probs(q, k, causal)
    return probs @ v, probs                                          # (Tq, Tk) x (Tk, D) -> (Tq, D)


def softmax_bwd(probs, dprobs):
    """dS = (G - rowsum(G ∘ ρ)) ∘ ρ with G = dL/dρ: the softmax backward, row by row."""
    return (dprobs - (dprobs * probs).sum(-1, keepdims=True)) * probs


def attend_bwd(q, k, v, probs, dout):
    """Backward of :func:`attend_fwd`: ``(dq, dk, dv)``, each shaped like its input."""
    dv = probs.swapaxes(-1, -2) @ dout                               # ρ^T Δ: (Tk, Tq) x (Tq, D) -> (Tk, D)
    dprobs = dout @ v.swapaxes(-1, -2)                               # G = Δ v^T: (Tq, D) x (D, Tk) -> (Tq, Tk)
    dscores = softmax_bwd(probs, dprobs) * (1.0 / math.sqrt(q.shape[-1]))  # dS_raw: (Tq, Tk)
    dq = dscores @ k                                                 # (Tq, Tk) x (Tk, D) -> (Tq, D)
    dk = dscores.swapaxes(-1, -2) @ q                                # (Tk, Tq) x (Tq, D) -> (Tk, D)
    return dq, dk, dv


def attend_ref(q, k, v, *, causal):
    """Plain-jnp twin of :func:`attend_fwd`'s output."""
    return _probs(q, k, causal) @ v


# --- the self-attention layer ----------------------------------------------------------

QKV = ("q", "k", "v")


def _split_adapters(adapters):
    unknown = set(adapters) - {"q", "k", "v", "o"}
    if unknown:
        raise ValueError(f"adapters: unknown attention adapter(s) {sorted(unknown)}; "
                         "expected a subset of 'q', 'k', 'v', 'o'")
    return ({k: v for k, v in adapters.items() if k in QKV},
            {k: v for k, v in adapters.items() if k == "o"})


def attention_fwd(x, w_qkv, b_qkv, w_o, b_o, adapters, *, n_head, causal=True, lora_scale=1.0):
    """Multi-head self-attention ``y = attend(x W_qkv + b_qkv) W_o + b_o``.

    ``adapters``: optional LoRA adapters named "q", "k", "v" (on W_qkv's parts) and "o".
    Saves x (B, T, C), q, k, v (B, H, T, D), ρ (B, H, T, T) and the merged heads (B, T, C).
    """
    qkv_adapters, o_adapters = _split_adapters(adapters)
    qkv, xa_qkv = lora_project_fwd(x, w_qkv, b_qkv, qkv_adapters, parts=QKV, scale=lora_scale)
    q, k, v = (split_heads(part, n_head) for part in jnp.split(qkv, 3, axis=-1))   # (B, H, T, D)
    heads, probs = attend_fwd(q, k, v, causal=causal)
    merged = merge_heads(heads)                                                       # (B, T, C)
    y, xa_o = lora_project_fwd(merged, w_o, b_o, o_adapters, parts=("o",), scale=lora_scale)
    return y, (x, q, k, v, probs, merged, w_qkv, b_qkv, w_o, b_o, adapters, xa_qkv, xa_o)


def attention_bwd(n_head, causal, lora_scale, residuals, dy):
    x, q, k, v, probs, merged, w_qkv, b_qkv, w_o, b_o, adapters, xa_qkv, xa_o = residuals
    qkv_adapters, o_adapters = _split_adapters(adapters)
    dmerged, dw_o, db_o, do_adapters = lora_project_bwd(
        merged, w_o, b_o, o_adapters, xa_o, dy, parts=("o",), scale=lora_scale)     # (B, T, C)
    dq, dk, dv = attend_bwd(q, k, v, probs, split_heads(dmerged, n_head))             # (B, H, T, D)
    dqkv = jnp.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], -1)   # (B, T, 3C)
    dx, dw_qkv, db_qkv, dqkv_adapters = lora_project_bwd(
        x, w_qkv, b_qkv, qkv_adapters, xa_qkv, dqkv, parts=QKV, scale=lora_scale)
    if db_qkv is not None:
        C = x.shape[-1]
        db_qkv = db_qkv.at[C:2 * C].set(0)       # db_k = (dS_raw 1)^T q = 0 exactly
    return dx, dw_qkv, db_qkv, dw_o, db_o, {**dqkv_adapters, **do_adapters}


attention = manual_vjp(attention_fwd, attention_bwd)


def attention_ref(x, w_qkv, b_qkv, w_o, b_o, adapters, *, n_head, causal=True, lora_scale=1.0):
    """Plain-jnp twin of :func:`attention`."""
    qkv_adapters, o_adapters = _split_adapters(adapters)
    qkv = lora_project_ref(x, w_qkv, b_qkv, qkv_adapters, parts=QKV, scale=lora_scale)
    q, k, v = (split_heads(part, n_head) for part in jnp.split(qkv, 3, axis=-1))
    merged = merge_heads(attend_ref(q, k, v, causal=causal))
    return lora_project_ref(merged, w_o, b_o, o_adapters, parts=("o",), scale=lora_scale)
