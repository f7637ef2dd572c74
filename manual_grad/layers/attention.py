"""Multi-head (causal) self-attention, and the scaled dot-product core it shares with
cross-attention.

One head, with S = q k^T / sqrt(D) and ρ = softmax(mask(S)) row by row:
Forward:   out = ρ v                                                   (T, D)
Backward:  dv = ρ^T Δ;   G = Δ v^T;   dS = (G - rowsum(G ∘ ρ)) ∘ ρ     (each row of dS sums to 0)
           dS_raw = dS / sqrt(D);   dq = dS_raw k;   dk = dS_raw^T q
Masked entries need no special case: ρ is 0 there, so dS is 0 there.
Tangent:   dS = (dq k^T + q dk^T) / sqrt(D);   dρ = (dS - rowsum(dS ∘ ρ)) ∘ ρ;   dout = dρ v + ρ dv
           (dρ is the softmax backward applied to dS: the softmax Jacobian is symmetric)

The layer: [q | k | v] = x W_qkv + b_qkv (columns of head h at h*D:(h+1)*D of each part);
heads run side by side on a head axis; y = merge(heads) W_o + b_o. Its backward runs the output
projection's backward, every head's softmax backward at once, then the input projection's.
The key bias gets exactly zero gradient: db_k = 1^T (dS_raw^T q) = (dS_raw 1)^T q = 0 because
every row of dS sums to 0 (q b_k^T shifts a row of scores by a constant, which softmax ignores).
The backward writes that exact 0 instead of summing rounding noise.

Two backwards, chosen by the static ``backward``: ``"paper"`` saves ρ (B, H, T, T);
``"lean"`` is the flash-attention one, which saves only the per-row log-sum-exp (B, H, T)
and recomputes ρ on (tile, tile) tiles, skipping tiles above the causal diagonal. Scores, softmax and accumulations run in at least float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad.config import BACKWARDS, check_choice
from manual_grad.layers.lora import lora_project_bwd, lora_project_fwd, lora_project_jvp, lora_project_ref
from manual_grad.vjp import forward_mode_error, manual_vjp

__all__ = ["attention", "attention_fwd", "attention_bwd", "attention_ref",
           "attention_jvp", "attend_fwd", "attend_bwd", "attend_jvp", "attend_ref", "softmax_bwd", "flash_attend_fwd",
           "flash_attend_bwd",
           "split_heads", "merge_heads", "causal_mask"]


# --- shape helpers ---------------------------------------------------------------------

def accumulation_dtype(dtype):
    """float32 for half-precision inputs (bf16, f16), else the input's own dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def split_heads(x, n_head):
    """(B, T, C) -> (B, H, T, D)."""
    *batch, T, C = x.shape
    if n_head < 1 or C % n_head:
        raise ValueError(f"n_head must be a positive divisor of the width C={C}, got {n_head}")
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
    """ρ = softmax(mask(q k^T / sqrt(D))): (B, H, Tq, D) x (B, H, Tk, D) -> (B, H, Tq, Tk),
    computed in at least float32."""
    scores = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=accumulation_dtype(q.dtype))
    scores = scores * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        scores = jnp.where(causal_mask(q.shape[-2], k.shape[-2]), scores, -jnp.inf)
    scores = scores - scores.max(-1, keepdims=True)
    e = jnp.exp(scores)
    return e / e.sum(-1, keepdims=True)


def attend_fwd(q, k, v, *, causal):
    """``out = ρ v``; returns ``(out (B, H, Tq, D), ρ (B, H, Tq, Tk))``."""
    probs = _probs(q, k, causal)
    return probs.astype(v.dtype) @ v, probs                         # (Tq, Tk) x (Tk, D) -> (Tq, D)


def softmax_bwd(probs, dprobs):
    """dS = (G - rowsum(G ∘ ρ)) ∘ ρ with G = dL/dρ: the softmax backward, row by row."""
    return (dprobs - (dprobs * probs).sum(-1, keepdims=True)) * probs


