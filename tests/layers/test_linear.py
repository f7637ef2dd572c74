import jax
import pytest

from manual_grad.layers.linear import linear, linear_ref
from tests.helpers import assert_vjp_matches, check_finite_differences, normal


def _inputs(dtype, lead, n_in, n_out, bias):
    k = jax.random.split(jax.random.key(0), 3)
    return (normal(k[0], (*lead, n_in), dtype), normal(k[1], (n_in, n_out), dtype),
            normal(k[2], (n_out,), dtype) if bias else None)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead,n_in,n_out", [((1,), 1, 1), ((3, 5), 8, 12), ((2, 1, 4), 6, 3)])
def test_linear_vjp_matches_autodiff(x64, dtype, bias, lead, n_in, n_out):
    grads = assert_vjp_matches(linear, linear_ref, _inputs(dtype, lead, n_in, n_out, bias))
    assert len(grads) == (3 if bias else 2)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_finite_differences(x64, bias):
    check_finite_differences(linear, _inputs("float64", (2, 3), 4, 5, bias))
