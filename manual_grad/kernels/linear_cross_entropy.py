"""Logits and cross-entropy fused over vocabulary tiles, as Pallas kernels with hand-written backwards.

For N tokens x (N, C), W_out (C, V) (W_tok^T when tied: ``w`` is then the (V, C) embedding),
bias b (V,), targets t (N,) with -100 ignored, n = #counted tokens:
Forward:   per token tile, over vocabulary tiles j: z_j = x W_j + b_j (b_t, b_v) in float32,
           an online log-sum-exp (running max m, l = Σ exp(z - m)) and the target's logit;
           L = (1/n) Σ_counted (lse - z_target).  Saves x, W, b, t and lse (N,) float32:
           no (N, V) array of logits is ever written.
Backward:  Δ_z = (exp(z - lse) - onehot(t)) ∘ counted · dL / n, recomputed tile by tile,
           the dx kernel (grid over token tiles):       dx_t = Σ_j Δ_z,tj W_j^T,
           the dW/db kernel (grid over vocab tiles):    dW_j = Σ_t x_t^T Δ_z,tj,  db_j = Σ_t 1^T Δ_z,tj.
C is walked in chunks of b_c (Triton tiles are powers of two); N, V and C are zero-padded to
whole tiles, padded vocabulary columns masked, padded tokens ignored.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from manual_grad.kernels.launch import (MASK, pad_axis, pallas_call, per_platform, pow2_at_least,
                                        round_up, tile_dot)
from manual_grad.layers.loss import IGNORE_INDEX, logits_loss_ref
from manual_grad.vjp import manual_vjp

__all__ = ["linear_cross_entropy", "linear_cross_entropy_fwd", "linear_cross_entropy_bwd",
           "linear_cross_entropy_ref", "BLOCKS"]

# (token tile, vocabulary tile, channel chunk) per platform (read when a step is traced).
BLOCKS = {"cpu": (256, 512, 512), "cuda": (64, 64, 64), "tpu": (128, 512, 256)}


class _Tiling:
    """Tile sizes and padded extents of one call; loads of W's (chunk c, vocab tile j) tile."""

    def __init__(self, N, C, V, platform, tied):
        bt, bv, bc = BLOCKS[platform]
        self.N, self.C, self.V, self.tied = N, C, V, tied
        self.bt, self.bv, self.bc = (min(b, pow2_at_least(n)) for b, n in ((bt, N), (bv, V), (bc, C)))
        self.Np, self.Vp, self.Cp = round_up(N, self.bt), round_up(V, self.bv), round_up(C, self.bc)
        self.nt, self.nv, self.nc = self.Np // self.bt, self.Vp // self.bv, self.Cp // self.bc

    def pack(self, x, w, b, targets):
        """Padded x (Np, Cp), W (Cp, Vp) or (Vp, Cp) tied, b (1, Vp), targets (Np, 1)."""
        w = pad_axis(pad_axis(w, int(self.tied), self.Cp), int(not self.tied), self.Vp)   # C axis, V axis
        b = jnp.zeros((self.V,), w.dtype) if b is None else b
        return (pad_axis(pad_axis(x, 1, self.Cp), 0, self.Np), w, pad_axis(b.reshape(1, -1), 1, self.Vp),
                pad_axis(targets.reshape(-1, 1).astype(jnp.int32), 0, self.Np, IGNORE_INDEX))

    def w_tile(self, w_ref, c, j):
        """W[c-chunk, j-tile]: (bc, bv), or (bv, bc) when tied."""
        cs, vs = pl.ds(c * self.bc, self.bc), pl.ds(pl.multiple_of(j * self.bv, self.bv), self.bv)
        return w_ref[vs, cs] if self.tied else w_ref[cs, vs]

    def logits(self, x_chunk, w_ref, b_ref, j):
        """z_tj = x_t W_j + b_j in float32, padded columns masked: (bt, bv)."""
        z = b_ref[:, pl.ds(pl.multiple_of(j * self.bv, self.bv), self.bv)].astype(jnp.float32)
        for c in range(self.nc):
            z = z + tile_dot(x_chunk(c), self.w_tile(w_ref, c, j), (1, 1) if self.tied else (1, 0))
        return jnp.where(self.columns(j) < self.V, z, MASK)

    def columns(self, j):
        return j * self.bv + jax.lax.broadcasted_iota(jnp.int32, (1, self.bv), 1)

    def dlogits(self, x_chunk, w_ref, b_ref, j, targets, lse, weight):
        """Δ_z,tj = (exp(z - lse) - onehot(t)) ∘ weight, with weight = counted · dL / n: (bt, bv)."""
        p = jnp.exp(self.logits(x_chunk, w_ref, b_ref, j) - lse)
        return (p - (self.columns(j) == targets).astype(jnp.float32)) * weight


