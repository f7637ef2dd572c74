"""Multi-head cross-attention (encoder-decoder): queries from one sequence, keys and values
from another.

q = x W_q + b_q (B, Tq, C);  [k | v] = ctx W_kv + b_kv (B, Tk, 2C);  y = attend(q, k, v) W_o + b_o.
The per-head formulas are self-attention's (see :mod:`manual_grad.layers.attention`), without a
causal mask; the context ``ctx`` receives the gradient dctx = [dk | dv] W_kv^T, and the key bias
again gets exactly zero gradient.
"""
from __future__ import annotations

import jax.numpy as jnp

from manual_grad.layers.attention import attend_bwd, attend_fwd, attend_ref, merge_heads, split_heads
from manual_grad.layers.linear import linear_bwd, linear_fwd, linear_ref
from manual_grad.vjp import manual_vjp

__all__ = ["cross_attention", "cross_attention_fwd", "cross_attention_bwd", "cross_attention_ref"]


def cross_attention_fwd(x, ctx, w_q, b_q, w_kv, b_kv, w_o, b_o, *, n_head):
    """``y = attend(x W_q + b_q, [k | v] = ctx W_kv + b_kv) W_o + b_o``.

    Saves x (B, Tq, C), ctx (B, Tk, C), q, k, v (B, H, T, D), ρ (B, H, Tq, Tk), merged heads.
    """
    q, _ = linear_fwd(x, w_q, b_q)                                              # (B, Tq, C)
    kv, _ = linear_fwd(ctx, w_kv, b_kv)                                         # (B, Tk, 2C)
    k, v = (split_heads(part, n_head) for part in jnp.split(kv, 2, axis=-1))
    q = split_heads(q, n_head)                                                  # (B, H, Tq, D)
    heads, probs = attend_fwd(q, k, v, causal=False)
    merged = merge_heads(heads)
    y, _ = linear_fwd(merged, w_o, b_o)
    return y, (x, ctx, q, k, v, probs, merged, w_q, b_q, w_kv, b_kv, w_o, b_o)


def cross_attention_bwd(n_head, residuals, dy):
    x, ctx, q, k, v, probs, merged, w_q, b_q, w_kv, b_kv, w_o, b_o = residuals
    dmerged, dw_o, db_o = linear_bwd((merged, w_o, b_o), dy)
    dq, dk, dv = attend_bwd(q, k, v, probs, split_heads(dmerged, n_head))
    dx, dw_q, db_q = linear_bwd((x, w_q, b_q), merge_heads(dq))
    dkv = jnp.concatenate([merge_heads(dk), merge_heads(dv)], -1)               # (B, Tk, 2C)
    dctx, dw_kv, db_kv = linear_bwd((ctx, w_kv, b_kv), dkv)
    if db_kv is not None:
        db_kv = db_kv.at[: x.shape[-1]].set(0)                                   # db_k = 0 exactly
    return dx, dctx, dw_q, db_q, dw_kv, db_kv, dw_o, db_o


cross_attention = manual_vjp(cross_attention_fwd, cross_attention_bwd, shapes=dict(
    x="B Tq C", ctx="B Tk C", w_q="C C", b_q="optional C", w_kv="C 2*C", b_kv="optional 2*C",
    w_o="C C", b_o="optional C"))


def cross_attention_ref(x, ctx, w_q, b_q, w_kv, b_kv, w_o, b_o, *, n_head):
    """Plain-jnp twin of :func:`cross_attention`."""
    q = split_heads(linear_ref(x, w_q, b_q), n_head)
    k, v = (split_heads(p, n_head) for p in jnp.split(linear_ref(ctx, w_kv, b_kv), 2, axis=-1))
    return linear_ref(merge_heads(attend_ref(q, k, v, causal=False)), w_o, b_o)
