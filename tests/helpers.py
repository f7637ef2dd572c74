"""Shared test machinery: compare a hand-written VJP with JAX's autodiff of the ``*_ref`` twin."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from manual_grad import loss_fn

# Relative tolerance per dtype for manual-vs-autodiff gradients (DESIGN.md).
GRAD_RTOL = {"float64": 1e-12, "float32": 1e-5}
# Below this fraction of the largest cotangent's norm, an array is rounding noise (see below).
NOISE_FLOOR = {"float64": 1e-10, "float32": 1e-4}


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (0 when both are exactly 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff, ref = np.linalg.norm(a - b), np.linalg.norm(b)
    return 0.0 if diff == 0 else float(diff / ref) if ref > 0 else float("inf")


def normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_tree(key, tree, scale=1.0):
    """A pytree shaped like ``tree`` with N(0, scale^2) floating leaves."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [normal(k, l.shape, l.dtype, scale) for k, l in zip(keys, leaves)])


def _is_float_input(arg) -> bool:
    leaves = jax.tree.leaves(arg)
    return bool(leaves) and all(jnp.issubdtype(l.dtype, jnp.floating) for l in leaves)


def differentiable(fn, args, settings):
    """(g, float_args): g(*float_args) = fn(*args, **settings) with non-float inputs held fixed."""
    index = [i for i, a in enumerate(args) if _is_float_input(a)]

    def g(*float_args):
        full = list(args)
        for i, a in zip(index, float_args):
            full[i] = a
        return fn(*full, **settings)

    return g, [args[i] for i in index]


def vjp_both(op, ref, args, settings, key):
    """Outputs and input cotangents of ``op`` and ``ref`` for one random output cotangent
    (each computed by one jitted forward + backward)."""
    g_op, float_args = differentiable(op, args, settings)
    g_ref, _ = differentiable(ref, args, settings)
    ct = random_tree(key, jax.eval_shape(g_op, *float_args))

    def forward_backward(g):
        @jax.jit
        def run(float_args, ct):
            y, vjp = jax.vjp(g, *float_args)
            return y, vjp(ct)
        return run(float_args, ct)

    (y, grads), (y_ref, grads_ref) = forward_backward(g_op), forward_backward(g_ref)
    return y, y_ref, grads, grads_ref


def assert_vjp_matches(op, ref, args, settings=None, *, key=None, rtol=None):
    """Same forward value, and every cotangent within ``rtol`` (by dtype) of autodiff's."""
    settings = settings or {}
    key = jax.random.key(1) if key is None else key
    y, y_ref, grads, grads_ref = vjp_both(op, ref, args, settings, key)
    dtype = str(jax.tree.leaves(y)[0].dtype)
    tol = rtol if rtol is not None else GRAD_RTOL[dtype]
    for out, out_ref in zip(jax.tree.leaves(y), jax.tree.leaves(y_ref)):
        assert out.dtype == out_ref.dtype and out.shape == out_ref.shape
        assert rel_err(out, out_ref) <= tol, f"forward differs: {rel_err(out, out_ref):.3g}"
    assert_trees_close(grads, grads_ref, dtype, rtol=tol)
    return grads


def assert_trees_close(tree, tree_ref, dtype: str, *, rtol=None, floor=None):
    """Every array of ``tree`` within ``rtol`` of ``tree_ref``'s, up to a rounding floor:

        ||g - g_ref|| <= rtol * ||g_ref|| + floor * max_leaves ||g_ref||

    The floor term matters only for arrays far smaller than the largest one, e.g. analytically
    0 (dq, dk when T = 1: rho = 1, so dS = 0; everything below a LayerNorm over C = 2 features
    with eps = 0) or ill-conditioned (LayerNorm over C = 2 with eps > 0 scales dx by ~eps / var).
    There both backwards return rounding noise of the large arrays, so relative error is
    meaningless and only the absolute size of the disagreement is checked.
    """
    rtol = GRAD_RTOL[dtype] if rtol is None else rtol
    floor = NOISE_FLOOR[dtype] if floor is None else floor
    paths = jax.tree_util.tree_leaves_with_path(tree_ref)
    leaves = jax.tree.leaves(tree)
    assert len(leaves) == len(paths), "tree structures differ"
    norm = lambda a: float(np.linalg.norm(np.asarray(a, np.float64)))
    noise = floor * max((norm(g) for _, g in paths), default=0.0)
    for g, (path, g_ref) in zip(leaves, paths):
        name = jax.tree_util.keystr(path)
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert np.all(np.isfinite(np.asarray(g, np.float64))), f"{name}: not finite"
        diff = norm(np.asarray(g, np.float64) - np.asarray(g_ref, np.float64))
        assert diff <= rtol * norm(g_ref) + noise, (
            f"{name}: |diff| {diff:.3g} > {rtol:g} * |ref| {norm(g_ref):.3g} + floor {noise:.3g}")


