import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad.layers.attention import (attend_fwd, attention, attention_fwd, attention_ref,
                                          softmax_bwd, split_heads)
from tests.helpers import (assert_vjp_matches, backward_settings, check_finite_differences, normal,
                           pairwise_cases, vjp_both)

ADAPTER_SETS = [(), ("q", "v"), ("q", "k", "v", "o")]


def attention_inputs(dtype, B, T, C, bias=True, adapters=(), rank=2, scale=0.5):
    """x ~ N(0, 1); weights and adapters ~ N(0, scale^2), so scores stay O(1)."""
    k = iter(jax.random.split(jax.random.key(0), 20))
    n = lambda *s, std=1.0: normal(next(k), s, dtype, std)
    return (n(B, T, C), n(C, 3 * C, std=scale), n(3 * C) if bias else None, n(C, C, std=scale),
            n(C) if bias else None, {a: {"a": n(C, rank, std=scale), "b": n(rank, C, std=scale)} for a in adapters})


@pytest.mark.parametrize("case", pairwise_cases(
    dtype=["float64", "float32"], heads_width=[(1, 4), (2, 8), (4, 4), (8, 16)],   # (4, 4): head size 1
    batch_length=[(1, 1), (3, 7)], causal=[True, False], bias=[True, False],
    adapters=ADAPTER_SETS, tile=[None, 3, 16]))
def test_attention_vjp_matches_autodiff(x64, case):
    """Both backwards: the paper's (backward="paper", saves ρ) and the tiled flash one."""
    (n_head, C), (B, T) = case["heads_width"], case["batch_length"]
    inputs = attention_inputs(case["dtype"], B, T, C, case["bias"], case["adapters"])
    assert_vjp_matches(attention, attention_ref, inputs, dict(
        n_head=n_head, causal=case["causal"], lora_scale=2.0, **backward_settings("tile", case["tile"])))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tile", [None, 2])
def test_attention_finite_differences(x64, causal, tile):
    check_finite_differences(attention, attention_inputs("float64", 1, 3, 4, adapters=("k", "o")),
                             dict(n_head=2, causal=causal, **backward_settings("tile", tile)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tile", [None, 4])
def test_key_bias_gradient_is_exactly_zero(x64, dtype, tile):
    """db_k = (dS_raw 1)^T q = 0: the manual backward gives exactly 0, autodiff only rounding."""
    C = 8
    inputs = attention_inputs(dtype, 3, 6, C)
    _, _, grads, grads_ref = vjp_both(attention, attention_ref, inputs,
                                      dict(n_head=2, **backward_settings("tile", tile)), jax.random.key(7))
    db_qkv, db_qkv_ref = grads[2], grads_ref[2]
    assert np.all(np.asarray(db_qkv[C:2 * C]) == 0)
    assert np.abs(np.asarray(db_qkv_ref[C:2 * C])).max() < 1e-5 * np.abs(np.asarray(db_qkv_ref)).max()
    assert np.any(np.asarray(db_qkv[:C]) != 0) and np.any(np.asarray(db_qkv[2 * C:]) != 0)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float64", 1e-14)])
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_backward_rows_sum_to_zero(x64, dtype, tol, causal):
    k = jax.random.split(jax.random.key(0), 4)
    q, kk, v = (split_heads(normal(key, (2, 6, 8), dtype, 2.0), 2) for key in k[:3])
    _, probs = attend_fwd(q, kk, v, causal=causal)
    dprobs = normal(k[3], probs.shape, dtype, 3.0)
    dscores = softmax_bwd(probs, dprobs)
    row_sums = np.abs(np.asarray(dscores.sum(-1)))
    assert row_sums.max() <= tol * np.abs(np.asarray(dscores)).max()
    if causal:    # masked entries: ρ = 0 there, so dS = 0 there, exactly
        assert np.all(np.asarray(dscores)[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_saves_no_score_matrix(causal):
    """The lean forward's residuals hold nothing of size T x T; the paper's hold ρ."""
    T, block = 64, 16
    inputs = attention_inputs("float32", 1, T, 8)
    for tile, expect_square in ((None, True), (block, False)):
        _, residuals = attention_fwd(*inputs, n_head=2, causal=causal, **backward_settings("tile", tile))
        square = [r.shape for r in jax.tree.leaves(residuals) if r.ndim >= 2 and r.shape[-2:] == (T, T)]
        assert bool(square) == expect_square, square


def test_attention_is_causal(x64):
    """Changing a later token never changes an earlier token's output."""
    x, *params = attention_inputs("float64", 1, 6, 8)
    y = attention(x, *params, n_head=2)
    y2 = attention(x.at[0, 4:].add(1.0), *params, n_head=2)
    np.testing.assert_array_equal(y[0, :4], y2[0, :4])
    assert not np.allclose(y[0, 4:], y2[0, 4:])
