"""Numerical edge cases: each is finite (or documented as not), and the hand-written backward
equals autodiff of the plain-jnp twin in each."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad import GPTConfig, init_params, loss_fn
from manual_grad.layers.attention import attention, attention_ref
from manual_grad.layers.layernorm import layernorm, layernorm_ref
from manual_grad.layers.loss import IGNORE_INDEX, logits_loss, logits_loss_ref
from manual_grad.model import BACKENDS
from tests.helpers import assert_vjp_matches, backward_settings, normal, random_tree, rel_err, vjp_both

CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8, attn_block_size=4, loss_chunk=8)
value_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(3, 4))


def _all_finite(tree) -> bool:
    return all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(tree))


def _attention_args(key, B, T, C, dtype="float32", scale=1.0):
    k = jax.random.split(key, 5)
    return (normal(k[0], (B, T, C), dtype, scale), normal(k[1], (C, 3 * C), dtype), normal(k[2], (3 * C,), dtype),
            normal(k[3], (C, C), dtype), normal(k[4], (C,), dtype), {})


def _model(cfg, seed=0):
    params = init_params(cfg, jax.random.key(seed))
    return jax.tree.map(jnp.add, params, random_tree(jax.random.key(seed + 1), params, 0.3))


# --- huge logits and scores ----------------------------------------------------------------------

@pytest.mark.parametrize("tied, chunk", [(True, None), (False, 4), pytest.param(True, 4, marks=pytest.mark.slow),
                                         pytest.param(False, None, marks=pytest.mark.slow)])
def test_logits_of_magnitude_1e4_give_the_exact_finite_loss(chunk, tied):
    B, T, C, V = 2, 3, 8, 11
    k = jax.random.split(jax.random.key(0), 3)
    x, w = normal(k[0], (B, T, C), "float32", 100.0), normal(k[1], (V, C) if tied else (C, V), "float32", 30.0)
    targets = jax.random.randint(k[2], (B, T), 0, V)
    z = np.einsum("btc,vc->btv" if tied else "btc,cv->btv", np.float64(x), np.float64(w))
    assert 5e3 < np.abs(z).max() < 1e5                                     # the regime under test
    lse = np.logaddexp.reduce(z, axis=-1)                                  # float64, independent
    expected = np.mean(lse - np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0])
    settings = dict(tied=tied, **backward_settings("chunk", chunk))
    assert abs(float(logits_loss(x, w, None, targets, {}, **settings)) - expected) <= 1e-5 * expected
    grads = assert_vjp_matches(logits_loss, logits_loss_ref, (x, w, None, targets, {}), settings, rtol=1e-4)
    assert _all_finite(grads)


@pytest.mark.parametrize("tile", [pytest.param(None, marks=pytest.mark.slow), 2])
def test_attention_scores_of_magnitude_1e4_are_finite(tile):
    args = _attention_args(jax.random.key(1), 2, 5, 8, scale=60.0)
    q, k = np.split(np.float64(args[0]) @ np.float64(args[1]) + np.float64(args[2]), 3, axis=-1)[:2]
    assert np.abs(q[..., :4] @ k[..., :4].swapaxes(-1, -2)).max() / 2 > 1e4   # head 0's scaled scores
    settings = dict(n_head=2, causal=True, **backward_settings("tile", tile))
    grads = assert_vjp_matches(attention, attention_ref, args, settings, rtol=1e-4)
    assert _all_finite(attention(*args, **settings)) and _all_finite(grads)


# --- LayerNorm of a constant row ---------------------------------------------------------------

def _with_constant_row(key, dtype="float32"):
    x = normal(key, (2, 3, 8), dtype)
    return x.at[1, 2].set(0.75)                                             # one constant row


@pytest.mark.parametrize("backward", ["paper", "lean"])
def test_layernorm_constant_row_with_eps_is_finite_and_gives_the_bias(backward):
    k = jax.random.split(jax.random.key(2), 3)
    x, scale, bias = _with_constant_row(k[0]), normal(k[1], (8,), "float32"), normal(k[2], (8,), "float32")
    settings = dict(eps=1e-5, backward=backward)
    y = layernorm(x, scale, bias, **settings)
    np.testing.assert_array_equal(y[1, 2], bias)                            # x̂ = 0 exactly
    grads = assert_vjp_matches(layernorm, layernorm_ref, (x, scale, bias), settings)
    assert _all_finite(y) and _all_finite(grads)


@pytest.mark.parametrize("backward", ["paper", "lean"])
def test_layernorm_constant_row_with_eps_0_is_nan_in_that_row_only(backward):
    """Documented: with eps = 0 a constant row has σ = 0, and x̂ = 0/0 is NaN (the paper's
    formula, in both backends); every other row, and its gradient, is unaffected."""
    k = jax.random.split(jax.random.key(3), 3)
    x, scale, bias = _with_constant_row(k[0]), normal(k[1], (8,), "float32"), normal(k[2], (8,), "float32")
    settings = dict(eps=0.0, backward=backward)
    y, y_ref, (dx, _, _), (dx_ref, _, _) = vjp_both(layernorm, layernorm_ref, (x, scale, bias), settings,
                                                     jax.random.key(4))
    bad = np.zeros(x.shape[:2], bool)
    bad[1, 2] = True
    for out in (y, y_ref, dx, dx_ref):
        assert np.isnan(out[bad]).all() and np.isfinite(out[~bad]).all()
    assert rel_err(y[~bad], y_ref[~bad]) < 1e-6 and rel_err(dx[~bad], dx_ref[~bad]) < 1e-5


# --- attention rows with a single visible key ---------------------------------------------------

@pytest.mark.parametrize("T, tile", [(1, None), (4, 2), pytest.param(1, 2, marks=pytest.mark.slow),
                                           pytest.param(4, None, marks=pytest.mark.slow)])
def test_attention_row_with_one_visible_key_returns_its_value(T, tile):
    """Causal row 0 sees only key 0: its softmax is exactly [1], so y_0 = v_0 W_o + b_o."""
    x, w_qkv, b_qkv, w_o, b_o, adapters = args = _attention_args(jax.random.key(5), 2, T, 8)
    settings = dict(n_head=2, causal=True, **backward_settings("tile", tile))
    v0 = np.float64(x[:, 0]) @ np.float64(w_qkv[:, 16:]) + np.float64(b_qkv[16:])
    np.testing.assert_allclose(attention(*args, **settings)[:, 0], v0 @ np.float64(w_o) + np.float64(b_o),
                               rtol=1e-5, atol=1e-5)
    assert_vjp_matches(attention, attention_ref, args, settings)


# --- the model: all targets ignored, T = 1 --------------------------------------------------------

@pytest.mark.parametrize("backward", ["lean", pytest.param("paper", marks=pytest.mark.slow)])
def test_all_targets_ignored_gives_zero_loss_and_zero_gradient(backward):
    cfg = CFG.replace(backward=backward)
    params = _model(cfg)
    inputs = jax.random.randint(jax.random.key(6), (2, 8), 0, cfg.vocab_size)
    targets = jnp.full_like(inputs, IGNORE_INDEX)
    for backend in BACKENDS:
        loss, grads = value_and_grad(params, inputs, targets, cfg, backend)
        assert float(loss) == 0.0, backend
        assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads)), backend   # exactly 0, no NaN


@pytest.mark.parametrize("dtype, backward", [("float32", "lean"), ("float16", "lean"),
                                            pytest.param("float32", "paper", marks=pytest.mark.slow)])
def test_single_token_sequences_match_autodiff(dtype, backward):
    cfg = CFG.replace(backward=backward, dtype=dtype)
    params = _model(cfg)
    inputs, targets = (jax.random.randint(k, (3, 1), 0, cfg.vocab_size) for k in jax.random.split(jax.random.key(7)))
    (loss, grads), (loss_ref, grads_ref) = (value_and_grad(params, inputs, targets, cfg, b) for b in BACKENDS)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert np.isfinite(float(loss)) and abs(float(loss) - float(loss_ref)) <= tol * float(loss_ref)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g_ref = grads_ref
        for key in path:
            g_ref = g_ref[key.key]
        # T = 1: ρ = [1] so the q and k gradients are analytically 0 (rounding noise in both).
        if np.linalg.norm(np.asarray(g_ref, np.float64)) > 1e-6:
            assert rel_err(g, g_ref) <= tol, (jax.tree_util.keystr(path), rel_err(g, g_ref))
        else:
            assert np.abs(np.asarray(g, np.float64)).max() <= 1e-5, jax.tree_util.keystr(path)


# --- half-precision inputs to the layers ------------------------------------------------------

def _half_cases(dtype):
    k = jax.random.split(jax.random.key(8), 4)
    x = normal(k[0], (2, 5, 8), dtype)
    targets = jax.random.randint(k[1], (2, 5), 0, 11).at[0, 1].set(IGNORE_INDEX)
    return {
        "layernorm": (layernorm, layernorm_ref, (x, normal(k[2], (8,), dtype), normal(k[3], (8,), dtype)),
                      dict(eps=1e-5, backward="lean")),
        "attention": (attention, attention_ref, _attention_args(k[2], 2, 5, 8, dtype),
                      dict(n_head=2, causal=True, backward="lean", tile=2)),
        "logits_loss": (logits_loss, logits_loss_ref, (x, normal(k[3], (11, 8), dtype), None, targets, {}),
                        dict(tied=True, backward="lean", chunk=4)),
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("layer", ["layernorm", "attention", "logits_loss"])
def test_half_precision_inputs_match_autodiff_and_float32(dtype, layer):
    op, ref, args, settings = _half_cases(dtype)[layer]
    y, y_ref, grads, grads_ref = vjp_both(op, ref, args, settings, jax.random.key(9))
    args32 = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, args)
    y32 = op(*args32, **settings)
    assert y.dtype == (jnp.float32 if layer == "logits_loss" else jnp.dtype(dtype))
    assert _all_finite((y, grads)) and rel_err(y, y_ref) < 1e-2 and rel_err(y, y32) < 2e-2
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert g.dtype == g_ref.dtype and rel_err(g, g_ref) < 3e-2
