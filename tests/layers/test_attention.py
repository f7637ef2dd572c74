import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad.kernels import cpu_attention, cpu_attention_available, flash_attention
from manual_grad.kernels.flash_attention import BLOCKS as FLASH_BLOCKS
from manual_grad.layers.attention import (attend_bwd, attend_fwd, attention, attention_fwd, attention_ref,
                                          flash_attend_bwd, flash_attend_fwd, softmax_bwd, split_heads)
from tests.helpers import (GRAD_RTOL, assert_vjp_matches, backward_settings, check_finite_differences, normal,
                           pairwise_cases, vjp_both)

ADAPTER_SETS = [(), ("q", "v"), ("q", "k", "v", "o")]


def attention_inputs(dtype, B, T, C, bias=True, adapters=(), rank=2, scale=0.5):
    """x ~ N(0, 1); weights and adapters ~ N(0, scale^2), so scores stay O(1)."""
    k = iter(jax.random.split(jax.random.key(0), 20))
    n = lambda *s, std=1.0: normal(next(k), s, dtype, std)
    return (n(B, T, C), n(C, 3 * C, std=scale), n(3 * C) if bias else None, n(C, C, std=scale),
            n(C) if bias else None, {a: {"a": n(C, rank, std=scale), "b": n(rank, C, std=scale)} for a in adapters})


@pytest.mark.parametrize("case", pairwise_cases(
    dtype=["float64", "float32"], heads_width=[(4, 4), (1, 4), (2, 8), (8, 16)],   # (4, 4): head size 1
    batch_length=[(1, 1), (2, 5), (3, 7)], causal=[True, False], bias=[True, False],
    adapters=ADAPTER_SETS, tile=[None, 3, 16]))
def test_attention_vjp_matches_autodiff(x64, case):
    """Both backwards: the paper's (backward="paper", saves ρ) and the tiled flash one."""
    (n_head, C), (B, T) = case["heads_width"], case["batch_length"]
    inputs = attention_inputs(case["dtype"], B, T, C, case["bias"], case["adapters"])
    assert_vjp_matches(attention, attention_ref, inputs, dict(
        n_head=n_head, causal=case["causal"], lora_scale=2.0, **backward_settings("tile", case["tile"])))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tile", [None, 2, 3])
def test_attention_vjp_matches_autodiff_hard_cases(x64, causal, tile):
    """Every (mask, backward) pair at T = 7 > 1 in float64, where ρ is a real matrix: the paper's
    saved ρ, and tiles of 2 and 3 (4 and 3 tiles, the last padded by 1 and 2 rows)."""
    inputs = attention_inputs("float64", 2, 7, 8, adapters=("q", "k", "v", "o"))
    assert_vjp_matches(attention, attention_ref, inputs, dict(
        n_head=2, causal=causal, lora_scale=2.0, **backward_settings("tile", tile)))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tile", [None, 2])
def test_attention_finite_differences(x64, causal, tile):
    check_finite_differences(attention, attention_inputs("float64", 1, 3, 4, adapters=("k", "o")),
                             dict(n_head=2, causal=causal, **backward_settings("tile", tile)))


def _with_constant_feature(inputs):
    """x with feature 0 set to 1: then dW_qkv[0] = Σ_tokens d(qkv), so dW_qkv[0, C:2C] is the key
    bias's gradient as the backward's own dk gives it, before the layer writes the exact 0."""
    x, *rest = inputs
    return (x.at[..., 0].set(1.0), *rest)


@pytest.mark.parametrize("dtype,causal,tile", [("float64", True, None), ("float64", False, 3),
                                               ("float32", False, None), ("float32", True, 3)])
