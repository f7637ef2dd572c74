"""Attention variants beyond softmax(q k^T / sqrt(D)): ALiBi, sigmoid attention, RoPE,
QK-norm, and linear attention (see :mod:`manual_grad.layers.linear_attention`), each with a
hand-written backward, and a self-attention layer that runs any of them.

Notation per head: S = q k^T / sqrt(D) (Tq, Tk), M the causal mask, Δ = dL/d(out).

ALiBi (softmax with a fixed per-head linear bias, Press et al. 2022):
    ρ = softmax(mask(S + m_h P)),  P_ij = -(i - j) (causal) or -|i - j|,  m_h = 2^(-8h/H)
    Backward: as softmax attention (P is a constant):  dv = ρ^T Δ;  G = Δ v^T;
    dS = (G - rowsum(G ∘ ρ)) ∘ ρ / sqrt(D);  dq = dS k;  dk = dS^T q.
    Rows of dS still sum to 0, so db_k = (dS 1)^T q = 0: ALiBi keeps the key bias redundant.
Sigmoid attention (Ramapuram et al. 2024), elementwise, no normalisation over keys:
    ρ = σ(S + b) ∘ M,  b = -log(Tk);   out = ρ v
    Backward: dv = ρ^T Δ;  dS = (Δ v^T) ∘ ρ ∘ (1 - ρ) / sqrt(D);  dq = dS k;  dk = dS^T q.
    Rows of dS do not sum to 0, so db_k = (dS 1)^T q is not 0.
RoPE (rotary positions, Su et al. 2021; half-split pairs as GPT-NeoX):
    q' = rot(q), k' = rot(k) with rot(x)_t = [x1 cos θ_t - x2 sin θ_t, x1 sin θ_t + x2 cos θ_t],
    x = [x1 | x2], θ_t,i = t · 10000^(-2i/D);  out = softmax attention of (q', k', v)
    Backward: softmax attention's (dq', dk', dv), then dq = rot^T(dq'), dk = rot^T(dk')
    (rot^T rotates by -θ_t). The bias b_k becomes rot_t(b_k), a different vector for each key
    position t, so q'_i · rot_t(b_k) is not constant along a row: db_k is not 0.
QK-norm (RMS-normalised queries and keys per head, no gain):
    q̂ = q ∘ r_q,  r_q = (mean_D(q²) + eps)^(-1/2) (likewise k̂);  out = softmax attention of (q̂, k̂, v)
    Backward: softmax attention's (dq̂, dk̂, dv), then dq = r_q ∘ (dq̂ - q̂ ∘ mean_D(dq̂ ∘ q̂))
    (likewise dk). Normalising k + b_k is not a row shift of the scores: db_k is not 0.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from manual_grad.layers.attention import (ATTENTION_SHAPES, attend_bwd, attend_fwd, attend_ref, causal_mask,
                                          merge_heads, split_heads)
from manual_grad.layers.linear import linear_bwd, linear_fwd, linear_ref
from manual_grad.layers.linear_attention import linear_attend_bwd, linear_attend_fwd, linear_attend_ref
from manual_grad.vjp import manual_vjp

__all__ = ["alibi_attend", "alibi_attend_fwd", "alibi_attend_bwd", "alibi_attend_ref", "alibi_bias",
           "sigmoid_attend", "sigmoid_attend_fwd", "sigmoid_attend_bwd", "sigmoid_attend_ref",
           "rope", "rope_fwd", "rope_bwd", "rope_ref",
           "rms_normalise", "rms_normalise_fwd", "rms_normalise_bwd", "rms_normalise_ref",
           "attention_variant", "attention_variant_fwd", "attention_variant_bwd",
           "attention_variant_ref", "KINDS"]


# q, k, v of the per-head cores: (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, Dv)
HEAD_SHAPES = dict(q="... Tq D", k="... Tk D", v="... Tk Dv")


# --- ALiBi ---------------------------------------------------------------------------------

def alibi_bias(n_head, t_query, t_key, causal):
    """m_h P (H, Tq, Tk): P_ij = -(i - j) causal, -|i - j| otherwise; m_h = 2^(-8h/H), h = 1..H."""
    slopes = 2.0 ** (-8.0 * jnp.arange(1, n_head + 1) / n_head)                     # (H,)
    i = jnp.arange(t_key - t_query, t_key)[:, None]                                 # query positions
    j = jnp.arange(t_key)[None, :]
    distance = (i - j) if causal else jnp.abs(i - j)
    return -slopes[:, None, None] * distance                                        # (H, Tq, Tk)


def _alibi_probs(q, k, causal):
    S = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    S = S + alibi_bias(q.shape[-3], q.shape[-2], k.shape[-2], causal).astype(S.dtype)
    if causal:
        S = jnp.where(causal_mask(q.shape[-2], k.shape[-2]), S, -jnp.inf)
    S = S - S.max(-1, keepdims=True)
    e = jnp.exp(S)
    return e / e.sum(-1, keepdims=True)                                             # (B, H, Tq, Tk)


def alibi_attend_fwd(q, k, v, *, causal=True):
    """``out = softmax(mask(q k^T / sqrt(D) + m_h P)) v``; q, k, v (B, H, T, D). Saves q, k, v, ρ."""
    probs = _alibi_probs(q, k, causal)
    return probs @ v, (q, k, v, probs)


def alibi_attend_bwd(causal, residuals, dout):
    return attend_bwd(*residuals, dout)          # the bias is a constant: softmax attention's backward


alibi_attend = manual_vjp(alibi_attend_fwd, alibi_attend_bwd, shapes=HEAD_SHAPES)


def alibi_attend_ref(q, k, v, *, causal=True):
    """Plain-jnp twin of :func:`alibi_attend`."""
    return _alibi_probs(q, k, causal) @ v


# --- sigmoid attention -----------------------------------------------------------------------

def _sigmoid_probs(q, k, causal):
    S = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])) - math.log(k.shape[-2])
    probs = 1.0 / (1.0 + jnp.exp(-S))                                               # σ(S + b)
    if causal:
        probs = jnp.where(causal_mask(q.shape[-2], k.shape[-2]), probs, 0.0)
    return probs                                                                    # (B, H, Tq, Tk)


def sigmoid_attend_fwd(q, k, v, *, causal=True):
    """``out = (σ(q k^T / sqrt(D) - log Tk) ∘ M) v``. Saves q, k, v and ρ (B, H, Tq, Tk)."""
    probs = _sigmoid_probs(q, k, causal)
    return probs @ v, (q, k, v, probs)


def sigmoid_attend_bwd(causal, residuals, dout):
    q, k, v, probs = residuals
    dv = probs.swapaxes(-1, -2) @ dout                                   # ρ^T Δ: (Tk, Tq) x (Tq, D)
    dscores = (dout @ v.swapaxes(-1, -2)) * probs * (1.0 - probs)        # (Δ v^T) ∘ ρ ∘ (1 - ρ): (Tq, Tk)
    dscores = dscores * (1.0 / math.sqrt(q.shape[-1]))                   # masked entries: ρ = 0 there
    return dscores @ k, dscores.swapaxes(-1, -2) @ q, dv


sigmoid_attend = manual_vjp(sigmoid_attend_fwd, sigmoid_attend_bwd, shapes=HEAD_SHAPES)


def sigmoid_attend_ref(q, k, v, *, causal=True):
    """Plain-jnp twin of :func:`sigmoid_attend` (``jax.nn.sigmoid``, independent of the fwd's form)."""
    S = (q @ k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1]) - math.log(k.shape[-2])
    probs = jax.nn.sigmoid(S)
    if causal:
        probs = jnp.where(causal_mask(q.shape[-2], k.shape[-2]), probs, 0.0)
    return probs @ v


