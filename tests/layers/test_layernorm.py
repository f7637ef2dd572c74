import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad.layers.layernorm import layernorm, layernorm_ref
from tests.helpers import assert_vjp_matches, check_finite_differences, normal, pairwise_cases


def _inputs(dtype, shape):
    k = jax.random.split(jax.random.key(0), 3)
    C = shape[-1]
    return normal(k[0], shape, dtype, 3.0), normal(k[1], (C,), dtype), normal(k[2], (C,), dtype)


@pytest.mark.parametrize("case", pairwise_cases(
    dtype=["float64", "float32"], eps=[0.0, 1e-5], shape=[(1, 1, 3), (3, 5, 8), (2, 4, 33)],
    backward=["paper", "lean"]))
def test_layernorm_vjp_matches_autodiff(x64, case):
    assert_vjp_matches(layernorm, layernorm_ref, _inputs(case["dtype"], case["shape"]),
                       dict(eps=case["eps"], backward=case["backward"]))


@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("backward", ["paper", "lean"])
def test_layernorm_finite_differences(x64, eps, backward):
    check_finite_differences(layernorm, _inputs("float64", (2, 3, 6)), dict(eps=eps, backward=backward))


def test_layernorm_tokens_are_independent(x64):
    """The Jacobian of one token's output w.r.t. another token's input is exactly 0."""
    x, scale, bias = _inputs("float64", (1, 4, 6))
    jac = jax.jacrev(lambda x: layernorm(x, scale, bias, eps=1e-5))(x)      # (1, 4, 6, 1, 4, 6)
    for t in range(4):
        for u in range(4):
            block = np.asarray(jac[0, t, :, 0, u, :])
            assert (np.all(block == 0) if t != u else np.any(block != 0))