# --- forward ------------------------------------------------------------------------------

def _forward_kernel(x_ref, w_ref, b_ref, t_ref, lse_ref, zt_ref, *, tiling):
    """One token tile: online log-sum-exp over the vocabulary tiles, and the target's logit."""
    t = tiling
    targets = t_ref[...]                                                    # (bt, 1)

    def vocab_tile(j, carry):
        m, l, z_target = carry                                              # (bt, 1) each
        z = t.logits(lambda c: x_ref[:, pl.ds(c * t.bc, t.bc)], w_ref, b_ref, j)
        m_new = jnp.maximum(m, z.max(-1, keepdims=True))
        l = l * jnp.exp(m - m_new) + jnp.exp(z - m_new).sum(-1, keepdims=True)
        z_target = z_target + jnp.where(t.columns(j) == targets, z, 0.0).sum(-1, keepdims=True)
        return m_new, l, z_target

    zeros = jnp.zeros((t.bt, 1), jnp.float32)
    m, l, z_target = jax.lax.fori_loop(0, t.nv, vocab_tile, (zeros + MASK, zeros, zeros))
    lse_ref[...], zt_ref[...] = m + jnp.log(l), z_target


def _forward_on(platform, x, w, b, targets, *, tied):
    t = _Tiling(*x.shape, w.shape[0 if tied else 1], platform, tied)
    x, w, b, targets = t.pack(x, w, b, targets)
    per_token = pl.BlockSpec((t.bt, 1), lambda i: (i, 0))
    lse, z_target = pallas_call(
        functools.partial(_forward_kernel, tiling=t), platform, name="linear_cross_entropy_fwd",
        grid=(t.nt,), in_specs=[pl.BlockSpec((t.bt, t.Cp), lambda i: (i, 0)),
                                pl.BlockSpec(w.shape, lambda i: (0, 0)),
                                pl.BlockSpec(b.shape, lambda i: (0, 0)), per_token],
        out_specs=[per_token, per_token], out_shape=[jax.ShapeDtypeStruct((t.Np, 1), jnp.float32)] * 2,
    )(x, w, b, targets)
    return lse[:t.N, 0], z_target[:t.N, 0]


def _flat(x, targets):
    """(..., C) -> (N, C) and (...) -> (N,)."""
    return x.reshape(-1, x.shape[-1]), targets.reshape(-1)


def linear_cross_entropy_fwd(x, w, b, targets, *, tied=False):
    """Mean cross-entropy of ``z = x W_out + b`` against ``targets`` (-100 ignored), without
    materialising z. ``w``: (C, V), or the (V, C) embedding when ``tied``; ``b`` (V,) or None.
    Saves x, w, b, targets and the per-token log-sum-exp (N,) float32."""
    x2, t2 = _flat(x, targets)
    lse, z_target = per_platform(functools.partial(_forward_on, tied=tied), x2, w, b, t2)
    counted = t2 != IGNORE_INDEX
    loss = jnp.where(counted, lse - z_target, 0.0).sum() / jnp.maximum(counted.sum(), 1)
    return loss, (x, w, b, targets, lse)


# --- backward -----------------------------------------------------------------------------

def _dx_kernel(x_ref, w_ref, b_ref, t_ref, lse_ref, wt_ref, dx_ref, *, tiling):
    """One token tile: dx_t = Σ_j Δ_z,tj W_j^T, one (bt, bc) accumulator per chunk of C."""
    t = tiling
    targets, lse, weight = t_ref[...], lse_ref[...], wt_ref[...]

    def vocab_tile(j, dx):
        dz = t.dlogits(lambda c: x_ref[:, pl.ds(c * t.bc, t.bc)], w_ref, b_ref, j, targets, lse, weight)
        dz = dz.astype(w_ref.dtype)
        return tuple(dx[c] + tile_dot(dz, t.w_tile(w_ref, c, j), (1, 0) if t.tied else (1, 1))
                     for c in range(t.nc))                                  # (bt, bv) x (bv, bc)

    dx = jax.lax.fori_loop(0, t.nv, vocab_tile, (jnp.zeros((t.bt, t.bc), jnp.float32),) * t.nc)
    for c in range(t.nc):
        dx_ref[:, pl.ds(c * t.bc, t.bc)] = dx[c].astype(dx_ref.dtype)


