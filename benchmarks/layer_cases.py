"""One forward+backward per layer kind, for each backend, on the same inputs.

Each case is a scalar objective ``f(*args)``: ``Σ op(*args) ∘ Δ`` for a fixed random
cotangent Δ (an argument, so it is not folded into the program), or the loss itself for
logits + cross-entropy. ``jax.value_and_grad(f, argnums)`` then runs the op's forward and
its backward: the hand-written one for ``manual`` and JAX's autodiff of the ``*_ref`` twin
for ``autodiff``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from manual_grad import GPTConfig, layers
from manual_grad.model import _layer_settings

__all__ = ["LayerCase", "layer_cases", "LAYERS"]

LAYERS = ("embedding", "layernorm", "attention", "mlp", "logits_loss", "lora_linear")


@dataclass(frozen=True)
class LayerCase:
    """``forward[backend](*inputs)`` is the op; gradients are taken for ``argnums``.

    ``cotangent`` is the Δ the output is paired with (None when the output is the scalar loss).
    """
    name: str
    forward: dict[str, Callable]
    inputs: tuple
    argnums: tuple[int, ...]
    cotangent: jax.Array | None
    shape: str                       # e.g. "B=8 T=256 C=384 H=6"

    @property
    def args(self) -> tuple:
        """Arguments of :meth:`objective`: the inputs, then Δ when there is one."""
        return self.inputs if self.cotangent is None else (*self.inputs, self.cotangent)

    def objective(self, backend: str) -> Callable:
        """``f(*args)``: the scalar ``Σ op(*inputs) ∘ Δ`` (or the op itself for a loss)."""
        op = self.forward[backend]
        if self.cotangent is None:
            return op

        def against_cotangent(*args):
            *inputs, dy = args
            return jnp.vdot(op(*inputs), dy).real
        return against_cotangent

    def value_and_grad(self, backend: str) -> Callable:
        return jax.value_and_grad(self.objective(backend), argnums=self.argnums)


def _pair(manual, ref, settings: dict[str, dict] | None = None, **common) -> dict[str, Callable]:
    """The op and its twin with their static settings (``settings[backend]``, else ``common``)."""
    settings = settings or {"manual": common, "autodiff": common}
    return {"manual": functools.partial(manual, **settings["manual"]),
            "autodiff": functools.partial(ref, **settings["autodiff"])}


def _model_settings(cfg: GPTConfig, layer: str) -> dict[str, dict]:
    """Each backend's settings of ``layer`` exactly as the model passes them (so the manual
    side follows ``cfg.backward``, e.g. the lean or the paper variant)."""
    return {backend: _layer_settings(cfg, backend)[layer] for backend in ("manual", "autodiff")}


def layer_cases(cfg: GPTConfig, batch: int, seq_len: int, key: jax.Array, *,
                lora_rank: int = 8) -> list[LayerCase]:
    """The six cases with the widths of ``cfg`` and inputs (B, T) = (batch, seq_len)."""
    B, T, C, F, V, H = batch, seq_len, cfg.n_embd, cfg.mlp_width, cfg.vocab_size, cfg.n_head
    dtype = jnp.dtype(cfg.dtype)
    keys = iter(jax.random.split(key, 16))

    def normal(*shape, std=1.0):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    x, dy = normal(B, T, C), normal(B, T, C)
    ids = jax.random.randint(next(keys), (B, T), 0, V)
    zeros = lambda *shape: jnp.zeros(shape, dtype)                       # noqa: E731
    shape = f"B={B} T={T} C={C} H={H} F={F} V={V}"
    return [
        LayerCase("embedding", _pair(layers.embedding, layers.embedding_ref),
                  (ids, normal(V, C, std=0.02), normal(max(T, cfg.block_size), C, std=0.02)),
                  (1, 2), dy, shape),
        LayerCase("layernorm", _pair(layers.layernorm, layers.layernorm_ref,
                                             _model_settings(cfg, "layernorm")),
                  (x, 1.0 + normal(C, std=0.1), normal(C, std=0.1)), (0, 1, 2), dy, shape),
        LayerCase("attention",
                  _pair(layers.attention, layers.attention_ref, _model_settings(cfg, "attention")),
                  (x, normal(C, 3 * C, std=0.02), zeros(3 * C), normal(C, C, std=0.02), zeros(C), {}),
                  (0, 1, 2, 3, 4), dy, shape),
        LayerCase("mlp", _pair(layers.mlp, layers.mlp_ref, _model_settings(cfg, "mlp")),
                  (x, normal(C, F, std=0.02), zeros(F), normal(F, C, std=0.02), zeros(C), {}),
                  (0, 1, 2, 3, 4), dy, shape),
        # The head's weight: the token table (V, C) when tied, else lm_head (C, V).
        LayerCase("logits_loss",
                  _pair(layers.logits_loss, layers.logits_loss_ref, _model_settings(cfg, "loss")),
                  (x, normal(*((V, C) if cfg.tied_embeddings else (C, V)), std=0.02),
                   zeros(V) if cfg.lm_head_bias else None,
                   jax.random.randint(next(keys), (B, T), 0, V), {}),
                  (0, 1), None, shape),
        # LoRA: W frozen, gradients for x and the adapters only (a fine-tune's backward).
        LayerCase("lora_linear", _pair(layers.lora_linear, layers.lora_linear_ref, scale=2.0),
                  (x, normal(C, C, std=0.02), zeros(C), normal(C, lora_rank, std=0.02),
                   normal(lora_rank, C, std=0.02)), (0, 3, 4), dy, shape + f" r={lora_rank}"),
    ]
