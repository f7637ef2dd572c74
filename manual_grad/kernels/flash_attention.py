"""Flash attention as Pallas kernels, forward and backward written by hand.

One head, S = q k^T / sqrt(D), ρ = softmax(mask(S)) row by row, out = ρ v (T, D):
Forward:   per query tile i, an online softmax over key tiles j <= i (all j without the
           causal mask): m = running row max, l = Σ exp(S - m), acc = Σ exp(S - m) v;
           out_i = acc / l,  lse_i = m + log l.  Saves q, k, v, out and lse (B, H, T) float32.
Backward:  delta = rowsum(Δ ∘ out)  (= rowsum(G ∘ ρ) since out = ρ v; one XLA pass),
           then, with ρ_ij = exp(S_ij - lse_i) recomputed tile by tile,
           dS_ij = ρ_ij ∘ (Δ_i v_j^T - delta_i) / sqrt(D),
           the dq kernel (grid over query tiles):    dq_i = Σ_j dS_ij k_j,
           the dk/dv kernel (grid over key tiles):   dv_j = Σ_i ρ_ij^T Δ_i,  dk_j = Σ_i dS_ij^T q_i.
No (T, T) array exists in either pass. The grid is (B·H, tiles); a program keeps its own tile in
fast memory and walks the other operand's tiles with a loop, skipping those above the causal
diagonal. T is padded to whole tiles (padded keys are masked, padded query rows carry Δ = 0 and
contribute nothing) and D to a power of two >= 16 (zero columns change no score).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from manual_grad.kernels.launch import (MASK, pad_axis, pallas_call, per_platform, pow2_at_least,
                                        round_up, tile_dot)
from manual_grad.layers.attention import attend_ref
from manual_grad.vjp import manual_vjp

__all__ = ["flash_attention", "flash_attention_fwd", "flash_attention_bwd", "flash_attention_ref",
           "BLOCKS"]

# Query/key tile per platform (read when a step is traced; tests shrink the CPU one):
# 64 keeps Triton's (64, 64) score tile in registers with D = 64;
# 128 fills the TPU's 128-lane vregs and MXU; 128 on CPU keeps the interpreter's loop short.
BLOCKS = {"cpu": 128, "cuda": 64, "tpu": 128}


class _Tiling:
    """Shapes of one call: B·H rows of the grid, the tile b, padded Tp and Dp, and the scale."""

    def __init__(self, shape, platform):
        B, H, self.T, self.D = shape
        self.BH = B * H
        self.block = min(BLOCKS[platform], pow2_at_least(self.T))
        self.Tp, self.Dp = round_up(self.T, self.block), pow2_at_least(self.D)
        self.n = self.Tp // self.block
        self.scale = 1.0 / math.sqrt(self.D)

    def pack(self, x):
        """(B, H, T, D) -> (B·H, Tp, Dp) and a row statistic (B, H, T) -> (B·H, Tp, 1), zero-padded."""
        if x.ndim == 3:
            return pad_axis(x.reshape(self.BH, self.T, 1), 1, self.Tp)
        return pad_axis(pad_axis(x.reshape(self.BH, self.T, self.D), 1, self.Tp), 2, self.Dp)

    def unpack(self, x, shape):
        """The inverse of :meth:`pack` for an array of ``shape``."""
        return (x[:, :self.T, :self.D] if len(shape) == 4 else x[:, :self.T, 0]).reshape(shape)

    def specs(self):
        """BlockSpecs: one tile of rows, the whole (padded) sequence, one tile of a row statistic."""
        b, Tp, Dp = self.block, self.Tp, self.Dp
        return (pl.BlockSpec((None, b, Dp), lambda h, i: (h, i, 0)),
                pl.BlockSpec((None, Tp, Dp), lambda h, i: (h, 0, 0)),
                pl.BlockSpec((None, b, 1), lambda h, i: (h, i, 0)),
                pl.BlockSpec((None, Tp, 1), lambda h, i: (h, 0, 0)))


def _scores(q, k, i, j, *, tiling, causal):
    """Masked S_ij = q_i k_j^T / sqrt(D) in float32: (b, Dp) x (b, Dp) -> (b, b)."""
    b = tiling.block
    s = tile_dot(q, k, (1, 1)) * tiling.scale
    rows = i * b + jax.lax.broadcasted_iota(jnp.int32, (b, b), 0)
    cols = j * b + jax.lax.broadcasted_iota(jnp.int32, (b, b), 1)
    visible = cols < tiling.T
    if causal:
        visible = visible & (cols <= rows)
    return jnp.where(visible, s, MASK)


def _tile(ref, t, b):
    """Rows t*b:(t+1)*b of a whole-sequence ref."""
    return ref[pl.ds(pl.multiple_of(t * b, b), b), :]


# --- forward ------------------------------------------------------------------------------

def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, tiling, causal):
    """One query tile i: online softmax over key tiles; writes out_i and lse_i."""
    i, b = pl.program_id(1), tiling.block
    q = q_ref[...]                                                          # (b, Dp)

    def key_tile(j, carry):
        acc, m, l = carry                                                   # (b, Dp), (b, 1), (b, 1)
        v = _tile(v_ref, j, b)
        s = _scores(q, _tile(k_ref, j, b), i, j, tiling=tiling, causal=causal)
        m_new = jnp.maximum(m, s.max(-1, keepdims=True))
        p = jnp.exp(s - m_new)                                              # (b, b)
        correction = jnp.exp(m - m_new)
        acc = acc * correction + tile_dot(p.astype(v.dtype), v)             # (b, b) x (b, Dp)
        return acc, m_new, l * correction + p.sum(-1, keepdims=True)

    init = (jnp.zeros((b, tiling.Dp), jnp.float32), jnp.full((b, 1), MASK, jnp.float32),
            jnp.zeros((b, 1), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, i + 1 if causal else tiling.n, key_tile, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _forward_on(platform, q, k, v, *, causal):
    t = _Tiling(q.shape, platform)
    row, whole, row_stat, _ = t.specs()
    out, lse = pallas_call(
        functools.partial(_forward_kernel, tiling=t, causal=causal), platform, name="flash_attention_fwd",
        grid=(t.BH, t.n), in_specs=[row, whole, whole], out_specs=[row, row_stat],
        out_shape=[jax.ShapeDtypeStruct((t.BH, t.Tp, t.Dp), q.dtype),
                   jax.ShapeDtypeStruct((t.BH, t.Tp, 1), jnp.float32)],
    )(t.pack(q), t.pack(k), t.pack(v))
    return t.unpack(out, q.shape), t.unpack(lse, q.shape[:-1])


def flash_attention_fwd(q, k, v, *, causal=True):
    """``out = ρ v`` for (B, H, T, D) q, k, v, on the platform's tiles (:data:`BLOCKS`).
    Saves q, k, v, out (B, H, T, D) and lse (B, H, T) float32."""
    out, lse = per_platform(functools.partial(_forward_on, causal=causal), q, k, v)
    return out, (q, k, v, out, lse)


# --- backward -----------------------------------------------------------------------------

def _ds(q, k, v, dout, lse, delta, i, j, *, tiling, causal):
    """ρ_ij recomputed from lse, and dS_ij = ρ_ij ∘ (Δ_i v_j^T - delta_i) / sqrt(D): (b, b) each."""
    p = jnp.exp(_scores(q, k, i, j, tiling=tiling, causal=causal) - lse)
    dp = tile_dot(dout, v, (1, 1))                                          # G = Δ_i v_j^T
    return p, p * (dp - delta) * tiling.scale


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, tiling, causal):
    """One query tile i: dq_i = Σ_j dS_ij k_j."""
    i, b = pl.program_id(1), tiling.block
    q, dout, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def key_tile(j, dq):
        k = _tile(k_ref, j, b)
        _, ds = _ds(q, k, _tile(v_ref, j, b), dout, lse, delta, i, j, tiling=tiling, causal=causal)
        return dq + tile_dot(ds.astype(k.dtype), k)                         # (b, b) x (b, Dp)

    dq = jax.lax.fori_loop(0, i + 1 if causal else tiling.n, key_tile,
                           jnp.zeros((b, tiling.Dp), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, tiling, causal):
    """One key tile j: dv_j = Σ_i ρ_ij^T Δ_i and dk_j = Σ_i dS_ij^T q_i, over query tiles i >= j."""
    j, b = pl.program_id(1), tiling.block
    k, v = k_ref[...], v_ref[...]

    def query_tile(i, carry):
        dk, dv = carry
        q, dout = _tile(q_ref, i, b), _tile(do_ref, i, b)
        p, ds = _ds(q, k, v, dout, _tile(lse_ref, i, b), _tile(delta_ref, i, b), i, j,
                    tiling=tiling, causal=causal)
        dv = dv + tile_dot(p.astype(dout.dtype), dout, (0, 0))              # ρ^T Δ: (b, Dp)
        return dk + tile_dot(ds.astype(q.dtype), q, (0, 0)), dv             # dS^T q: (b, Dp)

    zeros = jnp.zeros((b, tiling.Dp), jnp.float32)
    dk, dv = jax.lax.fori_loop(j if causal else 0, tiling.n, query_tile, (zeros, zeros))
    dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)


def _backward_on(platform, q, k, v, dout, lse, delta, *, causal):
    t = _Tiling(q.shape, platform)
    row, whole, row_stat, whole_stat = t.specs()
    packed = (t.pack(q), t.pack(k), t.pack(v), t.pack(dout), t.pack(lse), t.pack(delta))
    grads = jax.ShapeDtypeStruct((t.BH, t.Tp, t.Dp), q.dtype)
    kernel = functools.partial(_dq_kernel, tiling=t, causal=causal)
    dq = pallas_call(kernel, platform, name="flash_attention_dq", grid=(t.BH, t.n),
                     in_specs=[row, whole, whole, row, row_stat, row_stat], out_specs=row,
                     out_shape=grads)(*packed)
    kernel = functools.partial(_dkv_kernel, tiling=t, causal=causal)
    dk, dv = pallas_call(kernel, platform, name="flash_attention_dkv", grid=(t.BH, t.n),
                         in_specs=[whole, row, row, whole, whole_stat, whole_stat],
                         out_specs=[row, row], out_shape=[grads, grads])(*packed)
    return tuple(t.unpack(g, q.shape) for g in (dq, dk, dv))


def flash_attention_bwd(causal, residuals, dout):
    """Backward of :func:`flash_attention_fwd`: ``(dq, dk, dv)``, ρ recomputed tile by tile."""
    q, k, v, out, lse = residuals
    delta = jnp.einsum("...d,...d->...", dout.astype(jnp.float32), out.astype(jnp.float32))  # (B, H, T)
    return per_platform(functools.partial(_backward_on, causal=causal),
                        q, k, v, dout, lse, delta)


_QKV = "B H T D"
flash_attention = manual_vjp(flash_attention_fwd, flash_attention_bwd,
                             shapes=dict(q=_QKV, k=_QKV, v=_QKV))
flash_attention.output = lambda residuals: residuals[3]   # out (B, H, T, D), for the layer


def flash_attention_ref(q, k, v, *, causal=True):
    """Plain-jnp twin of :func:`flash_attention`."""
    return attend_ref(q, k, v, causal=causal)
