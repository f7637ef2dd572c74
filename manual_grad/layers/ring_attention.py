"""Ring attention: the scaled dot-product core with the time axis split over a mesh axis.

Each of the n devices of the ring axis holds a block of T/n query rows and the same rows of
k and v (B, H, T/n, D). Per head, with S = q k^T / sqrt(D):

Forward (n steps):   the local queries meet every key/value block once: step r uses the block
    of device (i - r) mod n, then passes it on with ``lax.ppermute`` to i + 1. Each step gives a
    partial (out_r, lse_r) over its keys (an online softmax over key tiles); partials merge by
    lse = logaddexp(lse, lse_r),  out = out e^(lse_old - lse) + out_r e^(lse_r - lse).
    Residuals: the local q, k, v, out and lse (B, H, T/n): never a gathered K/V.
Backward (n steps):  delta = rowsum(Δ ∘ out) locally; a second ring pass recomputes
    ρ_ij = exp(S_ij - lse_i) block by block, dS = ρ ∘ (Δ v^T - delta) / sqrt(D),
    dq += dS k (stays local), dk += dS^T q and dv += ρ^T Δ ride with their k, v block;
    after n steps one more ``ppermute`` brings every dk, dv accumulator home to its owner.

Causal, load-balanced: the sequence is cut into 2n chunks of c = T/(2n) and device i holds
chunks i and 2n-1-i ("front" and "back", in that order: see :func:`ring_order`). Then:
  r = 0:           the local rows attend causally among themselves (front/front and back/back
                   on the diagonal, back/front whole; front/back lies above it: skipped);
  source < i:      all local rows against the source's front chunk (its back chunk is later
                   than both of ours: skipped);
  source > i:      our back chunk against both source chunks (our front chunk is earlier than
                   both: skipped).
Every device does 3 chunk pairs at r = 0 and 2 at every other step: equal work.
Without the causal mask the order is the natural one and every step is a whole block.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad.layers.attention import accumulation_dtype, tied, tile_scores, tile_size
from manual_grad.vjp import manual_vjp

__all__ = ["ring_attend", "ring_attend_fwd", "ring_attend_bwd", "ring_attend_ref", "ring_core",
           "ring_order"]


# --- the layout: which positions each device holds -------------------------------------

def ring_order(T: int, n: int, causal: bool) -> np.ndarray:
    """(T,) int: the position stored at each index of the split time axis (device i holds
    indices i*T/n .. (i+1)*T/n). Causal: chunks i and 2n-1-i of c = T/(2n) for device i;
    otherwise the identity. Raises ValueError when T does not split so."""
    parts = 2 * n if causal else n
    if T % parts:
        raise ValueError(f"inputs: T={T} must be divisible by {parts} to split the time axis over "
                         f"a ring of {n} devices" + (" (2 chunks per device, causal balance)" if causal else ""))
    if not causal:
        return np.arange(T)
    c = T // parts
    chunks = [np.arange(j * c, (j + 1) * c) for j in range(parts)]
    return np.concatenate([np.concatenate([chunks[i], chunks[parts - 1 - i]]) for i in range(n)])


# --- one block of keys: an online softmax over (tile, tile) tiles ------------------------

def _tiles(a, size):
    """(B, H, T, ...) -> (n_tiles, B, H, size, ...) along time, the last tile zero-padded."""
    n = -(-a.shape[2] // size)
    a = jnp.pad(a, [(0, 0), (0, 0), (0, n * size - a.shape[2])] + [(0, 0)] * (a.ndim - 3))
    return jnp.moveaxis(a.reshape(*a.shape[:2], n, size, *a.shape[3:]), 2, 0)


def _untile(a, T):
    """(n_tiles, B, H, size, ...) -> (B, H, T, ...)."""
    a = jnp.moveaxis(a, 0, 2)
    return a.reshape(*a.shape[:2], -1, *a.shape[4:])[:, :, :T]


def _sizes(Tq, Tk, tile):
    return tile_size(Tq, tile), tile_size(Tk, tile)


def _block_fwd(q, k, v, *, causal, tile):
    """(out, lse) of q (B, H, Tq, D) over k, v (B, H, Tk, D), in at least float32: for each
    query tile an online softmax over key tiles, so scores are (tile, tile), never (Tq, Tk).
    out (B, H, Tq, D), lse (B, H, Tq). Every query row must see key 0 (local indices)."""
    sizes = _sizes(q.shape[2], k.shape[2], tile)
    f32 = accumulation_dtype(q.dtype)
    kt, vt = _tiles(k, sizes[1]), _tiles(v, sizes[1])

    def query_tile(i, q_i):
        i, q_i = tied(i, q_i)

        def key_tile(carry, tile_inputs):
            acc, m, l, j = carry                                     # (B, H, bq, D), (B, H, bq) x2, ()
            j, (k_j, v_j) = tied(j, tile_inputs)
            s = tile_scores(q_i, k_j, i, j, sizes, k.shape[2], causal)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])                        # (B, H, bq, bk)
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("...qk,...kd->...qd", p.astype(v.dtype), v_j, preferred_element_type=f32)
            return (acc * correction[..., None] + pv, m_new, l * correction + p.sum(-1), j + 1), None

        init = (jnp.zeros(q_i.shape, f32), jnp.full(q_i.shape[:-1], -jnp.inf, f32), jnp.zeros(q_i.shape[:-1], f32), 0)
        (acc, m, l, _), _ = jax.lax.scan(key_tile, init, (kt, vt))
        return i + 1, (acc / l[..., None], m + jnp.log(l))

    _, (out, lse) = jax.lax.scan(query_tile, 0, _tiles(q, sizes[0]))
    return _untile(out, q.shape[2]), _untile(lse, q.shape[2])


def _block_bwd(q, k, v, dout, lse, delta, *, causal, tile):
    """This block's share of (dq, dk, dv), float32, with the whole row's lse and delta, tile by
    tile: ρ = exp(S - lse), dv = ρ^T Δ, dS = ρ ∘ (Δ v^T - delta) / sqrt(D), dq = dS k, dk = dS^T q."""
    sizes = _sizes(q.shape[2], k.shape[2], tile)
    f32 = accumulation_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    kt, vt = _tiles(k, sizes[1]), _tiles(v, sizes[1])

    def query_tile(carry, inputs):
        dk_acc, dv_acc, i = carry
        i, (q_i, dout_i, lse_i, delta_i) = tied(i, inputs)         # padded rows: q, Δ = 0 give 0

        def key_tile(carry, tile_inputs):
            dq_i, j = carry
            j, (k_j, v_j) = tied(j, tile_inputs)
            p = jnp.exp(tile_scores(q_i, k_j, i, j, sizes, k.shape[2], causal) - lse_i[..., None])  # ρ_ij
            dv_j = jnp.einsum("...qk,...qd->...kd", p.astype(dout.dtype), dout_i, preferred_element_type=f32)
            dp = jnp.einsum("...qd,...kd->...qk", dout_i, v_j, preferred_element_type=f32)        # Δ v^T
            ds = p * (dp - delta_i[..., None]) * scale                                            # dS_raw
            dq_i = dq_i + jnp.einsum("...qk,...kd->...qd", ds.astype(k.dtype), k_j, preferred_element_type=f32)
            dk_j = jnp.einsum("...qk,...qd->...kd", ds.astype(q.dtype), q_i, preferred_element_type=f32)
            return (dq_i, j + 1), (dk_j, dv_j)

        (dq_i, _), (dk, dv) = jax.lax.scan(key_tile, (jnp.zeros(q_i.shape, f32), 0), (kt, vt))
        return (dk_acc + dk, dv_acc + dv, i + 1), dq_i

    zeros = jnp.zeros(kt.shape, f32)
    rows = tuple(_tiles(a, sizes[0]) for a in (q, dout, lse, delta))
    (dk, dv, _), dq = jax.lax.scan(query_tile, (zeros, zeros, 0), rows)
    return _untile(dq, q.shape[2]), _untile(dk, k.shape[2]), _untile(dv, k.shape[2])


def _merge(out, lse, out_r, lse_r):
    """Two partial softmaxes over disjoint keys -> one: (B, H, Tq, D), (B, H, Tq)."""
    new = jnp.logaddexp(lse, lse_r)
    return out * jnp.exp(lse - new)[..., None] + out_r * jnp.exp(lse_r - new)[..., None], new


def _rows(a, start, stop, axis=-2):
    return jax.lax.slice_in_dim(a, start, stop, axis=a.ndim + axis)


def _cat(front, back, axis=-2):
    return jnp.concatenate([front, back], axis=axis)


# --- the ring, per device (inside shard_map) -------------------------------------------

def _send(axis, n, arrays):
    """Every device passes ``arrays`` to the next one on the ring: i -> i + 1 mod n."""
    return jax.lax.ppermute(arrays, axis, [(i, (i + 1) % n) for i in range(n)])


def _ring_fwd_local(q, k, v, *, axis, n, causal, tile):
    """out (B, H, Tl, D) in the accumulation dtype and lse (B, H, Tl) of the local queries."""
    me, c = jax.lax.axis_index(axis), q.shape[-2] // 2
    if causal:   # r = 0: the local rows among themselves; front/back is above the diagonal
        out, lse = _block_fwd(q, _rows(k, 0, c), _rows(v, 0, c), causal=True, tile=tile)
        out_b, lse_b = _merge(_rows(out, c, 2 * c), _rows(lse, c, 2 * c, -1),
                              *_block_fwd(_rows(q, c, 2 * c), _rows(k, c, 2 * c), _rows(v, c, 2 * c),
                                          causal=True, tile=tile))
        out, lse = _cat(_rows(out, 0, c), out_b), _cat(_rows(lse, 0, c, -1), lse_b, -1)
    else:
        out, lse = _block_fwd(q, k, v, causal=False, tile=tile)

    def earlier(out, lse, k, v):   # all our rows against the source's front chunk
        return _merge(out, lse, *_block_fwd(q, _rows(k, 0, c), _rows(v, 0, c), causal=False, tile=tile))

    def later(out, lse, k, v):     # our back chunk against both source chunks
        out_b, lse_b = _merge(_rows(out, c, 2 * c), _rows(lse, c, 2 * c, -1),
                              *_block_fwd(_rows(q, c, 2 * c), k, v, causal=False, tile=tile))
        return _cat(_rows(out, 0, c), out_b), _cat(_rows(lse, 0, c, -1), lse_b, -1)

    def step(r, carry):
        out, lse, k, v = carry
        k, v = _send(axis, n, (k, v))
        if not causal:
            return (*_merge(out, lse, *_block_fwd(q, k, v, causal=False, tile=tile)), k, v)
        source = (me - r) % n
        return (*jax.lax.cond(source < me, earlier, later, out, lse, k, v), k, v)

    out, lse, _, _ = jax.lax.fori_loop(1, n, step, (out, lse, k, v))
    return out.astype(q.dtype), lse


def _ring_bwd_local(q, k, v, out, lse, dout, *, axis, n, causal, tile):
    """(dq, dk, dv) of the local rows, each shaped and typed like its input."""
    me, c = jax.lax.axis_index(axis), q.shape[-2] // 2
    f32 = accumulation_dtype(q.dtype)
    delta = jnp.einsum("...d,...d->...", dout.astype(f32), out.astype(f32))     # (B, H, Tl)
    back = lambda a, axis=-2: _rows(a, c, 2 * c, axis)
    front = lambda a, axis=-2: _rows(a, 0, c, axis)
    if causal:   # r = 0, as in the forward
        dq, dk_f, dv_f = _block_bwd(q, front(k), front(v), dout, lse, delta, causal=True, tile=tile)
        dq_b, dk_b, dv_b = _block_bwd(back(q), back(k), back(v), back(dout), back(lse, -1), back(delta, -1),
                                      causal=True, tile=tile)
        dq, dk, dv = _cat(front(dq), back(dq) + dq_b), _cat(dk_f, dk_b), _cat(dv_f, dv_b)
    else:
        dq, dk, dv = _block_bwd(q, k, v, dout, lse, delta, causal=False, tile=tile)

    def earlier(dq, k, v, dk, dv):
        dq_r, dk_r, dv_r = _block_bwd(q, front(k), front(v), dout, lse, delta, causal=False, tile=tile)
        return dq + dq_r, _cat(front(dk) + dk_r, back(dk)), _cat(front(dv) + dv_r, back(dv))

    def later(dq, k, v, dk, dv):
        dq_r, dk_r, dv_r = _block_bwd(back(q), k, v, back(dout), back(lse, -1), back(delta, -1),
                                      causal=False, tile=tile)
        return _cat(front(dq), back(dq) + dq_r), dk + dk_r, dv + dv_r

    def step(r, carry):
        dq, k, v, dk, dv = carry
        k, v, dk, dv = _send(axis, n, (k, v, dk, dv))       # the accumulators ride with their block
        if not causal:
            dq_r, dk_r, dv_r = _block_bwd(q, k, v, dout, lse, delta, causal=False, tile=tile)
            return dq + dq_r, k, v, dk + dk_r, dv + dv_r
        dq, dk, dv = jax.lax.cond((me - r) % n < me, earlier, later, dq, k, v, dk, dv)
        return dq, k, v, dk, dv

    dq, _, _, dk, dv = jax.lax.fori_loop(1, n, step, (dq, k, v, dk, dv))
    dk, dv = _send(axis, n, (dk, dv))                          # home to their owners
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# --- the op: on the local blocks, inside shard_map over the ring axis --------------------

def ring_attend_fwd(q, k, v, *, causal=True, axis="seq", n=1, tile=128):
    """``out = ρ v`` for this device's q, k, v (B, H, T/n, D), the time axis split over the
    mesh axis ``axis`` of size ``n`` in :func:`ring_order`'s layout. Call it inside
    ``shard_map`` (or any region where ``axis`` is manual).

    Saves q, k, v, out (B, H, T/n, D) and lse (B, H, T/n) float32: this device's rows only.
    ``tile``: keys per tile inside a block (scores are (T/n, tile), never (T/n, T/n)).
    """
    if causal and q.shape[-2] % 2:
        raise ValueError(f"q: the causal ring needs an even number of local rows (2 chunks), got {q.shape[-2]}")
    out, lse = _ring_fwd_local(q, k, v, axis=axis, n=n, causal=causal, tile=tile)
    return out, (q, k, v, out, lse)


def ring_attend_bwd(causal, axis, n, tile, residuals, dout):
    """Backward of :func:`ring_attend_fwd`: ``(dq, dk, dv)``, a second pass around the ring."""
    return _ring_bwd_local(*residuals, dout, axis=axis, n=n, causal=causal, tile=tile)


_QKV = "B H T D"
ring_attend = manual_vjp(ring_attend_fwd, ring_attend_bwd, shapes=dict(q=_QKV, k=_QKV, v=_QKV))
ring_attend.output = lambda residuals: residuals[3]          # out (B, H, T/n, D), for the layer


def ring_attend_ref(q, k, v, *, causal=True, axis="seq", n=1, tile=128):
    """Plain-jnp twin of :func:`ring_attend`: gathers the whole K, V over the ring
    (``all_gather``) and masks by the stored positions."""
    T_local = q.shape[-2]
    order = jnp.asarray(ring_order(T_local * n, n, causal))
    k, v = (jax.lax.all_gather(a, axis, axis=a.ndim - 2, tiled=True) for a in (k, v))   # (B, H, T, D)
    s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=accumulation_dtype(q.dtype))
    s = s * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        q_pos = jax.lax.dynamic_slice_in_dim(order, jax.lax.axis_index(axis) * T_local, T_local)
        s = jnp.where(order[None, :] <= q_pos[:, None], s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1).astype(v.dtype) @ v


@functools.lru_cache(maxsize=None)
def ring_core(axis: str, n: int, tile: int = 128):
    """The ring with its settings bound, as self-attention's ``core``
    (``core.fwd(q, k, v, causal=)``, ``core.bwd(causal, residuals, dout)``, ``core.output``)."""
    def ring_attend_fwd_bound(q, k, v, *, causal=True):
        return ring_attend_fwd(q, k, v, causal=causal, axis=axis, n=n, tile=tile)

    def ring_attend_bwd_bound(causal, residuals, dout):
        return ring_attend_bwd(causal, axis, n, tile, residuals, dout)

    ring_attend_fwd_bound.__name__ = "ring_attend_fwd"
    core = manual_vjp(ring_attend_fwd_bound, ring_attend_bwd_bound, shapes=dict(q=_QKV, k=_QKV, v=_QKV))
    core.output = ring_attend.output
    return core
