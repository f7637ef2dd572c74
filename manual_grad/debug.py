"""Debug mode: value checks that run inside ``jit`` (``jax.experimental.checkify``).

The model's eager checks (:func:`manual_grad.model.loss_fn`) cover shapes, dtypes and, for
concrete arrays, token-id ranges. Under ``jit`` the values are traced and cannot be inspected
in Python; these functions are the opt-in ``debug=True`` path for them. Each returns
``(error, value)``: ``error.get()`` is ``None`` when every check passed, else a message, and
``error.throw()`` raises it (``checkify.JaxRuntimeError``). Checked:

- token ids: ``inputs`` in ``[0, V)``, ``targets`` in ``[0, V)`` or ``-100`` (the first bad
  position and value are reported);
- parameters: non-finite entries, named by their path (``params/blocks/attn/w_qkv``);
- every layer's output in the forward: non-finite entries, named by the layer
  (``blocks/ln1``, ``blocks/attention``, ``ln_f``, ``logits+loss``...), through the model's
  ``tap`` hook;
- the loss and every gradient: non-finite entries, named by the parameter's path.

The first failing check, in program order, is the one reported. Checkify's built-in
``nan_checks`` are left out of :data:`ERRORS` on purpose: they name only the primitive that
made a NaN, and would fire before the check that names the layer.

The checked functions are jitted once per (config, backend) and cost about one reduction per
checked array: use them to find a fault, not for production runs.
"""
from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from manual_grad import model
from manual_grad.config import GPTConfig
from manual_grad.layers.loss import IGNORE_INDEX

__all__ = ["ERRORS", "checked_forward", "checked_loss_fn", "checked_value_and_grad", "check_ids",
           "check_finite"]

ERRORS = checkify.user_checks

def check_ids(name: str, ids, vocab_size: int, *, allow_ignore: bool = False) -> None:
    """A checkify check that every id is in ``[0, vocab_size)`` (or ``-100`` when allowed)."""
    bad = (ids < 0) | (ids >= vocab_size)
    if allow_ignore:
        bad &= ids != IGNORE_INDEX
    flat = bad.reshape(-1)
    first = jnp.argmax(flat)
    allowed = f"[0, {vocab_size})" + (f" or {IGNORE_INDEX}" if allow_ignore else "")
    checkify.check(~flat.any(), f"{name} has an id outside {allowed}: {{value}} at flat position {{pos}}",
                   value=ids.reshape(-1)[first], pos=first)


def check_finite(name: str, tree) -> None:
    """A checkify check per floating leaf of ``tree`` that it has no NaN or Inf."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        where = name + "".join(f"/{getattr(k, 'key', getattr(k, 'idx', k))}" for k in path)
        count = jnp.sum(~jnp.isfinite(leaf))
        checkify.check(count == 0, f"non-finite values in {where}: {{count}} entries", count=count)


def _tap(name: str, value) -> None:
    """The model's debug hook (``tap=``): a finiteness check on every op's output, named by the op."""
    check_finite(f"the output of {name}", value)


def _check_inputs(params, inputs, targets, cfg: GPTConfig) -> None:
    check_ids("inputs", inputs, cfg.vocab_size)
    if targets is not None:
        check_ids("targets", targets, cfg.vocab_size, allow_ignore=True)
    check_finite("params", params)


@lru_cache(maxsize=32)
def _compiled(kind: str, cfg: GPTConfig, backend: str):
    def run(params, inputs, targets, dropout_key):
        _check_inputs(params, inputs, targets, cfg)
        if kind == "forward":
            return model.forward(params, inputs, cfg, backend, dropout_key=dropout_key, tap=_tap)
        loss_of = lambda p: model.loss_fn(p, inputs, targets, cfg, backend, dropout_key=dropout_key, tap=_tap)
        if kind == "loss":
            out = loss_of(params)
        else:
            out = jax.value_and_grad(loss_of)(params)
            check_finite("grads", out[1])
        check_finite("the loss", out[0] if kind == "value_and_grad" else out)
        return out
    return jax.jit(checkify.checkify(run, errors=ERRORS))


def checked_forward(params, inputs, cfg: GPTConfig, backend: str = "manual", *, dropout_key=None):
    """``(error, logits)``: :func:`manual_grad.model.forward` with the debug checks."""
    return _compiled("forward", cfg, backend)(params, inputs, None, dropout_key)


def checked_loss_fn(params, inputs, targets, cfg: GPTConfig, backend: str = "manual", *, dropout_key=None):
    """``(error, loss)``: :func:`manual_grad.model.loss_fn` with the debug checks."""
    return _compiled("loss", cfg, backend)(params, inputs, targets, dropout_key)


def checked_value_and_grad(params, inputs, targets, cfg: GPTConfig, backend: str = "manual", *,
                           dropout_key=None):
    """``(error, (loss, grads))``: ``jax.value_and_grad(loss_fn)`` with the debug checks,
    the gradients' included (a non-finite gradient is named by its parameter)."""
    return _compiled("value_and_grad", cfg, backend)(params, inputs, targets, dropout_key)