def both_backends(cfg, params, inputs, targets):
    """``((loss, grads) manual, (loss, grads) autodiff)``: ``jit(value_and_grad(loss_fn))`` of
    the same batch with the hand-written VJPs and with autodiff of the twins."""
    step = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(3, 4))
    return tuple(step(params, inputs, targets, cfg, backend) for backend in ("manual", "autodiff"))


def check_finite_differences(op, args, settings=None, *, eps=1e-6, rtol=1e-5):
    """``jax.test_util.check_grads`` (reverse mode, float64) on the manual op."""
    g, float_args = differentiable(op, args, settings or {})
    check_grads(g, float_args, order=1, modes=("rev",), eps=eps, atol=rtol, rtol=rtol)


def pairwise_grid(factors: dict[str, list]) -> list[dict]:
    """A small list of settings in which every pair of values of every two factors appears
    together at least once (greedy all-pairs covering), deterministic.

    Each row is the candidate that covers the most uncovered pairs; ties go to the candidate whose
    values have been used least so far, then to later values in each list. So list the edge
    values (T = 1, one head, C = 1) first: they are never in the first row (which holds every
    factor's last value) and appear only as often as covering their pairs needs, instead of
    filling most rows as a lowest-index tie-break made them do.
    """
    names = list(factors)
    pairs = list(itertools.combinations(range(len(names)), 2))
    uncovered = {(i, c[i], j, c[j]) for c in itertools.product(*(range(len(factors[n])) for n in names))
                 for i, j in pairs}
    used = [[0] * len(factors[n]) for n in names]
    rows = []
    candidates = list(itertools.product(*(range(len(factors[n])) for n in names)))
    while uncovered:
        def rank(c):
            gain = sum((i, c[i], j, c[j]) in uncovered for i, j in pairs)
            return gain, -sum(used[i][v] for i, v in enumerate(c)), c
        best = max(candidates, key=rank)
        rows.append(best)
        for i, v in enumerate(best):
            used[i][v] += 1
        uncovered -= {(i, best[i], j, best[j]) for i, j in pairs}
    return [{n: factors[n][v] for n, v in zip(names, row)} for row in rows]


def pairwise_cases(**factors) -> list:
    """``pytest.param``s covering every pair of values of every two factors (see
    :func:`pairwise_grid`), each a dict, with readable ids: use as
    ``@pytest.mark.parametrize("case", pairwise_cases(dtype=[...], n_head=[...]))``."""
    return [pytest.param(case, id="-".join(f"{k}={v}" for k, v in case.items()))
            for case in pairwise_grid(factors)]


def train_config(**flat):
    """A TrainConfig from flat keywords: GPTConfig fields go to ``model``, OptimizerConfig
    fields to ``optim``, ``lora_<field>`` to a LoRAConfig, the rest stay run-level."""
    import dataclasses

    from manual_grad import GPTConfig, LoRAConfig
    from manual_grad.training import OptimizerConfig, TrainConfig
    names = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (GPTConfig, OptimizerConfig, LoRAConfig)}
    model = {k: flat.pop(k) for k in list(flat) if k in names[GPTConfig]}
    optim = {k: flat.pop(k) for k in list(flat) if k in names[OptimizerConfig]}
    lora = {k[5:]: flat.pop(k) for k in list(flat) if k.startswith("lora_")}
    return TrainConfig(model=model, optim=OptimizerConfig(**optim), lora=LoRAConfig(**lora) if lora else None, **flat)


def backward_settings(size_name: str, size) -> dict:
    """An op's backward settings from a tile / chunk size: None is the paper's backward,
    a size the lean one with that size (``tile=`` for attention, ``chunk=`` for the loss)."""
    return {"backward": "paper"} if size is None else {"backward": "lean", size_name: size}
