"""Autoregressive sampling with a key/value cache.

The prompt is run once through the model's own blocks and head (:func:`manual_grad.model.blocks`
with a cache, the plain-jnp ops), writing every block's keys and values into a fixed-size
cache (L, B, H, S, D); each new token then costs one position: its q, k, v are
computed, k and v are written at its position, and q attends over the cached positions
``<= t`` (O(T) per token instead of O(T^2)). Shapes are static, the loop is ``lax.fori_loop``
and the whole of :func:`generate` is jitted.

Context longer than ``block_size``: like nanoGPT, the context is cropped to the last
``block_size`` tokens. Positions then shift at every step (the learned position embedding is
absolute), so cached keys no longer apply: from that point each token recomputes the cropped
window in full, which gives exactly nanoGPT's ``idx[:, -block_size:]`` logits.

Sampling: logits / temperature, optionally restricted to the ``top_k`` largest, then a
categorical draw; ``temperature=0`` is greedy (argmax).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad.config import GPTConfig
from manual_grad.layers.kv_cache import empty_cache
from manual_grad.model import blocks, head

__all__ = ["generate", "sample_logits"]


def _run(params, cfg: GPTConfig, tokens, pos, cache):
    """Logits (B, V) of the last of ``tokens`` (B, Tn) placed at positions pos.., and the cache:
    the model's own blocks and head (the plain-jnp ops), attending over the cache."""
    positions = pos + jnp.arange(tokens.shape[1])
    x = params["wte"][tokens] + params["wpe"][positions]                               # (B, Tn, C)
    x, cache = blocks(params, x, cfg, "autodiff", cache=cache, pos=pos)
    return head(params, x[:, -1], cfg, "autodiff"), cache                              # (B, V)


def _empty_cache(cfg: GPTConfig, batch: int, size: int, dtype):
    return empty_cache(cfg.n_layer, batch, cfg.n_head, size, cfg.head_size, dtype)     # (L, B, H, S, D)


def sample_logits(logits, key, temperature, top_k: int | None):
    """Token ids (B,) drawn from ``softmax(logits / temperature)`` over the ``top_k`` largest
    logits; argmax where ``temperature == 0``."""
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]                                 # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    drawn = jax.random.categorical(key, scaled.astype(jnp.float32), axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k"))
def _generate(params, cfg: GPTConfig, prompt, max_new_tokens: int, key, temperature, top_k):
    B, T0 = prompt.shape
    T, total = cfg.block_size, prompt.shape[1] + max_new_tokens
    dtype = params["wte"].dtype
    tokens = jnp.zeros((B, total), jnp.int32).at[:, :T0].set(prompt)
    all_logits = jnp.zeros((B, max_new_tokens, cfg.vocab_size), jnp.float32)

    def emit(n, logits, tokens, all_logits):
        """Draws token n from the logits of the context before it."""
        token = sample_logits(logits, jax.random.fold_in(key, n), temperature, top_k)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], n, axis=1)
        all_logits = jax.lax.dynamic_update_slice_in_dim(
            all_logits, logits[:, None].astype(jnp.float32), n - T0, axis=1)
        return tokens, all_logits

    n = T0                                   # index of the next token to draw
    if T0 <= T:
        # Cached phase: tokens T0 .. min(T, total - 1) see their whole context from position 0.
        cache = _empty_cache(cfg, B, min(T, total - 1), dtype)
        logits, cache = _run(params, cfg, prompt, 0, cache)
        tokens, all_logits = emit(n, logits, tokens, all_logits)
        last_cached = min(T, total - 1)

        def decode(n, carry):
            tokens, all_logits, cache = carry
            previous = jax.lax.dynamic_slice_in_dim(tokens, n - 1, 1, axis=1)        # (B, 1)
            logits, cache = _run(params, cfg, previous, n - 1, cache)
            return (*emit(n, logits, tokens, all_logits), cache)

        tokens, all_logits, _ = jax.lax.fori_loop(n + 1, last_cached + 1, decode,
                                                  (tokens, all_logits, cache))
        n = last_cached + 1

    def window(n, carry):
        """Cropped phase: the context is the last T tokens; recompute it in full."""
        tokens, all_logits = carry
        context = jax.lax.dynamic_slice_in_dim(tokens, n - T, T, axis=1)               # (B, T)
        logits, _ = _run(params, cfg, context, 0, _empty_cache(cfg, B, T, dtype))
        return emit(n, logits, tokens, all_logits)

    if n < total:
        tokens, all_logits = jax.lax.fori_loop(n, total, window, (tokens, all_logits))
    return tokens, all_logits


def generate(params: dict, cfg: GPTConfig, prompt_tokens: jax.typing.ArrayLike, max_new_tokens: int, *,
             key: jax.Array, temperature: float = 1.0, top_k: int | None = None,
             return_logits: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Extends ``prompt_tokens`` ((T0,) or (B, T0) ints) by ``max_new_tokens`` sampled tokens.

    Returns the tokens ((T0 + N,) or (B, T0 + N), prompt included), and with
    ``return_logits=True`` also the logits each new token was drawn from ((N, V) or (B, N, V)).
    """
    if not isinstance(cfg, GPTConfig):
        raise ValueError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
    prompt = np.asarray(prompt_tokens)
    if prompt.ndim not in (1, 2) or prompt.shape[-1] < 1 or prompt.size == 0:
        raise ValueError(f"prompt_tokens must be a non-empty (T0,) or (B, T0) array, got shape {prompt.shape}")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_tokens must be integers, got dtype {prompt.dtype}")
    if ((prompt < 0) | (prompt >= cfg.vocab_size)).any():
        raise ValueError(f"prompt_tokens must be ids in [0, {cfg.vocab_size})")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if params["wte"].shape != (cfg.vocab_size, cfg.n_embd):
        raise ValueError(f"params['wte'] has shape {params['wte'].shape}, cfg expects "
                         f"{(cfg.vocab_size, cfg.n_embd)}: params and cfg do not match")
    batched = prompt.ndim == 2
    if max_new_tokens == 0:
        empty = np.zeros((*prompt.shape[:-1], 0, cfg.vocab_size), np.float32)
        return (jnp.asarray(prompt), jnp.asarray(empty)) if return_logits else jnp.asarray(prompt)
    prompt = jnp.asarray(prompt if batched else prompt[None], jnp.int32)
    top_k = None if top_k is None or top_k >= cfg.vocab_size else int(top_k)
    tokens, logits = _generate(params, cfg, prompt, int(max_new_tokens), key,
                               jnp.float32(temperature), top_k)
    if not batched:
        tokens, logits = tokens[0], logits[0]
    return (tokens, logits) if return_logits else tokens
