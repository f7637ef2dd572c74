import jax
import jax.test_util  # noqa: F401  (check_finite_differences uses it)
import numpy as np
import pytest

from manual_grad.layers.linear_attention import linear_attend, linear_attend_ref
from tests.helpers import assert_vjp_matches, check_finite_differences, normal


def _heads(dtype, B, H, T, D, Dv=None):
    k = jax.random.split(jax.random.key(0), 3)
    return (normal(k[0], (B, H, T, D), dtype), normal(k[1], (B, H, T, D), dtype),
            normal(k[2], (B, H, T, Dv or D), dtype))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("dtype,shape", [("float64", (1, 1, 2, 2)), ("float64", (2, 3, 7, 4)),
                                         ("float64", (1, 2, 9, 3, 5)), ("float32", (2, 3, 7, 4))])
def test_linear_attend_vjp_matches_quadratic_autodiff(x64, causal, normalise, dtype, shape):
    """The O(T D²) prefix-sum backward against autodiff of the O(T² D) masked form."""
    assert_vjp_matches(linear_attend, linear_attend_ref, _heads(dtype, *shape),
                       dict(causal=causal, normalise=normalise))


@pytest.mark.parametrize("normalise", [True, False])
def test_linear_attend_finite_differences(x64, normalise):
    check_finite_differences(linear_attend, _heads("float64", 1, 2, 4, 3),
                             dict(causal=True, normalise=normalise))


def test_causal_linear_attention_ignores_the_future(x64):
    q, k, v = _heads("float64", 1, 1, 6, 4)
    out = linear_attend(q, k, v, causal=True, normalise=True)
    out2 = linear_attend(q, k.at[..., 4:, :].set(9.0), v.at[..., 4:, :].set(-9.0), causal=True, normalise=True)
    np.testing.assert_array_equal(out[..., :4, :], out2[..., :4, :])
    assert not np.allclose(out[..., 4:, :], out2[..., 4:, :])
