"""Token + learned position embedding.

Forward:   x[b, t] = W_tok[ids[b, t]] + W_pos[t]                      (B, T, C)
Backward:  dW_tok = onehot(ids)^T Δ   (a scatter-add: repeated ids add, absent ids get 0)
           dW_pos[t] = Σ_b Δ[b, t] for t < T, and exactly 0 for rows t >= T.
Tangent:   dx[b, t] = dW_tok[ids[b, t]] + dW_pos[t]
The ids are integers: they get no gradient.
"""
from __future__ import annotations

import jax.numpy as jnp

from manual_grad.vjp import manual_vjp

__all__ = ["embedding", "embedding_fwd", "embedding_bwd", "embedding_jvp", "embedding_ref"]


def embedding_fwd(ids, wte, wpe):
    """``x = wte[ids] + wpe[:T]``.

    Saves the ids (B, T) and two zero-byte arrays that carry the tables' shapes and
    dtypes to the backward: O(B*T) integers, no activations.
    """
    T = ids.shape[-1]
    if T > wpe.shape[0]:
        raise ValueError(f"embedding(): ids have length T={T}, beyond the {wpe.shape[0]} positions of wpe")
    x = wte[ids] + wpe[:T]                                    # (B, T, C)
    table_shapes = (wte[:, :0], wpe[:, :0])                  # (V, 0), (T_max, 0): zero bytes
    return x, (ids, table_shapes)


def embedding_bwd(residuals, dx):
    ids, (wte_shape, wpe_shape) = residuals
    C = dx.shape[-1]
    T = ids.shape[-1]
    dx_tokens = dx.reshape(-1, C)                              # (B*T, C)
    # dW_tok = onehot(ids)^T Δ, as a scatter-add: (V, C)
    dwte = jnp.zeros((wte_shape.shape[0], C), wte_shape.dtype).at[ids.reshape(-1)].add(
        dx_tokens.astype(wte_shape.dtype))
    # dW_pos: rows 0..T-1 get Σ_batch Δ, rows >= T stay exactly 0: (T_max, C)
    dpos = dx.reshape(-1, T, C).sum(axis=0)                   # (T, C)
    dwpe = jnp.zeros((wpe_shape.shape[0], C), wpe_shape.dtype).at[:T].set(
        dpos.astype(wpe_shape.dtype))
    return None, dwte, dwpe


def embedding_jvp(residuals, tangents):
    ids, _ = residuals
    _, dwte, dwpe = tangents
    return dwte[ids] + dwpe[: ids.shape[-1]]                   # (B, T, C)


embedding = manual_vjp(embedding_fwd, embedding_bwd, jvp=embedding_jvp, shapes=dict(ids="int ... T", wte="V C", wpe="T_max C"))


def embedding_ref(ids, wte, wpe):
    """Plain-jnp twin of :func:`embedding`, differentiated by JAX."""
    return wte[ids] + wpe[: ids.shape[-1]]
