"""The whole-model training step that is benchmarked: ``value_and_grad`` of
:func:`manual_grad.loss_fn` plus an AdamW update, jitted, for one backend.

FLOPs per token of a training step (forward + backward), as in PaLM / nanoGPT:
    6 N + 12 L T C
N = parameters excluding the position table (the token table counts: it is the tied
logits weight), L layers, T context, C width. ``6N`` is the matmuls (2 forward + 4
backward per weight), ``12 L T C`` the attention scores and weighted sums (causal masking
is not discounted).
"""
from __future__ import annotations

import jax
import optax

from manual_grad import GPTConfig, count_params, loss_fn

__all__ = ["OPTIMIZER", "make_optimizer", "make_train_step", "train_flops_per_token", "random_batch"]

# AdamW as nanoGPT trains GPT-2; the PyTorch peer uses the same numbers.
OPTIMIZER = dict(learning_rate=6e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def make_optimizer() -> optax.GradientTransformation:
    return optax.adamw(**OPTIMIZER)


def make_train_step(cfg: GPTConfig, backend: str, optimizer: optax.GradientTransformation):
    """``step(params, opt_state, inputs, targets) -> (params, opt_state, loss)`` (not jitted)."""
    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, cfg, backend)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def train_flops_per_token(cfg: GPTConfig, seq_len: int) -> int:
    """6 N + 12 L T C (see the module docstring)."""
    n = count_params(cfg) - cfg.block_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * seq_len * cfg.n_embd


def random_batch(cfg: GPTConfig, batch: int, seq_len: int, key: jax.Array):
    """Uniform random token ids: (inputs (B, T), targets (B, T))."""
    k_in, k_out = jax.random.split(key)
    return (jax.random.randint(k_in, (batch, seq_len), 0, cfg.vocab_size),
            jax.random.randint(k_out, (batch, seq_len), 0, cfg.vocab_size))