def _dw_kernel(x_ref, w_ref, b_ref, t_ref, lse_ref, wt_ref, dw_ref, db_ref, *, tiling):
    """One vocabulary tile j: dW_j = Σ_t x_t^T Δ_z,tj and db_j = Σ_t 1^T Δ_z,tj."""
    t, j = tiling, pl.program_id(0)

    def token_tile(i, carry):
        dw, db = carry
        rows = pl.ds(pl.multiple_of(i * t.bt, t.bt), t.bt)
        x_chunk = lambda c: x_ref[rows, pl.ds(c * t.bc, t.bc)]             # noqa: E731
        dz = t.dlogits(x_chunk, w_ref, b_ref, j, t_ref[rows, :], lse_ref[rows, :], wt_ref[rows, :])
        db = db + dz.sum(0, keepdims=True)
        dz = dz.astype(x_ref.dtype)
        return tuple(dw[c] + (tile_dot(dz, x_chunk(c), (0, 0)) if t.tied else tile_dot(x_chunk(c), dz, (0, 0)))
                     for c in range(t.nc)), db

    shape = (t.bv, t.bc) if t.tied else (t.bc, t.bv)
    dw, db = jax.lax.fori_loop(0, t.nt, token_tile,
                               ((jnp.zeros(shape, jnp.float32),) * t.nc, jnp.zeros((1, t.bv), jnp.float32)))
    for c in range(t.nc):
        cs = pl.ds(c * t.bc, t.bc)
        if t.tied:
            dw_ref[:, cs] = dw[c].astype(dw_ref.dtype)
        else:
            dw_ref[cs, :] = dw[c].astype(dw_ref.dtype)
    db_ref[...] = db.astype(db_ref.dtype)


def _backward_on(platform, x, w, b, targets, lse, weight, *, tied):
    t = _Tiling(*x.shape, w.shape[0 if tied else 1], platform, tied)
    x, w, b, targets = t.pack(x, w, b, targets)
    lse, weight = (pad_axis(a.reshape(-1, 1), 0, t.Np) for a in (lse, weight))
    args = (x, w, b, targets, lse, weight)
    whole = [pl.BlockSpec(a.shape, lambda i: (0, 0)) for a in args]
    token_tile = pl.BlockSpec((t.bt, t.Cp), lambda i: (i, 0))
    per_token = pl.BlockSpec((t.bt, 1), lambda i: (i, 0))
    dx = pallas_call(functools.partial(_dx_kernel, tiling=t), platform, name="linear_cross_entropy_dx",
                     grid=(t.nt,), in_specs=[token_tile, *whole[1:3], per_token, per_token, per_token],
                     out_specs=token_tile, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(*args)
    dw_tile = (pl.BlockSpec((t.bv, t.Cp), lambda j: (j, 0)) if tied
               else pl.BlockSpec((t.Cp, t.bv), lambda j: (0, j)))
    dw, db = pallas_call(
        functools.partial(_dw_kernel, tiling=t), platform, name="linear_cross_entropy_dw",
        grid=(t.nv,), in_specs=whole, out_specs=[dw_tile, pl.BlockSpec((1, t.bv), lambda j: (0, j))],
        out_shape=[jax.ShapeDtypeStruct(w.shape, w.dtype), jax.ShapeDtypeStruct(b.shape, jnp.float32)],
    )(*args)
    dw = dw[:t.V, :t.C] if tied else dw[:t.C, :t.V]
    return dx[:t.N, :t.C], dw, db[0, :t.V]


def linear_cross_entropy_bwd(tied, residuals, dloss):
    """Backward of :func:`linear_cross_entropy_fwd`: ``(dx, dw, db, None)``."""
    x, w, b, targets, lse = residuals
    x2, t2 = _flat(x, targets)
    counted = t2 != IGNORE_INDEX
    weight = counted * (dloss / jnp.maximum(counted.sum(), 1)).astype(jnp.float32)      # (N,)
    dx, dw, db = per_platform(functools.partial(_backward_on, tied=tied), x2, w, b, t2, lse, weight)
    return dx.reshape(x.shape), dw, None if b is None else db.astype(b.dtype), None


linear_cross_entropy = manual_vjp(
    linear_cross_entropy_fwd, linear_cross_entropy_bwd,
    shapes=lambda tied: dict(x="... C", w="V C" if tied else "C V", b="optional V", targets="int ..."))


def linear_cross_entropy_ref(x, w, b, targets, *, tied=False):
    """Plain-jnp twin of :func:`linear_cross_entropy`."""
    return logits_loss_ref(x, w, b, targets, {}, tied=tied)
