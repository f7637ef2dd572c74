import jax
import numpy as np
import pytest

from manual_grad.layers.dropout import dropout, dropout_ref
from tests.helpers import assert_vjp_matches, normal


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5])
def test_dropout_vjp_matches_autodiff(x64, dtype, rate):
    x = normal(jax.random.key(0), (4, 8, 16), dtype)
    assert_vjp_matches(dropout, dropout_ref, (x, jax.random.key(3)), dict(rate=rate))


def test_dropout_mask_is_the_residual():
    x = normal(jax.random.key(0), (64, 64), "float32")
    y, vjp = jax.vjp(lambda x: dropout(x, jax.random.key(1), rate=0.25), x)
    (dx,) = vjp(np.ones_like(x))
    kept = np.asarray(y) != 0
    assert 0.7 < kept.mean() < 0.8                                   # ~ 1 - p kept
    np.testing.assert_allclose(np.asarray(dx)[kept], 1 / 0.75, rtol=1e-6)
    assert np.all(np.asarray(dx)[~kept] == 0)
