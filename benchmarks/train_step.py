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
import jax.numpy as jnp
import optax

from manual_grad import GPTConfig, count_params
from manual_grad.training.step import train_step

__all__ = ["OPTIMIZER", "make_optimizer", "make_train_step", "bench_config", "train_flops_per_token",
           "random_batch"]

# AdamW as nanoGPT trains GPT-2; the PyTorch peer uses the same numbers.
OPTIMIZER = dict(learning_rate=6e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def make_optimizer() -> optax.GradientTransformation:
    return optax.adamw(**OPTIMIZER)


def make_train_step(cfg: GPTConfig, backend: str, optimizer: optax.GradientTransformation):
    """``step(params, opt_state, inputs, targets) -> (params, opt_state, loss)`` (not jitted):
    the trainer's own step (:func:`manual_grad.training.step.train_step`), without dropout;
    under ``jit`` the metrics it does not return cost nothing."""
    def step(params, opt_state, inputs, targets):
        state = {"params": params, "opt_state": opt_state, "step": jnp.int32(0)}
        state, metrics = train_step(state, (inputs, targets), None, cfg=cfg, optimizer=optimizer, backend=backend)
        return state["params"], state["opt_state"], metrics["loss"]
    return step


def bench_config(preset: str, seq_len: int, overrides: dict) -> GPTConfig:
    """The preset with dropout off (both backends and the peers run the same deterministic
    function), ``block_size`` raised to ``seq_len`` when shorter (only the position table
    grows), then the ``--set`` overrides."""
    cfg = GPTConfig.preset(preset, dropout=0.0)
    cfg = cfg.replace(block_size=max(cfg.block_size, seq_len))
    return cfg.replace(**overrides) if overrides else cfg


def train_flops_per_token(cfg: GPTConfig, seq_len: int) -> int:
    """6 N + 12 L T C (see the module docstring)."""
    n = count_params(cfg) - cfg.block_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * seq_len * cfg.n_embd


def random_batch(cfg: GPTConfig, batch: int, seq_len: int, key: jax.Array):
    """Uniform random token ids: (inputs (B, T), targets (B, T))."""
    k_in, k_out = jax.random.split(key)
    return (jax.random.randint(k_in, (batch, seq_len), 0, cfg.vocab_size),
            jax.random.randint(k_out, (batch, seq_len), 0, cfg.vocab_size))
