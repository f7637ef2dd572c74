"""manual_grad: backpropagation in transformers, written by hand.

Every layer of a GPT is a pure forward function plus a hand-written backward registered
with ``jax.custom_vjp`` (see :mod:`manual_grad.layers`); :func:`loss_fn` composes them into
a GPT whose gradients equal ``jax.grad`` of the same model in plain ``jax.numpy``.
:func:`train` runs a :class:`TrainConfig`; :func:`load_model` reads a finished run back.
"""
__version__ = "0.1.0"

from manual_grad.config import GPTConfig, LoRAConfig  # noqa: E402
from manual_grad.generate import generate  # noqa: E402
from manual_grad.loading import load_model  # noqa: E402
from manual_grad.model import (attach_lora, count_params, forward, init_params, loss_fn,  # noqa: E402
                               merge_lora, split_lora)
from manual_grad.training import TrainConfig, train  # noqa: E402

__all__ = ["GPTConfig", "LoRAConfig", "init_params", "forward", "loss_fn", "count_params",
           "attach_lora", "merge_lora", "split_lora", "generate", "load_model", "TrainConfig", "train",
           "__version__"]
