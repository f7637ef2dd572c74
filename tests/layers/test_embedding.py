import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad.layers.embedding import embedding, embedding_ref
from tests.helpers import assert_vjp_matches, check_finite_differences, normal


def _inputs(dtype, B, T, V=7, T_max=9, C=5):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    ids = jax.random.randint(k1, (B, T), 0, V - 2)        # ids V-2, V-1 never appear
    return ids, normal(k2, (V, C), dtype), normal(k3, (T_max, C), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 6), (2, 9)])
def test_embedding_vjp_matches_autodiff(x64, dtype, B, T):
    assert_vjp_matches(embedding, embedding_ref, _inputs(dtype, B, T))


def test_embedding_scatter_add_rows(x64):
    ids, wte, wpe = _inputs("float64", 3, 6)
    ids = ids.at[0, :3].set(1)                              # a repeated id
    dx = normal(jax.random.key(5), (3, 6, 5), "float64")
    _, vjp = jax.vjp(lambda a, b: embedding(ids, a, b), wte, wpe)
    dwte, dwpe = vjp(dx)
    # absent ids and positions >= T get exactly 0; present ones the sum of their tokens' Δ
    assert np.all(np.asarray(dwte[5:]) == 0) and np.all(np.asarray(dwpe[6:]) == 0)
    expected = np.zeros((7, 5))
    np.add.at(expected, np.asarray(ids).ravel(), np.asarray(dx).reshape(-1, 5))
    np.testing.assert_allclose(dwte, expected, rtol=1e-14)
    np.testing.assert_allclose(dwpe[:6], np.asarray(dx).sum(0), rtol=1e-14)


def test_embedding_finite_differences(x64):
    check_finite_differences(embedding, _inputs("float64", 2, 4))