def attend_bwd(q, k, v, probs, dout):
    """Backward of :func:`attend_fwd`: ``(dq, dk, dv)``, each shaped like its input."""
    acc = probs.dtype
    dv = jnp.einsum("...qk,...qd->...kd", probs, dout, preferred_element_type=acc)   # ρ^T Δ: (Tk, D)
    dprobs = jnp.einsum("...qd,...kd->...qk", dout, v, preferred_element_type=acc)   # G = Δ v^T: (Tq, Tk)
    dscores = softmax_bwd(probs, dprobs) * (1.0 / math.sqrt(q.shape[-1]))          # dS_raw: (Tq, Tk)
    dq = jnp.einsum("...qk,...kd->...qd", dscores, k, preferred_element_type=acc)    # dS_raw k: (Tq, D)
    dk = jnp.einsum("...qk,...qd->...kd", dscores, q, preferred_element_type=acc)    # dS_raw^T q: (Tk, D)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def attend_jvp(q, k, v, probs, dq, dk, dv):
    """Tangent of :func:`attend_fwd`'s output from the tangents of q, k, v: (B, H, Tq, D)."""
    acc = probs.dtype
    dscores = (jnp.einsum("...qd,...kd->...qk", dq, k, preferred_element_type=acc)
               + jnp.einsum("...qd,...kd->...qk", q, dk, preferred_element_type=acc))    # (Tq, Tk)
    dprobs = softmax_bwd(probs, dscores * (1.0 / math.sqrt(q.shape[-1])))              # dρ: (Tq, Tk)
    dout = (jnp.einsum("...qk,...kd->...qd", dprobs, v, preferred_element_type=acc)
            + jnp.einsum("...qk,...kd->...qd", probs, dv, preferred_element_type=acc))  # dρ v + ρ dv
    return dout.astype(v.dtype)


def attend_ref(q, k, v, *, causal):
    """Plain-jnp twin of :func:`attend_fwd`'s output."""
    return _probs(q, k, causal).astype(v.dtype) @ v


# --- the same core, tiled: flash attention ---------------------------------------------
#
# Forward: tiles (query block i, key block j) with an online softmax; keeps only out and the
# per-row log-sum-exp  lse = m + log Σ_j exp(S_ij - m)  (B, H, T): never the (T, T) matrix.
# Backward: recomputes ρ_ij = exp(S_ij - lse_i) tile by tile, with delta = rowsum(Δ ∘ out)
# (= rowsum(G ∘ ρ), since out = ρ v):  dS_ij = ρ_ij ∘ (Δ_i v_j^T - delta_i).
# With a causal mask the tiles above the diagonal are skipped, in both passes.

def tied(index, arrays):
    """``(index, arrays)`` through an optimization barrier: a tile's index then depends on the
    loop's data, so neither JAX (partial evaluation under ``grad``) nor XLA hoists the masks
    built from it out of the tile loop into a stacked (n_tiles, ..., b, b) array."""
    return jax.lax.optimization_barrier((index, arrays))


def _tile_pairs(n_blocks, causal):
    """(n_tiles, 2) int array of (query block, key block), rows in query-block order."""
    return np.array([(i, j) for i in range(n_blocks) for j in range(n_blocks) if not causal or j <= i],
                    np.int32)


def _pad_time(x, padded):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, padded - x.shape[-2]), (0, 0)])


def tile_scores(q_i, k_j, i, j, sizes, Tk, causal):
    """Masked S = q_i k_j^T / sqrt(D), in at least float32: (B, H, bq, D) x (B, H, bk, D) ->
    (B, H, bq, bk), for query tile i and key tile j of ``sizes = (bq, bk)``. Key index
    j*bk + t is visible when < Tk and, causal, <= the query's index i*bq + s."""
    s = jnp.einsum("...qd,...kd->...qk", q_i, k_j, preferred_element_type=accumulation_dtype(q_i.dtype))
    s = s * (1.0 / math.sqrt(q_i.shape[-1]))
    if not causal and Tk % sizes[1] == 0:
        return s                                                     # no mask, no padded key
    k_idx = j * sizes[1] + jnp.arange(sizes[1])[None, :]
    visible = k_idx < Tk
    if causal:
        visible = visible & (i * sizes[0] + jnp.arange(sizes[0])[:, None] >= k_idx)
    return jnp.where(visible, s, -jnp.inf)


def _rows(x, i, block):
    """Rows i*block:(i+1)*block of the time axis (axis 2 of (B, H, T, ...))."""
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=2)


def _add_rows(acc, i, block, update):
    return jax.lax.dynamic_update_slice_in_dim(acc, _rows(acc, i, block) + update, i * block, axis=2)


