"""The optimizer: AdamW with linear warmup then cosine decay to ``min_lr``
(``lr_t = min_lr + ½ (1 + cos(π (t - warmup) / (decay - warmup))) (lr - min_lr)``), global-norm
gradient clipping first, weight decay only on the matrices (per layer: the stacked
(L, in, out) block weights count as 2-D), never on biases or LayerNorm."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import optax

from manual_grad.training.config import OptimizerConfig

__all__ = ["make_schedule", "decay_mask", "make_optimizer"]


def make_schedule(oc: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_iters``, then cosine decay to
    ``min_lr`` at ``lr_decay_iters``, then ``min_lr`` (nanoGPT's get_lr)."""
    warmup = min(oc.warmup_iters, oc.lr_decay_iters)
    decay = max(oc.lr_decay_iters - warmup, 1)
    min_lr = min(oc.min_lr, oc.learning_rate)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = oc.learning_rate * (count + 1) / (warmup + 1)
        ratio = jnp.clip((count - warmup) / decay, 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (oc.learning_rate - min_lr)
        return jnp.where(count < warmup, warm, cosine)

    return schedule


def decay_mask(params) -> Any:
    """True for the matrices (weights and LoRA factors), False for biases and LayerNorm.

    A leaf is a matrix when it has 2 dims per layer: block parameters carry a leading layer
    axis L, so (L, C, 3C) is a matrix and (L, C) a bias.
    """
    def is_matrix(path, leaf):
        stacked = any(getattr(k, "key", None) == "blocks" for k in path)
        return leaf.ndim - int(stacked) >= 2
    return jax.tree_util.tree_map_with_path(is_matrix, params)


@lru_cache(maxsize=16)
def make_optimizer(oc: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on :func:`decay_mask` leaves).

    Equal settings give the same optimizer object, so runs that share them (a run and its
    resumption) share compiled steps.
    """
    adamw = optax.adamw(make_schedule(oc), b1=oc.beta1, b2=oc.beta2, weight_decay=oc.weight_decay,
                        mask=decay_mask)
    clip = optax.clip_by_global_norm(oc.grad_clip) if oc.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)