def test_key_bias_gradient_is_zero(x64, dtype, causal, tile):
    """db_k = Σ_tokens dk = (dS_raw 1)^T q = 0, as every row of dS sums to 0. Checked on the
    backward's own dk (the weight row of a constant-1 input feature sums dk over the tokens), which
    a wrong softmax backward makes non-zero; the layer then writes exactly 0 as db_k."""
    C = 8
    inputs = _with_constant_feature(attention_inputs(dtype, 3, 7, C))
    _, _, grads, grads_ref = vjp_both(attention, attention_ref, inputs, dict(
        n_head=2, causal=causal, **backward_settings("tile", tile)), jax.random.key(7))
    dw_qkv, db_qkv = np.asarray(grads[1], np.float64), np.asarray(grads[2])
    own_db_k = dw_qkv[0, C:2 * C]                              # Σ_tokens dk, from the backward
    not_k = np.arange(3 * C) // C != 1                          # db_q, db_v: the same sums
    assert np.abs(dw_qkv[0] - db_qkv * not_k)[not_k].max() <= 1e-3 * np.abs(dw_qkv[0]).max()
    assert np.abs(own_db_k).max() <= 10 * GRAD_RTOL[dtype] * np.abs(dw_qkv[0, :C]).max()
    assert np.all(db_qkv[C:2 * C] == 0)                         # the documented output: exactly 0
    db_ref = np.asarray(grads_ref[2])
    assert np.abs(db_ref[C:2 * C]).max() < 10 * GRAD_RTOL[dtype] * np.abs(db_ref).max()
    assert np.any(db_qkv[:C] != 0) and np.any(db_qkv[2 * C:] != 0)


def _core_backward(core, q, k, v, dout, causal):
    """(dq, dk, dv) of one attention core (B, H, T, D) by its own backward."""
    if core == "paper":
        _, probs = attend_fwd(q, k, v, causal=causal)
        return attend_bwd(q, k, v, probs, dout)
    if core.startswith("lean"):
        block = int(core.split("-")[1])
        out, lse = flash_attend_fwd(q, k, v, causal=causal, block=block)
        return flash_attend_bwd(q, k, v, out, lse, dout, causal=causal, block=block)
    op = {"cpu": cpu_attention, "pallas": flash_attention}[core]
    _, residuals = op.fwd(q, k, v, causal=causal)
    return op.bwd(causal, residuals, dout)


CORES = [("paper", "float64", 7), ("lean-3", "float64", 7), ("lean-4", "float32", 7), ("lean-2", "float64", 1),
         ("cpu", "float64", 70), ("cpu", "float32", 70), ("pallas", "float32", 20)]


@pytest.mark.parametrize("core,dtype,T", CORES, ids=lambda c: str(c))
@pytest.mark.parametrize("causal", [True, False])
def test_flash_tiles_rows_of_dscores_sum_to_zero(x64, monkeypatch, core, dtype, T, causal):
    """With q_i = e_i (D >= T), Σ_j dk_j = Σ_i (dS_raw 1)_i q_i is the vector of dS's row sums,
    one row per entry: each must be 0 to rounding. For the tiled backwards (XLA lean path with
    several padded tiles, the C++ kernel over two 64-row tiles, the Pallas kernel over two 16-row
    tiles) the row sum adds up pieces from every key tile; dropping delta breaks it."""
    if core == "cpu" and not cpu_attention_available(dtype):
        pytest.skip("the CPU attention kernel is not built here")
    if core == "pallas":
        monkeypatch.setitem(FLASH_BLOCKS, "cpu", 16)
    B, H, D = 2, 2, max(T, 2)
    keys = jax.random.split(jax.random.key(3), 3)
    q = jnp.broadcast_to(2.0 * jnp.eye(T, D, dtype=dtype), (B, H, T, D))
    k, v, dout = (normal(key, (B, H, T, D), dtype) for key in keys)
    dq, dk, dv = jax.jit(_core_backward, static_argnums=(0, 5))(core, q, k, v, dout, causal)
    row_sums = np.asarray(dk, np.float64).sum(axis=2)[..., :T] / 2.0          # (B, H, T)
    scale = np.abs(np.asarray(dk, np.float64)).max() / 2.0                       # max |dS_raw|
    assert np.abs(row_sums).max() <= 10 * GRAD_RTOL[dtype] * max(scale, 1e-300) * T
    assert T == 1 or scale > 1e-3                                                # dS is not 0 itself
    assert np.abs(np.asarray(dv)).max() > 0.1


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
