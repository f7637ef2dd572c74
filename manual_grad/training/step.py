"""The training step shared by the trainer, the benchmarks and the experiments.

``train_step(state, batch, key) -> (state, metrics)`` is a pure function of
``state = {"params", "opt_state", "step"}``: ``value_and_grad`` of
:func:`manual_grad.model.loss_fn`, then the optimizer's update. With ``frozen`` (LoRA), the
state's params are the adapters only; the base is an argument that is never differentiated
and has no optimizer state.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from manual_grad.config import GPTConfig
from manual_grad.model import attach_lora, init_params, loss_fn

__all__ = ["train_step", "make_train_step", "make_eval_fn", "init_state", "init_adapters", "fresh_params"]


def train_step(state, batch, key, *, cfg: GPTConfig, optimizer, backend: str, frozen=None, mesh=None):
    """One optimizer step on the batch ``(inputs, targets)`` (B, T): pure, jit- and shard-friendly.

    ``state = {"params": trainable, "opt_state": ..., "step": int32}``. With ``frozen`` (the
    base parameters of a LoRA fine-tune) the trainable tree is ``params["lora"]`` and the
    gradient is taken with respect to it alone. ``key`` drives dropout (used when
    ``cfg.dropout > 0``; None: no dropout). Metrics: ``loss`` (before the step) and
    ``grad_norm`` (before clipping); under ``jit`` an unused metric costs nothing. ``mesh``:
    passed to :func:`~manual_grad.model.loss_fn` (a ``seq`` axis splits the time axis over a ring).
    """
    inputs, targets = batch
    dropout_key = key if cfg.dropout > 0 else None

    def loss_of(trainable):
        params = trainable if frozen is None else {**frozen, "lora": trainable}
        return loss_fn(params, inputs, targets, cfg, backend, dropout_key=dropout_key, mesh=mesh)

    loss, grads = jax.value_and_grad(loss_of)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    return new_state, {"loss": loss, "grad_norm": grad_norm}


def make_train_step(cfg: GPTConfig, optimizer, backend: str = "manual", *, frozen=None, mesh=None) -> Callable:
    """``jax.jit`` of :func:`train_step`: ``step(state, batch, key) -> (state, metrics)``.

    ``frozen`` is passed to the compiled function as an argument (not baked in as a constant).
    ``mesh``: see :func:`train_step` (the shardings come from the arguments; for explicit
    in/out shardings use :func:`manual_grad.parallel.jit_sharded_step`).
    """
    jitted = _jitted_step(cfg, optimizer, backend, mesh)
    return lambda state, batch, key: jitted(frozen, state, batch, key)


@lru_cache(maxsize=16)
def _jitted_step(cfg: GPTConfig, optimizer, backend: str, mesh=None):
    return jax.jit(lambda frozen, state, batch, key: train_step(
        state, batch, key, cfg=cfg, optimizer=optimizer, backend=backend, frozen=frozen, mesh=mesh))


def make_eval_fn(cfg: GPTConfig, backend: str = "manual", *, frozen=None, mesh=None) -> Callable:
    """``eval(trainable, inputs, targets) -> mean loss`` over stacked batches (N, B, T), no dropout
    (``mesh``: see :func:`train_step`)."""
    jitted = _jitted_eval(cfg, backend, mesh)
    return lambda trainable, inputs, targets: jitted(frozen, trainable, inputs, targets)


@lru_cache(maxsize=16)
def _jitted_eval(cfg: GPTConfig, backend: str, mesh=None):
    @jax.jit
    def evaluate(frozen, trainable, inputs, targets):
        params = trainable if frozen is None else {**frozen, "lora": trainable}
        losses = jax.lax.map(lambda xy: loss_fn(params, xy[0], xy[1], cfg, backend, mesh=mesh), (inputs, targets))
        return losses.mean()
    return evaluate


_init_params = jax.jit(init_params, static_argnums=0)
init_adapters = jax.jit(lambda base, key, cfg: attach_lora(base, cfg, key)["lora"], static_argnums=2)
init_adapters.__doc__ = "Fresh adapters for ``cfg.lora`` on ``base`` (jitted): the trainable tree of a fine-tune."


@lru_cache(maxsize=16)
def _jitted_init(optimizer):
    return jax.jit(optimizer.init)


def init_state(trainable, optimizer, *, step: int = 0) -> dict:
    """``{"params": trainable, "opt_state": optimizer.init(trainable), "step": int32}``."""
    return {"params": trainable, "opt_state": _jitted_init(optimizer)(trainable), "step": jnp.int32(step)}


def fresh_params(cfg: GPTConfig, key) -> dict:
    """:func:`manual_grad.model.init_params`, jitted once per config."""
    return _init_params(cfg, key)
