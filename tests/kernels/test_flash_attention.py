"""The Pallas flash attention (interpreted on CPU) against the XLA lean path and autodiff."""
import jax
import jax.numpy as jnp
import pytest

from manual_grad.kernels.flash_attention import (flash_attention, flash_attention_bwd, flash_attention_fwd,
                                                  flash_attention_ref)
from manual_grad.layers.attention import flash_attend_bwd, flash_attend_fwd
from tests.helpers import assert_trees_close, assert_vjp_matches, normal

# (B, H, T, D, causal) with tiles of 16 (see small_tiles)
CASES = [
    (2, 3, 37, 8, True),      # odd T: three tiles, the last padded by 11 rows; D padded to 16
    (1, 1, 1, 4, True),       # T = 1, one head: dq = dk = 0 exactly (ρ = 1)
    (1, 2, 33, 16, False),    # no causal mask: only the padded keys are masked
]


def qkv_dout(B, H, T, D, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [normal(k, (B, H, T, D), jnp.float32) for k in keys]


@pytest.mark.parametrize("B,H,T,D,causal", CASES)
def test_flash_attention_equals_xla_lean_path_and_autodiff(small_tiles, B, H, T, D, causal):
    """The op's forward (out, lse) and backward (dq, dk, dv) against the XLA lean path's, and
    its output and input cotangents against ``jax.vjp`` of the plain-jnp twin: one compile."""
    q, k, v, dout = qkv_dout(B, H, T, D)

    @jax.jit
    def all_three(q, k, v, dout):
        out, residuals = flash_attention_fwd(q, k, v, causal=causal)
        mine = (out, residuals[-1], flash_attention_bwd(causal, residuals, dout))
        xla_out, xla_lse = flash_attend_fwd(q, k, v, causal=causal, block=16)
        xla = (xla_out, xla_lse, flash_attend_bwd(q, k, v, xla_out, xla_lse, dout, causal=causal, block=16))
        ref_out, ref_vjp = jax.vjp(lambda q, k, v: flash_attention_ref(q, k, v, causal=causal), q, k, v)
        return mine, xla, (ref_out, ref_vjp(dout))

    mine, xla, ref = all_three(q, k, v, dout)
    assert_trees_close(mine, xla, "float32")
    assert_trees_close((mine[0], mine[2]), ref, "float32")


def test_flash_attention_op_gradients_match_autodiff(small_tiles):
    """The registered op under ``jax.vjp`` (jit, custom VJP) on the padded multi-tile case."""
    q, k, v, _ = qkv_dout(*CASES[0][:4], seed=1)
    assert_vjp_matches(flash_attention, flash_attention_ref, (q, k, v), dict(causal=True))


def test_flash_attention_saves_out_and_row_logsumexp(small_tiles):
    q, k, v, _ = qkv_dout(1, 2, 20, 8)
    fwd = jax.jit(lambda q, k, v: flash_attention_fwd(q, k, v, causal=True))
    saved = jax.eval_shape(fwd, q, k, v)[1]
    assert [(a.shape, a.dtype) for a in saved] == [(q.shape, q.dtype)] * 4 + [((1, 2, 20), jnp.float32)]
    lse = fwd(q, k, v)[1][-1]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(8.0)
    scores = jnp.where(jnp.tril(jnp.ones((20, 20), bool)), scores, -jnp.inf)
    assert_trees_close(lse, jax.nn.logsumexp(scores, -1), "float32")
