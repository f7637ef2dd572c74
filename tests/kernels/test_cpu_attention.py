"""The C++ CPU attention kernel (XLA FFI) against autodiff of its twin, the XLA lean path and
finite differences: float64 to rounding, float32 to 1e-5, on shapes that hit every edge of
its 64-row tiles (T = 1, one tile, one row past a tile, odd T up to 1000; batch 1 to 8; one to
sixteen heads; head sizes and key tiles that fill its register tiles of two vectors, leave one
vector, or leave single columns)."""
import shutil
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad import kernels
from manual_grad.kernels.cpu_attention import (available, cpu_attention, cpu_attention_bwd,
                                                cpu_attention_fwd, cpu_attention_ref)
from manual_grad.layers.attention import attention, flash_attend_bwd, flash_attend_fwd
from tests.helpers import assert_trees_close, assert_vjp_matches, check_finite_differences, normal

# Only where no compiler exists: with one, a kernel that fails to build fails these tests.
pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler: the CPU kernel cannot be built here")

# (B, H, T, D, causal)
CASES = [
    (1, 1, 1, 1, True),        # T = 1: ρ = [1], dq = dk = 0
    (2, 3, 64, 16, True),      # exactly one tile
    (1, 2, 65, 64, True),      # one row past a tile: a second, one-row tile
    (3, 1, 130, 5, False),     # no mask, a head size that no register tile divides
    (1, 16, 77, 4, True),      # sixteen heads
    (2, 2, 200, 32, False),    # four tiles, the last one ragged
    (1, 2, 117, 48, True),     # 48 and 53 columns: two-vector, one-vector and single-column strips
    (1, 1, 777, 8, True),      # thirteen tiles, the last one of 9 rows
    (8, 2, 1000, 2, True),     # batch 8, sixteen tiles, a two-column head
]


