"""The one helper that turns a hand-written ``(fwd, bwd)`` pair into a JAX op.

Every layer in :mod:`manual_grad.layers` follows the same contract::

    def layer_fwd(x, w, ..., *, setting):        # -> (y, residuals)
    def layer_bwd(setting, residuals, dy):        # -> (dx, dw, ...)
    layer = manual_vjp(layer_fwd, layer_bwd)      # the op the model calls

* The positional parameters of ``fwd`` are the differentiable inputs: arrays or
  pytrees of arrays (``None`` allowed for an absent bias, ``{}`` for no adapters).
* Its keyword-only parameters are static settings (eps, number of heads, the causal
  flag, a scale...). They must be hashable; they are never differentiated and are
  handed to ``bwd`` first, positionally, in the order ``fwd`` declares them.
* ``bwd`` returns one cotangent per positional input, each with the structure and
  dtype of that input (``None`` for integer inputs such as token ids).

``shapes`` declares the array inputs' shapes and dtypes (see :mod:`manual_grad.shapes`),
checked when the op is called, so a wrong input raises a ``ValueError``/``TypeError`` naming
the argument. It is a dict, or a function of the settings returning one.

The resulting op is an ordinary ``jax.custom_vjp`` function: it composes with
``jit``, ``grad``, ``vmap`` and ``lax.scan``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import jax

from manual_grad.shapes import check_inputs

__all__ = ["manual_vjp"]


def manual_vjp(fwd: Callable[..., tuple[Any, Any]], bwd: Callable[..., tuple], *,
               shapes: Mapping[str, str] | Callable[..., Mapping[str, str]] | None = None) -> Callable:
    """Registers ``bwd`` as the vector-Jacobian product of ``fwd``'s first output.

    Returns ``op(*inputs, **settings) -> y`` whose forward runs ``fwd`` (keeping
    its residuals when differentiated) and whose backward runs ``bwd``.
    """
    signature = inspect.signature(fwd)
    input_names = [
        name for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    setting_params = [p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    setting_names = tuple(p.name for p in setting_params)
    name = fwd.__name__.removesuffix("_fwd")

    def primal(settings, *inputs):
        y, _ = fwd(*inputs, **dict(zip(setting_names, settings)))
        return y

    def primal_fwd(settings, *inputs):
        return fwd(*inputs, **dict(zip(setting_names, settings)))

    def primal_bwd(settings, residuals, dy):
        grads = bwd(*settings, residuals, dy)
        if len(grads) != len(input_names):
            raise TypeError(f"{bwd.__name__} returned {len(grads)} cotangents, "
                            f"expected {len(input_names)} ({', '.join(input_names)})")
        return tuple(grads)

    op_core = jax.custom_vjp(primal, nondiff_argnums=(0,))
    op_core.defvjp(primal_fwd, primal_bwd)

    @functools.wraps(fwd)
    def op(*inputs, **settings):
        if len(inputs) != len(input_names):
            raise TypeError(f"{name}() takes {len(input_names)} inputs "
                            f"({', '.join(input_names)}), got {len(inputs)}")
        unknown = set(settings) - set(setting_names)
        if unknown:
            raise TypeError(f"{name}() got unexpected setting(s) {sorted(unknown)}; "
                            f"settings are {list(setting_names)}")
        values = []
        for p in setting_params:
            if p.name in settings:
                values.append(settings[p.name])
            elif p.default is not p.empty:
                values.append(p.default)
            else:
                raise TypeError(f"{name}() missing keyword setting {p.name!r}")
        if shapes is not None:
            specs = shapes(**dict(zip(setting_names, values))) if callable(shapes) else shapes
            check_inputs(name, specs, dict(zip(input_names, inputs)))
        return op_core(tuple(values), *inputs)

    op.__name__ = name
    op.__qualname__ = name
    op.fwd, op.bwd, op.shapes = fwd, bwd, shapes
    return op
