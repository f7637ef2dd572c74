import jax
import jax.test_util  # noqa: F401  (check_finite_differences uses it)
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad.layers.attention import attention, attention_ref
from manual_grad.layers.attention_variants import (KINDS, alibi_attend, alibi_attend_ref,
                                                   attention_variant, attention_variant_ref,
                                                   rms_normalise, rms_normalise_ref, rope, rope_ref,
                                                   sigmoid_attend, sigmoid_attend_ref)
from tests.helpers import assert_vjp_matches, check_finite_differences, normal


def _layer_inputs(dtype, B, T, C, seed=0):
    k = iter(jax.random.split(jax.random.key(seed), 6))
    n = lambda *s, std=1.0: normal(next(k), s, dtype, std)
    return (n(B, T, C), n(C, 3 * C, std=0.5), n(3 * C), n(C, C, std=0.5), n(C))


def _heads(dtype, B, H, T, D):
    k = jax.random.split(jax.random.key(2), 3)
    return tuple(normal(key, (B, H, T, D), dtype) for key in k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,causal,B,T,C,n_head", [
    ("float64", True, 1, 1, 2, 1), ("float64", True, 2, 5, 8, 2), ("float64", False, 1, 7, 12, 3),
    ("float32", True, 2, 5, 8, 2)])
def test_attention_variant_vjp_matches_autodiff(x64, kind, causal, dtype, B, T, C, n_head):
    assert_vjp_matches(attention_variant, attention_variant_ref, _layer_inputs(dtype, B, T, C),
                       dict(n_head=n_head, kind=kind, causal=causal))


@pytest.mark.parametrize("kind", KINDS)
def test_attention_variant_finite_differences(x64, kind):
    check_finite_differences(attention_variant, _layer_inputs("float64", 1, 4, 4, 2),
                             dict(n_head=2, kind=kind, causal=True))


@pytest.mark.parametrize("op,ref", [(alibi_attend, alibi_attend_ref), (sigmoid_attend, sigmoid_attend_ref)])
@pytest.mark.parametrize("causal", [True, False])
def test_score_cores_vjp_match_autodiff(x64, op, ref, causal):
    assert_vjp_matches(op, ref, _heads("float64", 2, 3, 6, 4), dict(causal=causal))


@pytest.mark.parametrize("op,ref", [(rope, rope_ref), (rms_normalise, rms_normalise_ref)])
def test_qk_transforms_vjp_match_autodiff(x64, op, ref):
    assert_vjp_matches(op, ref, _heads("float64", 2, 3, 6, 4)[:1])
    check_finite_differences(op, _heads("float64", 1, 1, 3, 4)[:1])


def test_rope_is_a_rotation_and_relative(x64):
    """rot preserves norms, and q'_i · k'_j depends only on i - j."""
    x = _heads("float64", 1, 1, 6, 8)[0]
    np.testing.assert_allclose(np.linalg.norm(rope(x), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    q, k = jnp.ones((1, 1, 6, 8)) * x[..., :1, :], jnp.ones((1, 1, 6, 8)) * x[..., 1:2, :]
    scores = rope(q)[0, 0] @ rope(k)[0, 0].T                                   # same q, k at every t
    np.testing.assert_allclose(np.diag(scores, 1), np.diag(scores, 1)[0], rtol=1e-12)


def test_rope_rejects_odd_head_size():
    with pytest.raises(ValueError, match="head size"):
        rope(jnp.ones((1, 1, 3, 5)))


def test_attention_variant_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        attention_variant(*_layer_inputs("float32", 1, 2, 4), n_head=1, kind="cosine")


def test_softmax_kind_is_the_library_attention(x64):
    """kind="softmax" is the model's attention (same forward, same gradients except db_k, which
    the library writes as an exact 0 and this layer leaves as the rounding of Σ_tokens dk)."""
    args = _layer_inputs("float64", 2, 5, 8)
    y = attention_variant(*args, n_head=2, kind="softmax")
    np.testing.assert_allclose(y, attention_ref(*args[:-1], args[-1], {}, n_head=2), rtol=1e-14)
    ct = normal(jax.random.key(5), y.shape, "float64")
    g_var = jax.vjp(lambda *a: attention_variant(*a, n_head=2, kind="softmax"), *args)[1](ct)
    g_lib = jax.vjp(lambda *a: attention(*a, {}, n_head=2), *args)[1](ct)
    for a, b in zip(g_var, g_lib):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind,zero", [("softmax", True), ("alibi", True), ("sigmoid", False),
                                       ("rope", False), ("qk_norm", False), ("linear", False),
                                       ("linear_unnormalised", False)])
def test_key_bias_gradient_vanishes_only_under_row_shift_invariant_scores(x64, kind, zero):
    args = _layer_inputs("float64", 2, 6, 8, seed=3)
    _, vjp = jax.vjp(lambda *a: attention_variant(*a, n_head=2, kind=kind), *args)
    db_qkv = vjp(normal(jax.random.key(4), (2, 6, 8), "float64"))[2]
    db_q, db_k = np.linalg.norm(db_qkv[:8]), np.linalg.norm(db_qkv[8:16])
    assert (db_k < 1e-13 * db_q) if zero else (db_k > 1e-3 * db_q)
