"""manual_grad: backpropagation in transformers, written by hand.

Every layer of a GPT is a pure forward function plus a hand-written backward registered
with ``jax.custom_vjp`` (see :mod:`manual_grad.layers`); :func:`loss_fn` composes them into
a GPT whose gradients equal ``jax.grad`` of the same model in plain ``jax.numpy``.
"""
from manual_grad.config import GPTConfig, LoRAConfig
from manual_grad.generate import generate
from manual_grad.loading import load_model
from manual_grad.model import (attach_lora, count_params, forward, init_params, loss_fn,
                               merge_lora, split_lora)

__version__ = "0.1.0"

__all__ = ["GPTConfig", "LoRAConfig", "init_params", "forward", "loss_fn", "count_params",
           "attach_lora", "merge_lora", "split_lora", "generate", "load_model", "__version__"]
