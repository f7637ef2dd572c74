import jax
import numpy as np
import pytest

from manual_grad.layers.cross_attention import cross_attention, cross_attention_ref
from tests.helpers import assert_vjp_matches, check_finite_differences, normal, pairwise_cases


def _inputs(dtype, B, Tq, Tk, C, bias=True):
    k = iter(jax.random.split(jax.random.key(0), 10))
    n = lambda *s, std=1.0: normal(next(k), s, dtype, std)
    return (n(B, Tq, C), n(B, Tk, C), n(C, C, std=0.5), n(C) if bias else None,
            n(C, 2 * C, std=0.5), n(2 * C) if bias else None, n(C, C, std=0.5), n(C) if bias else None)


@pytest.mark.parametrize("case", pairwise_cases(
    dtype=["float64", "float32"], heads_width=[(1, 4), (2, 8), (4, 4)],
    shape=[(1, 1, 1), (2, 3, 7), (3, 6, 2)], bias=[True, False]))
def test_cross_attention_vjp_matches_autodiff(x64, case):
    (n_head, C), (B, Tq, Tk) = case["heads_width"], case["shape"]
    assert_vjp_matches(cross_attention, cross_attention_ref,
                       _inputs(case["dtype"], B, Tq, Tk, C, case["bias"]), dict(n_head=n_head))


def test_cross_attention_finite_differences(x64):
    check_finite_differences(cross_attention, _inputs("float64", 1, 2, 3, 4), dict(n_head=2))


def test_cross_attention_key_bias_gradient_is_exactly_zero(x64):
    inputs = _inputs("float64", 2, 3, 5, 8)
    _, vjp = jax.vjp(lambda *a: cross_attention(*a, n_head=2), *inputs)
    db_kv = vjp(normal(jax.random.key(3), (2, 3, 8), "float64"))[5]
    assert np.all(np.asarray(db_kv[:8]) == 0) and np.any(np.asarray(db_kv[8:]) != 0)
