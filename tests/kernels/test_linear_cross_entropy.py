"""The fused Pallas logits + cross-entropy (interpreted on CPU) against the XLA lean path and autodiff."""
import jax
import jax.numpy as jnp
import pytest

from manual_grad.kernels.linear_cross_entropy import (linear_cross_entropy, linear_cross_entropy_bwd,
                                                       linear_cross_entropy_fwd, linear_cross_entropy_ref)
from manual_grad.layers.loss import IGNORE_INDEX, logits_loss
from tests.helpers import assert_trees_close, assert_vjp_matches, normal

# (token shape, C, V, tied, bias, ignored fraction) with tiles of 16 (see small_tiles)
CASES = [
    ((2, 13), 24, 37, False, True, 0.3),   # 26 tokens, V = 37, C = 24: every axis padded
    ((1, 1), 8, 5, True, False, 0.0),      # one token, a vocabulary smaller than a tile
    ((3, 7), 40, 64, True, False, 0.0),    # three chunks of C, whole vocabulary tiles
    ((2, 9), 16, 33, False, False, 0.95),  # all targets ignored but one
]


def head_inputs(shape, C, V, tied, bias, ignored, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = normal(keys[0], (*shape, C), jnp.float32)
    w = normal(keys[1], (V, C) if tied else (C, V), jnp.float32, 0.3)
    b = normal(keys[2], (V,), jnp.float32) if bias else None
    targets = jax.random.randint(keys[3], shape, 0, V)
    drop = jax.random.uniform(keys[4], shape) < ignored
    targets = jnp.where(drop.at[(0,) * len(shape)].set(False), IGNORE_INDEX, targets)
    return x, w, b, targets


@pytest.mark.parametrize("shape,C,V,tied,bias,ignored", CASES)
def test_linear_cross_entropy_equals_chunked_xla_loss_and_autodiff(small_tiles, shape, C, V, tied, bias, ignored):
    """The op's loss and (dx, dW, db) against the chunked XLA loss's and against
    ``jax.value_and_grad`` of the plain-jnp twin: one compile."""
    x, w, b, targets = head_inputs(shape, C, V, tied, bias, ignored)

    @jax.jit
    def all_three(x, w, b):
        loss, residuals = linear_cross_entropy_fwd(x, w, b, targets, tied=tied)
        mine = (loss, linear_cross_entropy_bwd(tied, residuals, jnp.ones((), loss.dtype))[:3])
        chunked = jax.value_and_grad(
            lambda *a: logits_loss(*a, targets, {}, tied=tied, backward="lean", chunk=8), (0, 1, 2))
        ref = jax.value_and_grad(lambda *a: linear_cross_entropy_ref(*a, targets, tied=tied), (0, 1, 2))
        return mine, chunked(x, w, b), ref(x, w, b)

    mine, xla, ref = all_three(x, w, b)
    assert_trees_close(mine, xla, "float32")
    assert_trees_close(mine, ref, "float32")


def test_linear_cross_entropy_op_gradients_match_autodiff(small_tiles):
    """The registered op under ``jax.vjp`` (jit, custom VJP) on the everything-padded case."""
    x, w, b, targets = head_inputs(*CASES[0], seed=1)
    assert_vjp_matches(linear_cross_entropy, linear_cross_entropy_ref, (x, w, b, targets), dict(tied=False))


def test_linear_cross_entropy_saves_per_token_logsumexp_and_no_logits(small_tiles):
    x, w, b, targets = head_inputs((2, 5), 8, 40, False, True, 0.0)
    fwd = jax.jit(lambda x, w, b: linear_cross_entropy_fwd(x, w, b, targets, tied=False))
    saved = jax.eval_shape(fwd, x, w, b)[1]
    assert [a.shape for a in saved] == [x.shape, w.shape, b.shape, targets.shape, (10,)]
    lse = fwd(x, w, b)[1][-1]
    assert_trees_close(lse, jax.nn.logsumexp((x @ w + b).reshape(10, 40), -1), "float32")


def test_all_targets_ignored_gives_zero_loss_and_gradients(small_tiles):
    x, w, b, _ = head_inputs((2, 3), 8, 20, False, True, 0.0)
    targets = jnp.full((2, 3), IGNORE_INDEX)
    step = jax.jit(jax.value_and_grad(lambda *a: linear_cross_entropy(*a, targets), (0, 1, 2)))
    loss, grads = step(x, w, b)
    assert float(loss) == 0.0 and all(not jnp.any(g) for g in grads)
