"""The one helper that turns a hand-written ``(fwd, bwd)`` pair, and optionally a
hand-written tangent formula ``jvp``, into a JAX op.

Every layer in :mod:`manual_grad.layers` follows the same contract::

    def layer_fwd(x, w, ..., *, setting):        # -> (y, residuals)
    def layer_bwd(setting, residuals, dy):        # -> (dx, dw, ...)
    def layer_jvp(residuals, tangents, *, setting):   # -> dy, tangents = (dx, dw, ...)
    layer = manual_vjp(layer_fwd, layer_bwd, jvp=layer_jvp)   # the op the model calls

* The positional parameters of ``fwd`` are the differentiable inputs: arrays or
  pytrees of arrays (``None`` allowed for an absent bias, ``{}`` for no adapters).
* Its keyword-only parameters are static settings (eps, number of heads, the causal
  flag, a scale...). They must be hashable; they are never differentiated and are
  handed to ``bwd`` first, positionally, in the order ``fwd`` declares them, and to ``jvp``
  by keyword (so a ``jvp`` names only the settings it reads and takes ``**_`` for the rest).
* ``bwd`` returns one cotangent per positional input, each with the structure and
  dtype of that input (``None`` for integer inputs such as token ids).
* ``jvp`` gets one tangent per positional input (``None`` for integer inputs, zeros where
  the input does not move) and returns the output's tangent, linear in the tangents.
  Like ``bwd`` it is written by hand from the residuals: no ``jax.jvp`` inside.

How the two are combined: the op is a ``jax.custom_jvp`` function whose tangent rule runs
``fwd`` (saving its residuals; those it computes are named ``"<op>_residuals"`` with
``checkpoint_name``, for ``jax.checkpoint`` policies) and
then a :func:`~manual_grad.linear_map.linear_map` of the tangents whose transpose is ``bwd``.
``jax.jvp`` evaluates ``jvp``; ``jax.grad`` transposes the map and so runs ``bwd`` on the same
residuals (``jvp`` is then never evaluated). Without ``jvp``, forward mode and reverse over
reverse raise a ``TypeError`` naming the op; reverse mode and ``jax.hessian`` work.

``shapes`` declares the array inputs' shapes and dtypes (see :mod:`manual_grad.shapes`),
checked when the op is called, so a wrong input raises a ``ValueError``/``TypeError`` naming
the argument. It is a dict, or a function of the settings returning one.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from manual_grad.linear_map import linear_map
from manual_grad.shapes import check_inputs

__all__ = ["manual_vjp", "forward_mode_error"]


def forward_mode_error(name: str) -> TypeError:
    """The error of forward-mode autodiff on an op that has no hand-written tangent formula."""
    return TypeError(
        f"manual_grad op {name!r} has no hand-written tangent (JVP) formula, so forward-mode "
        "autodiff (jax.jvp, jax.jacfwd, jax.linearize) cannot evaluate it, nor can reverse over "
        "reverse (grad of grad, jax.jacrev(jax.jacrev(f))), whose second pass transposes the "
        "backward: its derivative is only defined through its hand-written backward. Use "
        "backend=\"autodiff\" (the plain-jnp twins), or transformations that run only the "
        "backward: jax.grad, jax.jacrev, vmap of them, and jax.hessian (forward over reverse).")


class _Tangents(NamedTuple):
    """Static layout of one call's tangents: which input leaves move, and their types."""
    trees: tuple          # treedef of each positional input
    leaves: tuple         # per input, per leaf: (shape, dtype, moves) or None for integer leaves

    def full(self, moving):
        """Tangent per input from the moving leaves (zeros for the rest, None for integers)."""
        moving = iter(moving)
        tangents = []
        for tree, leaves in zip(self.trees, self.leaves):
            if leaves and all(leaf is None for leaf in leaves):
                tangents.append(None)
                continue
            tangents.append(jax.tree.unflatten(tree, [
                next(moving) if leaf[2] else jnp.zeros(leaf[0], leaf[1]) for leaf in leaves]))
        return tuple(tangents)

    def moving(self, grads):
        """The cotangents of the moving leaves, from one cotangent per input."""
        out = []
        for tree, leaves, grad in zip(self.trees, self.leaves, grads):
            if leaves and all(leaf is None for leaf in leaves):
                continue
            out += [g for g, leaf in zip(tree.flatten_up_to(grad), leaves) if leaf[2]]
        return out


def _layout(primals, tangents):
    trees, leaves, moving = [], [], []
    for p, t in zip(primals, tangents):
        p_leaves, tree = jax.tree.flatten(p)
        t_leaves = tree.flatten_up_to(t)
        trees.append(tree)
        row = []
        for pl, tl in zip(p_leaves, t_leaves):
            if not jnp.issubdtype(jnp.result_type(pl), jnp.inexact):
                row.append(None)
                continue
            moves = not isinstance(tl, SymbolicZero)
            row.append((tuple(jnp.shape(pl)), jnp.result_type(pl), moves))
            if moves:
                moving.append(tl)
        leaves.append(tuple(row))
    return _Tangents(tuple(trees), tuple(leaves)), moving


def _named(residuals, inputs, name):
    """The residuals, those the op computes tagged ``checkpoint_name(r, name)`` for remat
    policies. Residuals that are inputs themselves stay untagged: ``lax.scan`` then passes a layer's
    weights to the backward as they are instead of stacking a copy of them."""
    inputs = {id(leaf) for leaf in jax.tree.leaves(inputs)}
    return jax.tree.map(lambda r: r if id(r) in inputs else checkpoint_name(r, name), residuals)


def manual_vjp(fwd: Callable[..., tuple[Any, Any]], bwd: Callable[..., tuple], *,
               jvp: Callable[..., Any] | None = None,
               shapes: Mapping[str, str] | Callable[..., Mapping[str, str]] | None = None) -> Callable:
    """Registers ``bwd`` as the vector-Jacobian product and ``jvp`` (optional) as the
    Jacobian-vector product of ``fwd``'s first output.

    Returns ``op(*inputs, **settings) -> y`` whose forward runs ``fwd`` (keeping its residuals
    when differentiated), whose reverse pass runs ``bwd`` and whose forward mode runs ``jvp``.
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

    def tangent(static, residuals, moving):                 # linear in ``moving``
        settings, layout = static
        if jvp is None:
            raise forward_mode_error(name)
        return jvp(residuals, layout.full(moving), **dict(zip(setting_names, settings)))

    def backward(static, residuals, dy):                    # the transpose of ``tangent``
        settings, layout = static
        grads = bwd(*settings, residuals, dy)
        if len(grads) != len(input_names):
            raise TypeError(f"{bwd.__name__} returned {len(grads)} cotangents, "
                            f"expected {len(input_names)} ({', '.join(input_names)})")
        return layout.moving(grads)

    tangent.__name__, backward.__name__ = f"{name}_tangent", f"{name}_backward"

    def primal_jvp(settings, primals, tangents):
        y, residuals = fwd(*primals, **dict(zip(setting_names, settings)))
        layout, moving = _layout(primals, tangents)
        if not moving:
            return y, jax.tree.map(jnp.zeros_like, y)
        residuals = _named(residuals, primals, f"{name}_residuals")
        out_avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), y)
        return y, linear_map(tangent, backward, (settings, layout), residuals, moving, out_avals)

    op_core = jax.custom_jvp(primal, nondiff_argnums=(0,))
    op_core.defjvp(primal_jvp, symbolic_zeros=True)

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
    op.fwd, op.bwd, op.jvp, op.shapes = fwd, bwd, jvp, shapes
    return op