def tile_size(T, block):
    """The tile actually used for length T: at most ``block``, balanced so that the last tile
    is padded by as few rows as possible (T itself when T <= block)."""
    n_blocks = -(-T // block)
    return -(-T // n_blocks)


def flash_attend_fwd(q, k, v, *, causal, block):
    """``out = ρ v`` tile by tile; returns ``(out (B, H, T, D), lse (B, H, T) float32)``."""
    T = q.shape[-2]
    block = tile_size(T, block)
    n_blocks = -(-T // block)
    q, k, v = (_pad_time(a, n_blocks * block) for a in (q, k, v))
    f32 = accumulation_dtype(q.dtype)

    def tile(carry, pair):
        (i, j), (acc, m, l) = tied((pair[0], pair[1]), carry)   # (B, H, Tp, D), (B, H, Tp) x2
        s = tile_scores(_rows(q, i, block), _rows(k, j, block), i, j, (block, block), T, causal)
        m_old, l_old = _rows(m, i, block), _rows(l, i, block)    # (B, H, b)
        m_new = jnp.maximum(m_old, s.max(-1))               # key 0 is visible to every row: finite
        p = jnp.exp(s - m_new[..., None])                   # (B, H, b, b)
        correction = jnp.exp(m_old - m_new)
        pv = jnp.einsum("...qk,...kd->...qd", p.astype(v.dtype), _rows(v, j, block),
                        preferred_element_type=f32)
        acc_i = _rows(acc, i, block) * correction[..., None] + pv
        acc = jax.lax.dynamic_update_slice_in_dim(acc, acc_i, i * block, axis=2)
        m = jax.lax.dynamic_update_slice_in_dim(m, m_new, i * block, axis=2)
        l = jax.lax.dynamic_update_slice_in_dim(l, l_old * correction + p.sum(-1), i * block, axis=2)
        return (acc, m, l), None

    init = (jnp.zeros(q.shape, f32), jnp.full(q.shape[:-1], -jnp.inf, f32), jnp.zeros(q.shape[:-1], f32))
    (acc, m, l), _ = jax.lax.scan(tile, init, _tile_pairs(n_blocks, causal))
    out = (acc / l[..., None]).astype(q.dtype)[..., :T, :]
    return out, (m + jnp.log(l))[..., :T]


def flash_attend_bwd(q, k, v, out, lse, dout, *, causal, block):
    """Backward of :func:`flash_attend_fwd`: ``(dq, dk, dv)``, ρ recomputed tile by tile."""
    T = q.shape[-2]
    block = tile_size(T, block)
    n_blocks = -(-T // block)
    Tp = n_blocks * block
    f32 = accumulation_dtype(q.dtype)
    delta = jnp.einsum("...d,...d->...", dout.astype(f32), out.astype(f32))       # (B, H, T)
    q, k, v, dout = (_pad_time(a, Tp) for a in (q, k, v, dout))
    lse, delta = (jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, Tp - T)]) for a in (lse, delta))
    scale = 1.0 / math.sqrt(q.shape[-1])

    def tile(carry, pair):
        (i, j), (dq, dk, dv) = tied((pair[0], pair[1]), carry)           # float32 (B, H, Tp, D)
        q_i, k_j, v_j, dout_i = _rows(q, i, block), _rows(k, j, block), _rows(v, j, block), _rows(dout, i, block)
        s = tile_scores(q_i, k_j, i, j, (block, block), T, causal)
        p = jnp.exp(s - _rows(lse, i, block)[..., None])                     # ρ_ij: (B, H, b, b)
        dv = _add_rows(dv, j, block, jnp.einsum("...qk,...qd->...kd", p.astype(dout.dtype), dout_i,
                                                 preferred_element_type=f32))   # ρ^T Δ
        dp = jnp.einsum("...qd,...kd->...qk", dout_i, v_j, preferred_element_type=f32)   # G = Δ v^T
        ds = p * (dp - _rows(delta, i, block)[..., None]) * scale           # dS_raw: (B, H, b, b)
        dq = _add_rows(dq, i, block, jnp.einsum("...qk,...kd->...qd", ds.astype(k.dtype), k_j,
                                                 preferred_element_type=f32))
        dk = _add_rows(dk, j, block, jnp.einsum("...qk,...qd->...kd", ds.astype(q.dtype), q_i,
                                                 preferred_element_type=f32))
        return (dq, dk, dv), None

    zeros = jnp.zeros(q.shape, f32)
    (dq, dk, dv), _ = jax.lax.scan(tile, (zeros, zeros, zeros), _tile_pairs(n_blocks, causal))
    return tuple(g[..., :T, :].astype(a.dtype) for g, a in ((dq, q), (dk, k), (dv, v)))


# --- the self-attention layer ----------------------------------------------------------

QKV = ("q", "k", "v")


def _split_adapters(adapters):
    unknown = set(adapters) - {"q", "k", "v", "o"}
    if unknown:
        raise ValueError(f"adapters: unknown attention adapter(s) {sorted(unknown)}; "
                         "expected a subset of 'q', 'k', 'v', 'o'")
    return ({k: v for k, v in adapters.items() if k in QKV},
            {k: v for k, v in adapters.items() if k == "o"})


def attention_fwd(x, w_qkv, b_qkv, w_o, b_o, adapters, *, n_head, causal=True, lora_scale=1.0,
                  backward="paper", tile=128, core=None):
    """Multi-head self-attention ``y = attend(x W_qkv + b_qkv) W_o + b_o``.

    ``adapters``: optional LoRA adapters named "q", "k", "v" (on W_qkv's parts) and "o".
    ``backward="paper"`` saves x (B, T, C), q, k, v, the heads' output (B, H, T, D) and
    ρ (B, H, T, T). ``backward="lean"`` (flash) saves the same but the per-row log-sum-exp
    (B, H, T) instead of ρ, and works on (tile, tile) tiles in both passes.
    ``core``: another op on (q, k, v) with the setting ``causal``, made by ``manual_vjp``
    (a fused kernel, :mod:`manual_grad.kernels`), whose fwd and bwd replace the core's (its
    ``packed`` ones when it has them: they take qkv whole and return dqkv, so no split or
    concatenation is made). The layer saves the core's residuals alone (q, k, v and the heads'
    output are among them, read back with ``core.output``); the other paths save the merged
    heads (B, T, C) for W_o's backward.
    """
    check_choice("backward", backward, BACKWARDS)
    qkv_adapters, o_adapters = _split_adapters(adapters)
    qkv, xa_qkv = lora_project_fwd(x, w_qkv, b_qkv, qkv_adapters, parts=QKV, scale=lora_scale)
    q, k, v = (split_heads(part, n_head) for part in jnp.split(qkv, 3, axis=-1))   # (B, H, T, D)
    if _packed(core) is not None:                              # the kernel reads qkv in place
        heads, softmax_state = core.packed.fwd(qkv.reshape(*qkv.shape[:-1], 3, n_head, -1), causal=causal)
    elif core is not None:
        heads, softmax_state = core.fwd(q, k, v, causal=causal)                      # the core's own
    elif backward == "paper":
        heads, softmax_state = attend_fwd(q, k, v, causal=causal)                    # ρ
    else:
        heads, softmax_state = flash_attend_fwd(q, k, v, causal=causal, block=tile)  # lse
    merged = merge_heads(heads)                                                      # (B, T, C)
    y, xa_o = lora_project_fwd(merged, w_o, b_o, o_adapters, parts=("o",), scale=lora_scale)
    if core is not None:
        q = k = v = merged = None                             # the core's residuals hold them
    return y, (x, q, k, v, merged, softmax_state, w_qkv, b_qkv, w_o, b_o, adapters, xa_qkv, xa_o)


def _packed(core):
    """A core's entry points on q, k, v packed as the projection makes them, qkv (B, T, 3, H, D),
    and on dqkv (:class:`manual_grad.kernels.cpu_attention.PackedCore`), or None."""
    return getattr(core, "packed", None)


def _merged_heads(merged, softmax_state, core):
    """The merged heads (B, T, C): saved by the layer, or read from a core's residuals."""
    return merge_heads(core.output(softmax_state)) if merged is None else merged


def attention_bwd(n_head, causal, lora_scale, backward, tile, core, residuals, dy):
    x, q, k, v, merged, softmax_state, w_qkv, b_qkv, w_o, b_o, adapters, xa_qkv, xa_o = residuals
    qkv_adapters, o_adapters = _split_adapters(adapters)
    merged = _merged_heads(merged, softmax_state, core)
    dmerged, dw_o, db_o, do_adapters = lora_project_bwd(
        merged, w_o, b_o, o_adapters, xa_o, dy, parts=("o",), scale=lora_scale)        # (B, T, C)
    dheads = split_heads(dmerged, n_head)                                             # (B, H, T, D)
    if _packed(core) is not None:                              # the kernel writes dqkv in place
        dqkv = core.packed.bwd(causal, softmax_state, dheads).reshape(dmerged.shape[:-1] + (-1,))
    else:
        if core is not None:
            dq, dk, dv = core.bwd(causal, softmax_state, dheads)
        elif backward == "paper":
            dq, dk, dv = attend_bwd(q, k, v, softmax_state, dheads)
        else:
            dq, dk, dv = flash_attend_bwd(q, k, v, split_heads(merged, n_head), softmax_state, dheads,
                                          causal=causal, block=tile)
        dqkv = jnp.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], -1)   # (B, T, 3C)
    dx, dw_qkv, db_qkv, dqkv_adapters = lora_project_bwd(
        x, w_qkv, b_qkv, qkv_adapters, xa_qkv, dqkv, parts=QKV, scale=lora_scale)
    if db_qkv is not None:
        C = x.shape[-1]
        db_qkv = db_qkv.at[C:2 * C].set(0)       # db_k = (dS_raw 1)^T q = 0 exactly
    return dx, dw_qkv, db_qkv, dw_o, db_o, {**dqkv_adapters, **do_adapters}