def qkv_dout(B, H, T, D, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [normal(k, (B, H, T, D), dtype) for k in keys]


@pytest.mark.parametrize("B,H,T,D,causal", CASES)
def test_gradients_match_autodiff_float64(x64, B, H, T, D, causal):
    q, k, v, _ = qkv_dout(B, H, T, D, jnp.float64)
    assert_vjp_matches(cpu_attention, cpu_attention_ref, (q, k, v), dict(causal=causal))


@pytest.mark.parametrize("B,H,T,D,causal", CASES)
def test_equals_xla_lean_path_float32(B, H, T, D, causal):
    q, k, v, dout = qkv_dout(B, H, T, D, jnp.float32, seed=1)

    @jax.jit
    def both(q, k, v, dout):
        out, residuals = cpu_attention_fwd(q, k, v, causal=causal)
        grads = cpu_attention_bwd(causal, residuals, dout)
        xla_out, xla_lse = flash_attend_fwd(q, k, v, causal=causal, block=32)
        xla_grads = flash_attend_bwd(q, k, v, xla_out, xla_lse, dout, causal=causal, block=32)
        return (out, residuals[-1], grads), (xla_out, xla_lse, xla_grads)

    mine, xla = both(q, k, v, dout)
    assert_trees_close(mine, xla, "float32")


def test_finite_differences(x64):
    q, k, v, _ = qkv_dout(1, 2, 70, 8, jnp.float64, seed=2)
    check_finite_differences(cpu_attention, (q, k, v), dict(causal=True))


def test_key_gradient_sums_to_zero(x64):
    """Σ_j dk_j = (dS 1)^T q / sqrt(D) = 0: every row of dS sums to 0, since a row of scores
    shifted by a constant leaves the softmax unchanged (why the key bias has no gradient).
    Computed from the kernel's own dk, tile sums included, so a wrong delta would show."""
    q, k, v, dout = qkv_dout(2, 3, 150, 16, jnp.float64, seed=3)
    out, residuals = cpu_attention_fwd(q, k, v, causal=True)
    _, dk, dv = cpu_attention_bwd(True, residuals, dout)
    assert float(jnp.abs(dk.sum(axis=2)).max()) < 1e-12 * float(jnp.abs(dk).max())
    assert float(jnp.abs(dv).max()) > 0.1


def test_saves_packed_q_k_v_out_time_major_and_row_logsumexp():
    q, k, v, _ = qkv_dout(2, 3, 20, 8, jnp.float32)
    saved = jax.eval_shape(lambda q, k, v: cpu_attention_fwd(q, k, v, causal=True), q, k, v)[1]
    assert [(a.shape, a.dtype) for a in saved] == [((2, 20, 3, 3, 8), q.dtype), ((2, 20, 3, 8), q.dtype),
                                                   ((2, 3, 20), jnp.float32)]
    qkv, out, lse = cpu_attention_fwd(q, k, v, causal=True)[1]
    for i, part in enumerate((q, k, v)):                                   # qkv[:, t, i, h] = part[:, h, t]
        np.testing.assert_array_equal(qkv[:, :, i], part.swapaxes(1, 2))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(8)
    scores = jnp.where(jnp.tril(jnp.ones((20, 20), bool)), scores, -jnp.inf)
    assert_trees_close(lse, jax.nn.logsumexp(scores, axis=-1), "float32")


def test_vmap_of_grad_is_per_example():
    """vmap runs the kernel once per example (``vmap_method="sequential"``)."""
    q, k, v, _ = qkv_dout(3, 2, 33, 8, jnp.float32, seed=4)
    loss = lambda fn, q, k, v: jnp.sum(jnp.sin(fn(q[None], k[None], v[None], causal=True)))
    grads = jax.vmap(jax.grad(lambda *a: loss(cpu_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    refs = jax.vmap(jax.grad(lambda *a: loss(cpu_attention_ref, *a), argnums=(0, 1, 2)))(q, k, v)
    assert_trees_close(grads, refs, "float32")


def test_auto_picks_the_kernel_on_cpu_for_float32_and_float64_only():
    assert available(jnp.float32) and available(jnp.float64)
    assert kernels.resolve("auto", backend="cpu", dtype="float32") == "cpu"
    assert kernels.resolve("auto", backend="cpu", dtype="float64") == "cpu"
    assert kernels.resolve("auto", backend="cpu", dtype="bfloat16") == "xla"
    assert kernels.resolve("auto", backend="gpu") == "pallas"
    assert kernels.select("cpu")["attention"] is cpu_attention


def test_refuses_an_unsupported_dtype():
    q = jnp.ones((1, 1, 4, 8), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="does not serve bfloat16"):
        cpu_attention(q, q, q, causal=True)


def test_forward_mode_matches_the_twin(x64):
    """jax.jvp runs the hand-written tangent (ρ rebuilt from q and k), not the kernel's backward."""
    q, k, v, _ = qkv_dout(2, 2, 70, 8, jnp.float64, seed=5)
    tangents = qkv_dout(2, 2, 70, 8, jnp.float64, seed=6)[:3]
    out, tangent = jax.jvp(lambda *a: cpu_attention(*a, causal=True), (q, k, v), tuple(tangents))
    out_ref, tangent_ref = jax.jvp(lambda *a: cpu_attention_ref(*a, causal=True), (q, k, v), tuple(tangents))
    assert_trees_close((out, tangent), (out_ref, tangent_ref), "float64")


class SplitCore(NamedTuple):
    """The kernel as a core without its packed entry points (hashable, as op settings must be)."""
    fwd: Callable
    bwd: Callable
    jvp: Callable
    output: Callable
    packed: None = None


@pytest.mark.parametrize("B,T,H,D", [(2, 65, 3, 8), (1, 1, 1, 4)])
def test_layer_hands_the_kernel_qkv_whole(B, T, H, D):
    """The attention layer gives the kernel the qkv projection as it is, (B, T, 3, H, D), and
    takes dqkv back whole: its compiled gradient has no concatenate, where the same kernel
    called on split q, k, v needs one for dq, dk, dv. The gradients are the same."""
    C = H * D
    keys = jax.random.split(jax.random.key(7), 4)
    f32 = jnp.float32
    x, w_qkv, w_o = (normal(k, shape, f32) for k, shape in zip(keys, [(B, T, C), (C, 3 * C), (C, C)]))
    b_qkv, b_o = normal(keys[3], (3 * C,), f32), jnp.zeros((C,), f32)
    split = SplitCore(cpu_attention.fwd, cpu_attention.bwd, cpu_attention.jvp, cpu_attention.output)

    def grad(core):
        def loss(*args):
            return (attention(*args, {}, n_head=H, backward="lean", core=core) ** 2).sum()
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        return fn(x, w_qkv, b_qkv, w_o, b_o), fn.lower(x, w_qkv, b_qkv, w_o, b_o).compile().as_text()

    (packed_grads, packed_hlo), (split_grads, split_hlo) = grad(cpu_attention), grad(split)
    assert "concatenate" not in packed_hlo
    assert "concatenate" in split_hlo
    assert_trees_close(packed_grads, split_grads, "float32")
