"""Property-based fuzzing (hypothesis): random layers, shapes, dtypes, configs and inputs.

Valid draws: the hand-written backward equals autodiff of the ``*_ref`` twin within the one
tolerance rule of :func:`tests.helpers.assert_trees_close` (``GRAD_RTOL``: 1e-12 in float64,
1e-5 in float32, as DESIGN.md says). Invalid draws: the documented ``ValueError`` naming the
argument. A few examples per layer kind run in the default tier, hundreds under ``-m slow``.

Hypothesis tries the simplest draw first (the first value of a ``sampled_from``, the lowest of an
``integers``), so sizes are drawn from lists that start with a general value (T = 5, head size 2)
and end with the edges (T = 1, head size 1): the first examples are not degenerate.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manual_grad import GPTConfig, LoRAConfig, forward, init_params, loss_fn
from manual_grad.config import LORA_TARGETS
from manual_grad.layers.attention import attention, attention_ref
from manual_grad.layers.layernorm import layernorm, layernorm_ref
from manual_grad.layers.loss import IGNORE_INDEX, logits_loss, logits_loss_ref
from manual_grad.layers.mlp import mlp, mlp_ref
from tests.helpers import (GRAD_RTOL, assert_trees_close, assert_vjp_matches, backward_settings, both_backends,
                           normal, random_tree)

COMPILING = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def tiers(default: int, slow: int):
    """(default-tier settings, slow-tier settings) of one property."""
    return (settings(max_examples=default, **COMPILING),
            settings(max_examples=slow, **COMPILING))


# --- layers: manual == autodiff ------------------------------------------------------------------

LAYER_KINDS = ["attention", "mlp", "layernorm", "logits_loss"]


def general_first(*values):
    """A strategy over ``values`` whose simplest (first tried) draw is the first value."""
    return st.sampled_from(values)


@st.composite
def layer_cases(draw, kind=None):
    """(op, ref, args, settings) for a random layer and shape, in float64: a tiny float32
    case (e.g. LayerNorm over C = 2, whose dx is analytically 0) can be pure cancellation
    noise in both backwards; float32 is drawn in the model cases below."""
    kind = kind or draw(st.sampled_from(LAYER_KINDS))
    dtype = "float64"
    B, T = draw(general_first(2, 1)), draw(general_first(5, 6, 3, 2, 1))
    H, D = draw(general_first(2, 1)), draw(general_first(2, 3, 1))
    C, bias = H * D, draw(st.booleans())
    k = iter(jax.random.split(jax.random.key(draw(st.integers(0, 2**16))), 8))
    n = lambda *shape: normal(next(k), shape, dtype)
    b = lambda *shape: n(*shape) if bias else None
    x = n(B, T, C)
    if kind == "layernorm":
        return layernorm, layernorm_ref, (x, n(C), n(C)), dict(
            eps=draw(st.sampled_from([1e-5, 1e-2])), backward=draw(st.sampled_from(["paper", "lean"])))
    if kind == "attention":
        block = draw(st.sampled_from([2, None, 4, 1]))
        return attention, attention_ref, (x, n(C, 3 * C), b(3 * C), n(C, C), b(C), {}), dict(
            n_head=H, causal=draw(st.booleans()), **backward_settings("tile", block))
    if kind == "mlp":
        F = draw(general_first(5, 8, 3, 1))
        return mlp, mlp_ref, (x, n(C, F), b(F), n(F, C), b(C), {}), dict(
            activation=draw(st.sampled_from(["gelu", "relu"])))
    V, tied = draw(general_first(7, 9, 3, 2)), draw(st.booleans())
    targets = jax.random.randint(next(k), (B, T), 0, V)
    targets = jnp.where(jax.random.uniform(next(k), (B, T)) < draw(st.sampled_from([0.5, 0.0, 1.0])),
                        IGNORE_INDEX, targets)
    return logits_loss, logits_loss_ref, (x, n(V, C) if tied else n(C, V), None if tied else b(V), targets, {}), dict(
        tied=tied, **backward_settings("chunk", draw(st.sampled_from([3, None, 1, 16]))))


def check_layer(case):
    op, ref, args, layer_settings = case
    assert_vjp_matches(op, ref, args, layer_settings)


LAYERS_DEFAULT, LAYERS_SLOW = tiers(3, 200)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layers_match_autodiff(x64, kind):
    """A few draws of every layer kind (MLP included) in the default tier."""
    LAYERS_DEFAULT(given(case=layer_cases(kind))(check_layer))()


@pytest.mark.slow
@LAYERS_SLOW
@given(case=layer_cases())
def test_layers_match_autodiff_many(x64, case):
    check_layer(case)


# --- the model: manual == autodiff -----------------------------------------------------------------

@st.composite
def model_cases(draw):
    """(cfg, params, inputs, targets) of a random small GPT and batch, float32 or float64."""
    H, D = draw(general_first(2, 1)), draw(general_first(3, 2, 4, 1))
    lora = None
    if draw(st.booleans()):
        targets = draw(st.lists(st.sampled_from(LORA_TARGETS), min_size=1, max_size=3, unique=True))
        lora = LoRAConfig(rank=min(H * D, draw(general_first(2, 1, 4))), alpha=2.0, targets=tuple(targets))
    tied = draw(st.booleans())
    cfg = GPTConfig(vocab_size=max(H * D, draw(general_first(11, 17, 5, 2))), block_size=draw(general_first(6, 8, 3, 1)),
                    n_layer=draw(general_first(2, 1)), n_head=H, n_embd=H * D, mlp_ratio=draw(general_first(2, 1)),
                    activation=draw(st.sampled_from(["gelu", "relu"])), tied_embeddings=tied,
                    lm_head_bias=not tied and draw(st.booleans()), bias=draw(st.booleans()),
                    causal=draw(st.booleans()), backward=draw(st.sampled_from(["lean", "paper"])),
                    attn_block_size=draw(general_first(2, 4, 3, 1)), loss_chunk=draw(general_first(4, 8, 3, 1)), lora=lora,
                    dtype=draw(st.sampled_from(["float32", "float64"])))
    seed = draw(st.integers(0, 2**16))
    params = init_params(cfg, jax.random.key(seed))
    params = jax.tree.map(jnp.add, params, random_tree(jax.random.key(seed + 1), params, 0.3))
    B, T = draw(general_first(2, 1)), min(cfg.block_size, draw(general_first(5, 8, 2, 1)))
    k1, k2, k3 = jax.random.split(jax.random.key(seed + 2), 3)
    targets = jnp.where(jax.random.uniform(k3, (B, T)) < 0.3, IGNORE_INDEX,
                        jax.random.randint(k2, (B, T), 0, cfg.vocab_size))
    return cfg, params, jax.random.randint(k1, (B, T), 0, cfg.vocab_size), targets


def check_model(case):
    cfg, params, inputs, targets = case
    tol = GRAD_RTOL[cfg.dtype]
    (loss, grads), (loss_ref, grads_ref) = both_backends(cfg, params, inputs, targets)
    assert np.isfinite(float(loss)) and abs(float(loss) - float(loss_ref)) <= tol * max(float(loss_ref), 1.0)
    assert_trees_close(grads, grads_ref, cfg.dtype)


MODEL_DEFAULT, MODEL_SLOW = tiers(4, 200)


@MODEL_DEFAULT
@given(case=model_cases())
def test_model_matches_autodiff(x64, case):
    check_model(case)


@pytest.mark.slow
@MODEL_SLOW
@given(case=model_cases())
def test_model_matches_autodiff_many(x64, case):
    check_model(case)


# --- the loss is the cross-entropy of the logits ---------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_loss_is_the_cross_entropy_of_the_forward_logits(tied):
    """loss_fn equals the mean over counted tokens of -log softmax(forward(...))[target], computed in
    numpy: the loss layer and the logits layer agree (settings included: the LoRA scale of a logits
    adapter, the chunked loss with a padded chunk), which manual-vs-autodiff cannot see when both
    backends share a setting."""
    cfg = GPTConfig(vocab_size=23, block_size=7, n_layer=1, n_head=2, n_embd=8, tied_embeddings=tied,
                    lm_head_bias=not tied, loss_chunk=6, backward="lean",
                    lora=LoRAConfig(rank=2, alpha=6.0, targets=("q", "logits")))
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(jnp.add, params, random_tree(jax.random.key(1), params, 0.3))
    k1, k2 = jax.random.split(jax.random.key(2))
    inputs = jax.random.randint(k1, (2, 7), 0, cfg.vocab_size)
    targets = jax.random.randint(k2, (2, 7), 0, cfg.vocab_size).at[1, 6].set(IGNORE_INDEX)
    z = np.asarray(forward(params, inputs, cfg), np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    t = np.asarray(targets)
    counted = t != IGNORE_INDEX
    expected = -np.take_along_axis(logp, np.where(counted, t, 0)[..., None], -1)[..., 0][counted].mean()
    for backend in ("manual", "autodiff"):
        np.testing.assert_allclose(float(loss_fn(params, inputs, targets, cfg, backend)), expected, rtol=1e-5)


# --- invalid configs: ValueError naming the field ------------------------------------------------------

FIELDS = {
    "vocab_size": st.integers(-3, 20), "block_size": st.integers(-3, 20), "n_layer": st.integers(-2, 3),
    "n_head": st.integers(-2, 5), "n_embd": st.integers(-4, 24), "mlp_ratio": st.integers(-1, 4),
    "dropout": st.sampled_from([-0.5, -0.0, 0.0, 0.1, 0.99, 1.0, 1.5]),
    "ln_eps": st.sampled_from([-1e-5, 0.0, 1e-5]),
    "activation": st.sampled_from(["gelu", "relu", "tanh"]),
    "dtype": st.sampled_from(["float32", "bfloat16", "int8"]),
    "backward": st.sampled_from(["lean", "paper", "fast"]),
}


def expected_error(fields: dict, rank: int | None, lora_targets) -> str | None:
    """The first field the config must reject (an independent statement of the rules), or None."""
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
        if fields[name] <= 0:
            return name
    if fields["n_embd"] % fields["n_head"]:
        return "n_embd"
    checks = {"activation": fields["activation"] in ("gelu", "relu"), "ln_eps": fields["ln_eps"] >= 0,
              "dropout": 0 <= fields["dropout"] < 1, "dtype": fields["dtype"] != "int8",
              "backward": fields["backward"] in ("lean", "paper")}
    for name, ok in checks.items():
        if not ok:
            return name
    if rank is not None:
        smallest = min(fields["n_embd"], fields["vocab_size"] if "logits" in lora_targets else fields["n_embd"])
        if rank > smallest:
            return "lora.rank"
    return None


def check_config(fields, rank, lora_targets):
    if rank is not None and rank <= 0:
        with pytest.raises(ValueError, match="lora.rank"):
            LoRAConfig(rank=rank, targets=lora_targets)
        return
    lora = LoRAConfig(rank=rank, targets=lora_targets) if rank is not None else None
    bad = expected_error(fields, rank, lora_targets)
    if bad is None:
        cfg = GPTConfig(**fields, lora=lora)
        assert cfg.head_size * cfg.n_head == cfg.n_embd
    else:
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            GPTConfig(**fields, lora=lora)


config_draws = dict(fields=st.fixed_dictionaries(FIELDS), rank=st.one_of(st.none(), st.integers(-1, 30)),
                    lora_targets=st.sampled_from([("q", "v"), ("logits",), ("fc", "logits")]))
CONFIG_DEFAULT, CONFIG_SLOW = (settings(max_examples=n, derandomize=True) for n in (100, 1000))


@CONFIG_DEFAULT
@given(**config_draws)
def test_invalid_configs_raise_naming_the_field(fields, rank, lora_targets):
    check_config(fields, rank, lora_targets)


@pytest.mark.slow
@CONFIG_SLOW
@given(**config_draws)
def test_invalid_configs_raise_naming_the_field_many(fields, rank, lora_targets):
    check_config(fields, rank, lora_targets)


# --- invalid token inputs: ValueError naming the argument, before any compute ------------------------

CFG = GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=1, n_embd=4)
PARAMS = init_params(CFG, jax.random.key(0))


@st.composite
def bad_batches(draw):
    """(inputs, targets, the argument to blame, a fragment of the message)."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, CFG.block_size))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    good = lambda: rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    which = draw(st.sampled_from(["inputs", "targets"]))
    fault = draw(st.sampled_from(["too high", "negative", "float", "rank 1", "rank 3", "too long", "empty"]))
    bad, message = good(), ""
    if fault == "too high":
        bad.flat[rng.integers(bad.size)] = draw(st.integers(CFG.vocab_size, 10**6))
        message = "outside"
    elif fault == "negative":
        bad.flat[rng.integers(bad.size)] = draw(st.integers(-10**6, -1).filter(lambda v: v != IGNORE_INDEX))
        message = "outside"
    elif fault == "float":
        bad, message = bad.astype(draw(st.sampled_from([np.float32, np.float16]))), "integer dtype"
    elif fault == "rank 1":
        bad, message = bad.reshape(-1), "rank 2"
    elif fault == "rank 3":
        bad, message = bad[None], "rank 2"
    elif fault == "too long":
        bad, message = rng.integers(0, CFG.vocab_size, (B, CFG.block_size + draw(st.integers(1, 4)))), "block_size"
    else:
        bad, message = bad[:, :0], "T >= 1"
    inputs, targets = (bad, good()) if which == "inputs" else (good(), bad)
    return inputs, targets, which, message


@settings(max_examples=60, derandomize=True, deadline=None)     # the first call's eager dispatch is slow on a busy machine
@given(case=bad_batches())
def test_invalid_token_batches_raise_naming_the_argument(case):
    inputs, targets, which, message = case
    with pytest.raises(ValueError) as error:
        loss_fn(PARAMS, jnp.asarray(inputs), jnp.asarray(targets), CFG)
    assert str(error.value).startswith(which) and message in str(error.value), str(error.value)
