import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad.layers.loss import (IGNORE_INDEX, logits, logits_loss, logits_loss_fwd,
                                     logits_loss_ref, logits_ref)
from tests.helpers import (assert_vjp_matches, backward_settings, check_finite_differences, normal,
                           pairwise_cases)


def _inputs(dtype, B, T, C, V, tied, bias, adapters=False, rank=3, ignore=0.0, seed=0):
    k = iter(jax.random.split(jax.random.key(seed), 10))
    n = lambda *s: normal(next(k), s, dtype)
    targets = jax.random.randint(next(k), (B, T), 0, V)
    targets = jnp.where(jax.random.uniform(next(k), (B, T)) < ignore, IGNORE_INDEX, targets)
    w = n(V, C) if tied else n(C, V)
    lora = {"logits": {"a": n(C, rank), "b": n(rank, V)}} if adapters else {}
    return n(B, T, C), w, (n(V) if bias and not tied else None), targets, lora


CASES = [dict(tied=True, bias=False), dict(tied=False, bias=False), dict(tied=False, bias=True)]


@pytest.mark.parametrize("case", pairwise_cases(
    dtype=["float64", "float32"], head=CASES, adapters=[False, True],
    shape=[(1, 1, 2), (2, 5, 11), (3, 7, 13)], ignore=[0.0, 0.5], chunk=[None, 4, 6, 64]))
def test_logits_loss_vjp_matches_autodiff(x64, case):
    """Both backwards: the paper's (backward="paper", saves the logits) and the chunked one.
    chunk 4 and 6 split (2, 5) into 3 and 2 chunks and (3, 7) into 7 and 4 (the last padded,
    except for 7 chunks of 1); 64 holds the batch in one chunk."""
    (B, T, V), head = case["shape"], case["head"]
    inputs = _inputs(case["dtype"], B, T, 6, V, head["tied"], head["bias"], case["adapters"],
                     ignore=case["ignore"])
    assert_vjp_matches(logits_loss, logits_loss_ref, inputs,
                       dict(tied=head["tied"], lora_scale=0.7, **backward_settings("chunk", case["chunk"])))


@pytest.mark.parametrize("head", CASES, ids=lambda h: f"tied={h['tied']}-bias={h['bias']}")
@pytest.mark.parametrize("chunk", [4, 6])
def test_chunked_loss_padded_chunk_with_ignored_targets(x64, head, chunk):
    """float64, B = 2, T = 5: chunks of 2 positions (the last padded by 1) or 3 (padded by 1), the
    padded chunk holding an ignored target, and an ignored target in the first chunk."""
    x, w, b, targets, lora = _inputs("float64", 2, 5, 6, 11, head["tied"], head["bias"], adapters=True, seed=3)
    targets = targets.at[0, 4].set(IGNORE_INDEX).at[1, 0].set(IGNORE_INDEX)
    assert_vjp_matches(logits_loss, logits_loss_ref, (x, w, b, targets, lora),
                       dict(tied=head["tied"], lora_scale=0.7, backward="lean", chunk=chunk))


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_saves_no_logits(tied):
    """The chunked forward keeps only the per-token log-sum-exp: no residual has V columns."""
    B, T, C, V = 2, 8, 6, 50
    x, w, b, targets, lora = _inputs("float32", B, T, C, V, tied, not tied)
    _, residuals = logits_loss_fwd(x, w, b, targets, lora, tied=tied, backward="lean", chunk=4)
    saved = [r for r in jax.tree.leaves(residuals) if r is not w and r is not b]
    assert all(V not in r.shape for r in saved), [r.shape for r in saved]
    _, paper = logits_loss_fwd(x, w, b, targets, lora, tied=tied)
    assert any(r.shape == (B, T, V) for r in jax.tree.leaves(paper))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_logits_vjp_matches_autodiff(x64, dtype, case):
    x, w, b, _, lora = _inputs(dtype, 2, 4, 6, 9, case["tied"], case["bias"], adapters=True)
    assert_vjp_matches(logits, logits_ref, (x, w, b, lora), dict(tied=case["tied"], lora_scale=2.0))


@pytest.mark.parametrize("chunk", [None, 4])
def test_logits_loss_finite_differences(x64, chunk):
    check_finite_differences(logits_loss, _inputs("float64", 2, 3, 4, 5, False, True, True, ignore=0.3),
                             dict(tied=False, **backward_settings("chunk", chunk)))


def test_loss_is_mean_over_counted_tokens(x64):
    x, w, b, targets, _ = _inputs("float64", 2, 4, 6, 9, False, True)
    targets = targets.at[0, :3].set(IGNORE_INDEX)
    z = np.asarray(x @ w + b)
    lse = np.log(np.exp(z).sum(-1))
    counted = np.asarray(targets) != IGNORE_INDEX
    nll = lse - np.take_along_axis(z, np.maximum(np.asarray(targets), 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(logits_loss(x, w, b, targets, {}, tied=False), nll[counted].mean(), rtol=1e-13)


@pytest.mark.parametrize("chunk", [None, 4])
def test_all_targets_ignored_gives_zero_loss_and_gradient(x64, chunk):
    x, w, b, targets, _ = _inputs("float64", 2, 3, 4, 5, False, True)
    targets = jnp.full_like(targets, IGNORE_INDEX)
    loss, grads = jax.value_and_grad(lambda *a: logits_loss(*a, targets, {}, tied=False, **backward_settings("chunk", chunk)),
                                     (0, 1, 2))(x, w, b)
    assert float(loss) == 0.0 and all(np.all(np.asarray(g) == 0) for g in grads)


def test_logits_gradient_starts_from_softmax_minus_onehot(x64):
    """With x = identity rows and w = I, dL/dz = (softmax(z) - onehot) / N is dL/dw."""
    V = 5
    x = jnp.eye(V)[None]                                          # (1, V, V): token t is e_t
    w = normal(jax.random.key(0), (V, V), "float64")
    targets = jnp.array([[1, 0, 4, 2, 2]])
    dw = jax.grad(lambda w: logits_loss(x, w, None, targets, {}, tied=False))(w)
    expected = (jax.nn.softmax(w, -1) - jax.nn.one_hot(targets[0], V)) / V
    np.testing.assert_allclose(dw, expected, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("chunk", [None, 4])
def test_large_logits_do_not_overflow(x64, chunk):
    x, w, b, targets, _ = _inputs("float32", 2, 3, 4, 5, False, True)
    loss, grads = jax.value_and_grad(lambda *a: logits_loss(*a, targets, {}, tied=False, **backward_settings("chunk", chunk)),
                                     (0, 1, 2))(x * 1e4, w, b)
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads)
