"""Self-attention over a key/value cache, for decoding (forward only: nothing trains through it).

New tokens x (B, Tn, C) at positions ``pos .. pos + Tn - 1``:

    q, k, v = split(x W_qkv + b_qkv)                     (B, H, Tn, D) each, LoRA on each part
    K[:, :, pos:pos+Tn], V[:, :, pos:pos+Tn] = k, v       the cache (B, H, S, D) is written in place
    y = softmax(q K^T / sqrt(D) + mask) V  W_o + b_o      query i sees cached positions j <= pos + i

The projections are the attention layer's (``lora_project_ref``), so a model with the cache
computes what :func:`manual_grad.layers.attention.attention_ref` computes on the whole context
(O(T) per new token instead of O(T^2)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad.layers.attention import merge_heads, split_heads
from manual_grad.layers.lora import lora_project_ref

__all__ = ["attention_cached", "empty_cache"]

QKV = ("q", "k", "v")


def empty_cache(n_layer: int, batch: int, n_head: int, size: int, head_size: int, dtype):
    """``(K, V)``, each zeros (L, B, H, S, D): one cache per block, stacked like the blocks."""
    shape = (n_layer, batch, n_head, size, head_size)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def attention_cached(x, w_qkv, b_qkv, w_o, b_o, adapters, cache, pos, *, n_head, lora_scale=1.0):
    """``(y (B, Tn, C), (K, V))``: attention of the new tokens x over the cache, which they extend."""
    k_cache, v_cache = cache
    qkv = lora_project_ref(x, w_qkv, b_qkv, {n: a for n, a in adapters.items() if n in QKV},
                           parts=QKV, scale=lora_scale)                                  # (B, Tn, 3C)
    q, k, v = (split_heads(part, n_head) for part in jnp.split(qkv, 3, axis=-1))         # (B, H, Tn, D)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), pos, axis=2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), pos, axis=2)
    # query i (position pos + i) sees cached positions j <= pos + i; later slots are not yet written
    visible = jnp.arange(k_cache.shape[2])[None, :] <= pos + jnp.arange(q.shape[2])[:, None]  # (Tn, S)
    scores = (q @ k_cache.swapaxes(-1, -2)) * (1.0 / np.sqrt(q.shape[-1]))              # (B, H, Tn, S)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    heads = merge_heads(probs @ v_cache)                                                 # (B, Tn, C)
    y = lora_project_ref(heads, w_o, b_o, {n: a for n, a in adapters.items() if n == "o"}, parts=("o",),
                         scale=lora_scale)
    return y, (k_cache, v_cache)