# --- RoPE --------------------------------------------------------------------------------------

def _rope_angles(T, D, dtype):
    """(cos θ, sin θ), each (T, D/2): θ_t,i = t · 10000^(-2i/D)."""
    if D % 2:
        raise ValueError(f"head size must be even for RoPE, got D={D}")
    freq = 10000.0 ** (-2.0 * jnp.arange(D // 2) / D)
    theta = jnp.arange(T)[:, None] * freq[None, :]
    return jnp.cos(theta).astype(dtype), jnp.sin(theta).astype(dtype)


def _rotate(x, cos, sin):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def rope_fwd(x):
    """``rot(x)``: each token's feature pairs (x1_i, x2_i) rotated by θ_t,i; (..., T, D). Saves nothing
    but the shape (the angles are recomputed)."""
    cos, sin = _rope_angles(x.shape[-2], x.shape[-1], x.dtype)
    return _rotate(x, cos, sin), x[..., :0]


def rope_bwd(shape_carrier, dy):
    cos, sin = _rope_angles(dy.shape[-2], dy.shape[-1], dy.dtype)
    return (_rotate(dy, cos, -sin),)             # rot^T = rotation by -θ


rope = manual_vjp(rope_fwd, rope_bwd, shapes=dict(x="... T D"))


def rope_ref(x):
    """Plain-jnp twin of :func:`rope`."""
    cos, sin = _rope_angles(x.shape[-2], x.shape[-1], x.dtype)
    return _rotate(x, cos, sin)


# --- RMS normalisation (QK-norm) ----------------------------------------------------------------

def rms_normalise_fwd(x, *, eps=1e-6):
    """``x̂ = x ∘ (mean_D(x²) + eps)^(-1/2)`` over the last axis. Saves x̂ (..., D) and r (..., 1)."""
    r = 1.0 / jnp.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xhat = x * r
    return xhat, (xhat, r)


def rms_normalise_bwd(eps, residuals, dy):
    xhat, r = residuals
    return (r * (dy - xhat * (dy * xhat).mean(-1, keepdims=True)),)


rms_normalise = manual_vjp(rms_normalise_fwd, rms_normalise_bwd, shapes=dict(x="... D"))


def rms_normalise_ref(x, *, eps=1e-6):
    """Plain-jnp twin of :func:`rms_normalise`."""
    return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + eps)


# --- the self-attention layer, any kind --------------------------------------------------------

KINDS = ("softmax", "alibi", "sigmoid", "rope", "qk_norm", "linear", "linear_unnormalised")


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _softmax_fwd(q, k, v, *, causal):
    out, probs = attend_fwd(q, k, v, causal=causal)
    return out, (q, k, v, probs)


def _linear_core(normalise):
    return (functools.partial(linear_attend_fwd, normalise=normalise),
            lambda causal, residuals, dout: linear_attend_bwd(causal, normalise, residuals, dout),
            functools.partial(linear_attend_ref, normalise=normalise))


# kind -> (fwd(q, k, v, *, causal) -> (out, residuals), bwd(causal, residuals, dout) -> (dq, dk, dv), ref)
_SCORE_CORES = {
    "softmax": (_softmax_fwd, lambda causal, residuals, dout: attend_bwd(*residuals, dout), attend_ref),
    "alibi": (alibi_attend_fwd, alibi_attend_bwd, alibi_attend_ref),
    "sigmoid": (sigmoid_attend_fwd, sigmoid_attend_bwd, sigmoid_attend_ref),
    "linear": _linear_core(True),
    "linear_unnormalised": _linear_core(False),
}
# kind -> (fwd, bwd, ref) of the transform applied to q and k before softmax attention
_QK_TRANSFORMS = {
    "rope": (rope_fwd, rope_bwd, rope_ref),
    "qk_norm": (rms_normalise_fwd, functools.partial(rms_normalise_bwd, 1e-6), rms_normalise_ref),
}


def _core_fwd(kind, q, k, v, causal):
    """(out, residuals) of the per-head core of ``kind``; q, k, v (B, H, T, D)."""
    if kind in _SCORE_CORES:
        return _SCORE_CORES[kind][0](q, k, v, causal=causal)
    transform_fwd = _QK_TRANSFORMS[kind][0]
    (q2, res_q), (k2, res_k) = transform_fwd(q), transform_fwd(k)
    out, core = _softmax_fwd(q2, k2, v, causal=causal)
    return out, (core, res_q, res_k)


def _core_bwd(kind, causal, residuals, dout):
    """(dq, dk, dv) of the per-head core of ``kind``."""
    if kind in _SCORE_CORES:
        return _SCORE_CORES[kind][1](causal, residuals, dout)
    transform_bwd = _QK_TRANSFORMS[kind][1]
    core, res_q, res_k = residuals
    dq2, dk2, dv = attend_bwd(*core, dout)
    return transform_bwd(res_q, dq2)[0], transform_bwd(res_k, dk2)[0], dv


def _core_ref(kind, q, k, v, causal):
    if kind in _SCORE_CORES:
        return _SCORE_CORES[kind][2](q, k, v, causal=causal)
    transform = _QK_TRANSFORMS[kind][2]
    return attend_ref(transform(q), transform(k), v, causal=causal)


def attention_variant_fwd(x, w_qkv, b_qkv, w_o, b_o, *, n_head, kind, causal=True):
    """Self-attention ``y = core(x W_qkv + b_qkv) W_o + b_o`` with the per-head core ``kind``
    (one of :data:`KINDS`). Saves x (B, T, C), the parameters and the core's residuals.

    Unlike :func:`manual_grad.layers.attention.attention`, the backward writes db_k as the
    formula gives it, ``Σ_tokens dk``, so its size can be measured for every kind.
    """
    _check_kind(kind)
    qkv, _ = linear_fwd(x, w_qkv, b_qkv)                                            # (B, T, 3C)
    q, k, v = (split_heads(part, n_head) for part in jnp.split(qkv, 3, axis=-1))   # (B, H, T, D)
    heads, core_res = _core_fwd(kind, q, k, v, causal)
    merged = merge_heads(heads)                                                     # (B, T, C)
    y, _ = linear_fwd(merged, w_o, b_o)
    return y, (x, w_qkv, b_qkv, merged, w_o, b_o, core_res)


def attention_variant_bwd(n_head, kind, causal, residuals, dy):
    x, w_qkv, b_qkv, merged, w_o, b_o, core_res = residuals
    dmerged, dw_o, db_o = linear_bwd((merged, w_o, b_o), dy)                        # (B, T, C)
    dq, dk, dv = _core_bwd(kind, causal, core_res, split_heads(dmerged, n_head))   # (B, H, T, D)
    dqkv = jnp.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], -1)  # (B, T, 3C)
    dx, dw_qkv, db_qkv = linear_bwd((x, w_qkv, b_qkv), dqkv)
    return dx, dw_qkv, db_qkv, dw_o, db_o


attention_variant = manual_vjp(attention_variant_fwd, attention_variant_bwd, shapes=ATTENTION_SHAPES)


def attention_variant_ref(x, w_qkv, b_qkv, w_o, b_o, *, n_head, kind, causal=True):
    """Plain-jnp twin of :func:`attention_variant`."""
    _check_kind(kind)
    q, k, v = (split_heads(p, n_head) for p in jnp.split(linear_ref(x, w_qkv, b_qkv), 3, axis=-1))
    return linear_ref(merge_heads(_core_ref(kind, q, k, v, causal)), w_o, b_o)
