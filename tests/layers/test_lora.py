import jax
import numpy as np
import pytest

from manual_grad.layers.lora import lora_linear, lora_linear_ref, lora_scale
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


def test_adapter_gradients_scale_linearly_with_scale(x64):
    """dA and dB are proportional to s, whatever the rank (the paper's claim 4)."""
    x, w, b, a, bb = _inputs("float64", rank=3)
    grad = lambda s: jax.grad(lambda a, bb: lora_linear(x, w, b, a, bb, scale=s).sum(), (0, 1))(a, bb)
    g1, g4 = grad(1.0), grad(4.0)
    for u, v in zip(g1, g4):
        np.testing.assert_allclose(v, 4.0 * u, rtol=1e-13)
