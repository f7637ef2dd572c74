import jax
import numpy as np
import pytest

from manual_grad.layers.lora import lora_linear, lora_linear_ref, lora_project_fwd, lora_project_ref, lora_scale
from tests.helpers import assert_vjp_matches, check_finite_differences, normal, pairwise_cases


def _inputs(dtype, lead=(3, 4), n_in=6, n_out=5, rank=2, bias=True):
    k = iter(jax.random.split(jax.random.key(0), 6))
    n = lambda *s: normal(next(k), s, dtype)
    return n(*lead, n_in), n(n_in, n_out), (n(n_out) if bias else None), n(n_in, rank), n(rank, n_out)


@pytest.mark.parametrize("case", pairwise_cases(
    dtype=["float64", "float32"], convention=["alpha/rank", "alpha"], rank=[1, 4], bias=[True, False]))
def test_lora_linear_vjp_matches_autodiff(x64, case):
    assert_vjp_matches(lora_linear, lora_linear_ref, _inputs(case["dtype"], rank=case["rank"], bias=case["bias"]),
                       dict(scale=lora_scale(16.0, case["rank"], case["convention"])))


def test_lora_linear_finite_differences(x64):
    check_finite_differences(lora_linear, _inputs("float64", lead=(2,), n_in=3, n_out=4), dict(scale=1.5))


def test_scale_conventions():
    assert lora_scale(16, 8) == 2.0 and lora_scale(16, 8, "alpha/rank") == 2.0
    assert lora_scale(16, 8, "alpha") == 16.0
    with pytest.raises(ValueError, match="convention"):
        lora_scale(16, 8, "rank")


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_adapter_adds_to_its_own_part_only(x64, name):
    """y = x W + b + [0 | s (x A) B | 0]: an adapter on one part of a fused projection changes that
    part's columns alone, written out in numpy (the op and its twin share the column split)."""
    k = iter(jax.random.split(jax.random.key(4), 6))
    n = lambda *s: np.asarray(normal(next(k), s, "float64"))
    x, w, b, a, bb = n(2, 3, 4), n(4, 12), n(12), n(4, 2), n(2, 4)
    start = "qkv".index(name) * 4
    expected = x @ w + b
    expected[..., start:start + 4] += 1.5 * (x @ a) @ bb
    for project in (lora_project_ref, lambda *args, **kw: lora_project_fwd(*args, **kw)[0]):
        y = project(x, w, b, {name: {"a": a, "b": bb}}, parts=("q", "k", "v"), scale=1.5)
        np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-13)


def test_adapter_gradients_equal_the_closed_form(x64):
    """dA = s x^T (Δ B^T), dB = s (x A)^T Δ, dx = Δ W^T + s Δ B^T A^T, written out in numpy, at
    two scales (so a factor of s dropped or squared shows)."""
    x, w, b, a, bb = _inputs("float64", rank=3)
    dy = np.asarray(normal(jax.random.key(9), (3, 4, 5), "float64"))
    X, A, Bm, W = (np.asarray(t).reshape(-1, np.asarray(t).shape[-1]) for t in (x, a, bb, w))
    D = dy.reshape(-1, 5)
    for s in (0.5, 3.0):
        _, vjp = jax.vjp(lambda x, a, bb: lora_linear(x, w, b, a, bb, scale=s), x, a, bb)
        dx, da, db = vjp(dy)
        np.testing.assert_allclose(da, s * X.T @ (D @ Bm.T), rtol=1e-12)
        np.testing.assert_allclose(db, s * (X @ A).T @ D, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(dx).reshape(-1, 6), D @ W.T + s * D @ Bm.T @ A.T, rtol=1e-12)