# The inputs of self-attention (and of its variants): checked when the op is called.
ATTENTION_SHAPES = dict(x="B T C", w_qkv="C 3*C", b_qkv="optional 3*C", w_o="C C", b_o="optional C")


def attention_jvp(residuals, tangents, *, n_head, causal=True, lora_scale=1.0, core=None, **_):
    """Tangent of the layer. With the flash backward ρ is rebuilt whole from q and k, so forward
    mode holds a (B, H, T, T) array (reverse mode does not)."""
    x, q, k, v, merged, softmax_state, w_qkv, b_qkv, w_o, b_o, adapters, xa_qkv, xa_o = residuals
    dx, dw_qkv, db_qkv, dw_o, db_o, dadapters = tangents
    (qkv_adapters, o_adapters), (dqkv_adapters, do_adapters) = _split_adapters(adapters), _split_adapters(dadapters)
    dqkv = lora_project_jvp(x, w_qkv, b_qkv, qkv_adapters, xa_qkv, dx, dw_qkv, db_qkv, dqkv_adapters,
                            parts=QKV, scale=lora_scale)                                 # (B, T, 3C)
    dq, dk, dv = (split_heads(part, n_head) for part in jnp.split(dqkv, 3, axis=-1))     # (B, H, T, D)
    if core is not None:
        if core.jvp is None:
            raise forward_mode_error(f"attention (core {core.__name__})")
        dheads = core.jvp(softmax_state, (dq, dk, dv), causal=causal)
    else:
        probs = softmax_state if softmax_state.ndim == q.ndim else _probs(q, k, causal)  # ρ, or from lse
        dheads = attend_jvp(q, k, v, probs, dq, dk, dv)
    return lora_project_jvp(_merged_heads(merged, softmax_state, core), w_o, b_o, o_adapters, xa_o,
                            merge_heads(dheads),
                            dw_o, db_o, do_adapters, parts=("o",), scale=lora_scale)


attention = manual_vjp(attention_fwd, attention_bwd, jvp=attention_jvp, shapes=ATTENTION_SHAPES)


def attention_ref(x, w_qkv, b_qkv, w_o, b_o, adapters, *, n_head, causal=True, lora_scale=1.0,
                  backward="paper", tile=128, core=None):
    """Plain-jnp twin of :func:`attention` (``backward``, ``tile`` and ``core`` only change the manual op)."""
    qkv_adapters, o_adapters = _split_adapters(adapters)
    qkv = lora_project_ref(x, w_qkv, b_qkv, qkv_adapters, parts=QKV, scale=lora_scale)
    q, k, v = (split_heads(part, n_head) for part in jnp.split(qkv, 3, axis=-1))
    merged = merge_heads(attend_ref(q, k, v, causal=causal))
    return lora_project_ref(merged, w_o, b_o, o_adapters, parts=("o",), scale=lora_scale)
