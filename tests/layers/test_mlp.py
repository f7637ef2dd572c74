import jax
import numpy as np
import pytest

from manual_grad.layers.mlp import gelu, gelu_ref, mlp, mlp_ref, relu, relu_ref
from tests.helpers import assert_vjp_matches, check_finite_differences, normal, pairwise_cases


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op,ref", [(gelu, gelu_ref), (relu, relu_ref)])
def test_activation_vjp_matches_autodiff(x64, dtype, op, ref):
    x = normal(jax.random.key(0), (3, 4, 10), dtype, 3.0)
    assert_vjp_matches(op, ref, (x,))


def test_gelu_is_gpt2_tanh_form(x64):
    x = normal(jax.random.key(0), (50,), "float64", 3.0)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=True), rtol=1e-14, atol=1e-15)


def test_gelu_finite_differences(x64):
    check_finite_differences(gelu, (normal(jax.random.key(0), (2, 7), "float64", 2.0),))


def _inputs(dtype, B, T, C, F, bias, adapters=(), rank=3):
    k = iter(jax.random.split(jax.random.key(0), 16))
    n = lambda *s: normal(next(k), s, dtype)
    dims = {"fc": (C, F), "proj": (F, C)}
    return (n(B, T, C), n(C, F), n(F) if bias else None, n(F, C), n(C) if bias else None,
            {name: {"a": n(dims[name][0], rank), "b": n(rank, dims[name][1])} for name in adapters})


@pytest.mark.parametrize("case", pairwise_cases(
    dtype=["float64", "float32"], activation=["gelu", "relu"], bias=[True, False],
    adapters=[(), ("fc",), ("fc", "proj")]))
def test_mlp_vjp_matches_autodiff(x64, case):
    inputs = _inputs(case["dtype"], 2, 5, 6, 24, case["bias"], case["adapters"])
    assert_vjp_matches(mlp, mlp_ref, inputs, dict(activation=case["activation"], lora_scale=0.5))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_mlp_finite_differences(x64, activation):
    check_finite_differences(mlp, _inputs("float64", 1, 3, 4, 8, True, ("proj",), rank=2),
                             dict(activation=activation))
