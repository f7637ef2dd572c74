"""A linear map with a hand-written transpose: the piece that lets one op carry both a
hand-written tangent (JVP) formula and a hand-written backward (VJP).

``linear_map(fun, transpose, settings, residuals, linear, out_avals)`` evaluates
``fun(settings, residuals, linear)``, a function linear in ``linear``. When reverse-mode
autodiff transposes it, JAX calls ``transpose(settings, residuals, ct)`` instead of
transposing ``fun``'s operations; the transposed map is again a ``linear_map`` (``transpose``
forward, ``fun`` as its transpose). In :func:`manual_grad.vjp.manual_vjp`, ``fun`` is a
layer's tangent formula and ``transpose`` its backward, so ``jax.jvp`` runs the former and
``jax.grad`` the latter.

Rules of the primitive (``manual_linear_map``):

* jvp: ``d fun(r, l) = fun(r, dl) + ∂_r fun(r, l)·dr``. The first term is again a
  ``linear_map`` (so a later transpose still runs the hand-written formula); the second,
  nonzero only for higher derivatives (forward over reverse, ``jax.hessian``), is JAX's
  derivative of the hand-written formula with respect to its residuals.
* transpose: the swapped ``linear_map``, applied to the output cotangent.
* vmap: ``fun`` and ``transpose`` are vmapped together; linear inputs are given the batch axis
  (their transpose then sums it away), residuals keep theirs.
* lowering and eager evaluation: ``fun`` traced as ordinary JAX code.

JAX's own ``jax.custom_derivatives.linear_call`` would do the first order, but it has no vmap
rule and refuses residuals with a tangent, so ``vmap(grad)`` and ``jax.hessian`` fail with it.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["linear_map"]

linear_map_p = Primitive("manual_linear_map")
linear_map_p.multiple_results = True


def linear_map(fun: Callable, transpose: Callable, settings: tuple, residuals: Any, linear: Any,
               out_avals: Any) -> Any:
    """``fun(settings, residuals, linear)``, transposed by ``transpose`` (see the module).

    ``out_avals``: a pytree of ``jax.ShapeDtypeStruct``/``ShapedArray`` giving ``fun``'s output
    (its abstract evaluation; ``fun`` itself is only traced when the map is evaluated).
    """
    res_flat, res_tree = jax.tree.flatten(residuals)
    lin_flat, lin_tree = jax.tree.flatten(linear)
    avals_flat, out_tree = jax.tree.flatten(out_avals)
    out = linear_map_p.bind(*res_flat, *lin_flat, **_params(
        fun, transpose, settings, res_tree, lin_tree, out_tree, avals_flat))
    return jax.tree.unflatten(out_tree, out)


def _params(fun, transpose, settings, res_tree, lin_tree, out_tree, avals):
    avals = tuple(jax.core.ShapedArray(a.shape, a.dtype) for a in avals)
    return dict(fun=fun, transpose=transpose, settings=settings, res_tree=res_tree,
                lin_tree=lin_tree, out_tree=out_tree, out_avals=avals)


def _evaluate(*flat, fun, transpose, settings, res_tree, lin_tree, out_tree, out_avals):
    """``fun`` on flat operands, flat result."""
    del transpose, out_avals
    n = res_tree.num_leaves
    out = fun(settings, jax.tree.unflatten(res_tree, flat[:n]), jax.tree.unflatten(lin_tree, flat[n:]))
    out_flat, tree = jax.tree.flatten(out)
    if tree != out_tree:
        raise TypeError(f"{getattr(fun, '__name__', fun)} returned structure {tree}, expected {out_tree}")
    return out_flat


linear_map_p.def_impl(_evaluate)
linear_map_p.def_abstract_eval(lambda *_, out_avals, **__: list(out_avals))
mlir.register_lowering(linear_map_p, mlir.lower_fun(_evaluate, multiple_results=True))


def _transpose_rule(cts, *flat, **params):
    n = params["res_tree"].num_leaves
    res, lin = flat[:n], flat[n:]
    if any(ad.is_undefined_primal(r) for r in res):
        raise TypeError(f"{params['fun'].__name__}: a linear_map is linear in its linear inputs only, "
                        "not in its residuals")
    cts = [jax.numpy.zeros(a.shape, a.dtype) if type(c) is ad.Zero else c
           for c, a in zip(cts, params["out_avals"])]
    lin_avals = [l.aval if ad.is_undefined_primal(l) else jax.typeof(l) for l in lin]
    out = linear_map_p.bind(*res, *cts, **_params(
        params["transpose"], params["fun"], params["settings"], params["res_tree"],
        params["out_tree"], params["lin_tree"], lin_avals))
    return [None] * n + [o if ad.is_undefined_primal(l) else None for o, l in zip(out, lin)]


def _jvp_rule(primals, tangents, **params):
    n = params["res_tree"].num_leaves
    out = linear_map_p.bind(*primals, **params)
    res, lin, dres, dlin = primals[:n], primals[n:], tangents[:n], tangents[n:]
    terms = []
    if any(type(t) is not ad.Zero for t in dlin):          # fun(r, dl): the hand-written formula
        terms.append(linear_map_p.bind(*res, *map(ad.instantiate_zeros, dlin), **params))
    moved = [i for i, t in enumerate(dres) if type(t) is not ad.Zero]
    if moved:                                               # ∂_r fun(r, l)·dr: second order only

        def of_residuals(*moved_res):
            full = list(res)
            for i, r in zip(moved, moved_res):
                full[i] = r
            return _evaluate(*full, *lin, **params)

        terms.append(jax.jvp(of_residuals, [res[i] for i in moved], [dres[i] for i in moved])[1])
    if not terms:
        return out, [ad.Zero(a.to_tangent_aval()) for a in params["out_avals"]]
    return out, [sum(parts) for parts in zip(*terms)]


def _vmapped(fn, res_tree, res_axes):
    """``fn(settings, residuals, linear)`` over a leading batch axis of ``linear`` (and of the
    residuals at ``res_axes``), result batched on axis 0."""

    def batched(settings, residuals, linear):
        def one(res_flat, lin):
            return fn(settings, jax.tree.unflatten(res_tree, res_flat), lin)
        return jax.vmap(one, in_axes=(list(res_axes), 0))(jax.tree.leaves(residuals), linear)

    batched.__name__ = getattr(fn, "__name__", "linear_map")
    return batched


def _batch_rule(args, dims, **params):
    n = params["res_tree"].num_leaves
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    res_axes = tuple(dims[:n])
    lin = [batching.bdim_at_front(a, d, size) for a, d in zip(args[n:], dims[n:])]   # (N, ...)
    avals = [a.update(shape=(size, *a.shape)) for a in params["out_avals"]]
    out = linear_map_p.bind(*args[:n], *lin, **_params(
        _vmapped(params["fun"], params["res_tree"], res_axes),
        _vmapped(params["transpose"], params["res_tree"], res_axes),
        params["settings"], params["res_tree"], params["lin_tree"], params["out_tree"], avals))
    return out, [0] * len(out)


ad.primitive_jvps[linear_map_p] = _jvp_rule
ad.primitive_transposes[linear_map_p] = _transpose_rule
batching.primitive_batchers[linear_map_p] = _batch_rule
