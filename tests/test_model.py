import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from manual_grad import GPTConfig, LoRAConfig, count_params, forward, init_params, loss_fn
from manual_grad.model import IGNORE_INDEX, UNROLLED_DEPTH, merge_lora
from tests.helpers import GRAD_RTOL, assert_trees_close, both_backends, normal, pairwise_grid, random_tree, rel_err

ALL_TARGETS = ("q", "k", "v", "o", "fc", "proj", "logits")
# One jitted forward and one jitted loss-and-gradient shared by the tests (cfg and backend are
# static), so that each model is compiled once instead of dispatched op by op.
jit_forward = jax.jit(forward, static_argnums=(2, 3))
jit_value_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(3, 4))


def random_model(cfg, seed=0, scale=0.3):
    """init_params plus N(0, scale^2) noise on every leaf: biases, LN and LoRA B non-trivial.

    (At GPT-2 init the gradients of a tiny model are small differences of nearly equal
    terms; perturbing keeps the comparison about the backward, not about cancellation.)
    """
    params = init_params(cfg, jax.random.key(seed))
    noise = random_tree(jax.random.key(seed + 1), params, scale)
    return jax.tree.map(jnp.add, params, noise)


def tokens(cfg, B, T, seed=0, ignore=0.0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed + 100), 3)
    inputs = jax.random.randint(k1, (B, T), 0, cfg.vocab_size)
    targets = jax.random.randint(k2, (B, T), 0, cfg.vocab_size)
    return inputs, jnp.where(jax.random.uniform(k3, (B, T)) < ignore, IGNORE_INDEX, targets)


def assert_grads_match(cfg, B, T, seed=0, ignore=0.0):
    params = random_model(cfg, seed)
    inputs, targets = tokens(cfg, B, T, seed, ignore)
    (loss, grads), (loss_ref, grads_ref) = both_backends(cfg, params, inputs, targets)
    assert rel_err(loss, loss_ref) <= GRAD_RTOL[cfg.dtype]
    assert_trees_close(grads, grads_ref, cfg.dtype)
    return grads


GRID = pairwise_grid(dict(
    tied=[True, False], bias=[True, False], activation=["gelu", "relu"], eps=[0.0, 1e-5],
    n_head=[1, 2, 4, 8], batch=[1, 3], full_length=[False, True], n_layer=[1, 3], lora=[False, True],
    backward=["lean", "paper"]))


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_model_gradients_match_autodiff_float64(x64, case):
    cfg = GPTConfig(vocab_size=19, block_size=8, n_layer=case["n_layer"], n_head=case["n_head"],
                    n_embd=16, activation=case["activation"], ln_eps=case["eps"],
                    tied_embeddings=case["tied"], lm_head_bias=case["bias"] and not case["tied"],
                    bias=case["bias"], dtype="float64", backward=case["backward"],
                    # several tiles and chunks, padded: V = 19 > C = 16 turns the chunked loss on;
                    # 3 tokens a chunk: 3 positions at B = 1 (8 -> 9, padded), 1 at B = 3
                    attn_block_size=3, loss_chunk=3,
                    lora=LoRAConfig(rank=2, alpha=4, targets=ALL_TARGETS) if case["lora"] else None)
    assert_grads_match(cfg, case["batch"], cfg.block_size if case["full_length"] else 1, ignore=0.2)


@pytest.mark.parametrize("preset", ["paper", "tiny"])
@pytest.mark.parametrize("backward", ["lean", "paper"])
def test_model_gradients_match_autodiff_float32(preset, backward):
    cfg = GPTConfig.preset(preset, ln_eps=1e-5, backward=backward, attn_block_size=8, loss_chunk=24)
    assert_grads_match(cfg, 2, cfg.block_size)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24))
def test_model_gradients_full_grid_sample_float64(x64, seed):
    """A random sample of the full cartesian grid (the default tier covers every pair)."""
    rng = np.random.default_rng(seed)
    pick = lambda values: values[rng.integers(len(values))]
    tied, n_head = pick([True, False]), pick([1, 2, 4, 8])
    cfg = GPTConfig(vocab_size=int(pick([2, 13, 40])), block_size=int(pick([1, 5, 16])),
                    n_layer=int(pick([1, 2, 3])), n_head=n_head, n_embd=n_head * int(pick([1, 3, 4])),
                    activation=pick(["gelu", "relu"]), ln_eps=pick([0.0, 1e-5]), tied_embeddings=tied,
                    lm_head_bias=bool(not tied and pick([True, False])), bias=bool(pick([True, False])),
                    dtype="float64", backward=pick(["lean", "paper"]),
                    attn_block_size=int(pick([1, 4, 128])), loss_chunk=int(pick([3, 1024])),
                    lora=pick([None, LoRAConfig(rank=1, alpha=2, targets=ALL_TARGETS),
                               LoRAConfig(rank=2, targets=("k", "proj"), convention="alpha")]))
    assert_grads_match(cfg, int(pick([1, 3])), int(pick([1, cfg.block_size])), seed=seed, ignore=0.3)


def test_model_gradients_layernorm_over_two_features(x64):
    """A case hypothesis found: LayerNorm over C = 2 features with eps = 1e-5 scales dx by about
    eps / var, so the gradients below it are 1e-6 of the rest and carry its rounding."""
    cfg = GPTConfig(vocab_size=2, block_size=1, n_layer=1, n_head=1, n_embd=2, ln_eps=1e-5,
                    tied_embeddings=True, attn_block_size=1, loss_chunk=1, dtype="float64")
    assert_grads_match(cfg, 1, 1)


PROPERTY = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.slow
@settings(max_examples=24, **PROPERTY)
@given(data=st.data())
def test_model_gradients_property_many(data):
    """Hypothesis draws configs and shapes, edges included (T=1, head size 1, vocab 2,
    all targets but one ignored). The default tier's model fuzz is tests/test_fuzz.py."""
    check_model_gradients_property(data)


def check_model_gradients_property(data):
    n_head = data.draw(st.sampled_from([1, 2, 4]), "n_head")
    head_size = data.draw(st.sampled_from([1, 2, 4]), "head_size")
    tied = data.draw(st.booleans(), "tied")
    cfg = GPTConfig(vocab_size=data.draw(st.sampled_from([2, 3, 17]), "V"),
                    block_size=data.draw(st.integers(1, 6), "block_size"),
                    n_layer=data.draw(st.integers(1, 2), "n_layer"), n_head=n_head,
                    n_embd=n_head * head_size,
                    activation=data.draw(st.sampled_from(["gelu", "relu"]), "activation"),
                    # LayerNorm over one feature has var = 0: it needs eps > 0
                    ln_eps=1e-5 if n_head * head_size == 1 else data.draw(st.sampled_from([0.0, 1e-5]), "ln_eps"),
                    tied_embeddings=tied, lm_head_bias=not tied and data.draw(st.booleans(), "b"),
                    lora=data.draw(st.sampled_from([None, LoRAConfig(rank=1, targets=ALL_TARGETS)]), "lora"),
                    backward=data.draw(st.sampled_from(["lean", "paper"]), "backward"),
                    attn_block_size=data.draw(st.integers(1, 4), "attn_block_size"),
                    loss_chunk=data.draw(st.integers(1, 8), "loss_chunk"), dtype="float64")
    B = data.draw(st.integers(1, 3), "B")
    T = data.draw(st.integers(1, cfg.block_size), "T")
    one_target = data.draw(st.booleans(), "all_but_one_ignored")
    with jax.enable_x64(True):
        params = random_model(cfg, seed=data.draw(st.integers(0, 100), "seed"))
        inputs, targets = tokens(cfg, B, T)
        if one_target:
            targets = jnp.full_like(targets, IGNORE_INDEX).at[B - 1, T - 1].set(targets[B - 1, T - 1])
        (_, g), (_, g_ref) = both_backends(cfg, params, inputs, targets)
        assert_trees_close(g, g_ref, "float64")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_key_bias_gradient_is_exactly_zero(x64, dtype):
    """db_k is written as exactly 0; the backward's own Σ_tokens dk must be 0 to rounding too.
    ln1's feature 0 is made constant 1 (scale 0, bias 1), so that W_qkv's row 0 gets
    Σ_tokens d(qkv): its key columns are the key bias's gradient before the exact 0 is written."""
    cfg = GPTConfig.preset("tiny", n_layer=3, dtype=dtype)
    params = random_model(cfg)
    ln1 = params["blocks"]["ln1"]
    params["blocks"]["ln1"] = {"scale": ln1["scale"].at[:, 0].set(0), "bias": ln1["bias"].at[:, 0].set(1)}
    inputs, targets = tokens(cfg, 2, cfg.block_size)
    C = cfg.n_embd
    attn = jax.grad(loss_fn)(params, inputs, targets, cfg, "manual")["blocks"]["attn"]
    db, own = np.asarray(attn["b_qkv"]), np.asarray(attn["w_qkv"][:, 0], np.float64)       # (L, 3C)
    assert db.shape == (3, 3 * C)
    assert np.all(db[:, C:2 * C] == 0)
    assert np.all(np.abs(db[:, :C]).sum(-1) > 0)
    assert np.abs(own[:, C:2 * C]).max() <= 10 * GRAD_RTOL[dtype] * np.abs(own[:, :C]).max()
    np.testing.assert_allclose(own[:, :C], db[:, :C], rtol=1e-3, atol=1e-3 * np.abs(db[:, :C]).max())


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-4)])
def test_forward_logits_agree_between_backends(x64, dtype, tol):
    cfg = GPTConfig.preset("tiny", tied_embeddings=False, lm_head_bias=True, dtype=dtype,
                           lora=LoRAConfig(rank=2, targets=ALL_TARGETS))
    params = random_model(cfg)
    inputs, _ = tokens(cfg, 2, 9)
    z = jit_forward(params, inputs, cfg, "manual")
    assert z.shape == (2, 9, cfg.vocab_size) and z.dtype == jnp.dtype(dtype)
    assert rel_err(z, jit_forward(params, inputs, cfg, "autodiff")) <= tol


# --- parameter counts: the paper's numbers -------------------------------------------------

GPT2_LORA = LoRAConfig(rank=16, alpha=16, targets=ALL_TARGETS)


@pytest.mark.parametrize("cfg,which,expected", [
    (GPTConfig.preset("gpt2"), "all", 124_439_808),
    (GPTConfig.preset("gpt2-untied"), "all", 163_087_441),
    (GPTConfig.preset("gpt2-untied", n_layer=1), "all", 85_120_849),
    (GPTConfig.preset("gpt2", lora=LoRAConfig(rank=16, targets=("logits",))), "lora", 816_400),
    (GPTConfig.preset("gpt2", lora=GPT2_LORA), "lora", 3_470_608),
    (GPTConfig.preset("gpt2", lora=GPT2_LORA), "base", 124_439_808),
])
def test_count_params_reproduces_the_paper(cfg, which, expected):
    assert count_params(cfg, which=which) == expected


def test_count_params_one_block_is_12d2_plus_13d():
    blocks = jax.eval_shape(lambda: init_params(GPTConfig.preset("gpt2", n_layer=1), jax.random.key(0)))
    d = 768
    assert count_params(blocks["blocks"]) == 12 * d * d + 13 * d == 7_087_872


def test_count_params_of_arrays_equals_count_of_config():
    cfg = GPTConfig.preset("tiny", lora=LoRAConfig(rank=2))
    params = init_params(cfg, jax.random.key(0))
    assert count_params(params) == count_params(cfg) == sum(x.size for x in jax.tree.leaves(params))


# --- jit, scan and compile size -------------------------------------------------------------

@pytest.mark.parametrize("backend", ["manual", "autodiff"])
def test_jit_value_and_grad(backend):
    cfg = GPTConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    inputs, targets = tokens(cfg, 2, 16)
    step = jax.jit(jax.value_and_grad(loss_fn), static_argnames=("cfg", "backend"))
    loss, grads = step(params, inputs, targets, cfg=cfg, backend=backend)
    assert np.isfinite(float(loss)) and abs(float(loss) - np.log(cfg.vocab_size)) < 0.5
    assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.parametrize("backend", ["manual", "autodiff"])
def test_program_size_does_not_grow_with_depth(backend):
    """Blocks run in a lax.scan: the lowered GPT-2 program has one size from the first rolled
    depth on (3, 12, 24 layers), and the unrolled stacks (1 and 2 layers) stay within a fifth of
    it (from shapes only, nothing allocated)."""
    def hlo_size(n_layer):
        cfg = GPTConfig.preset("gpt2", n_layer=n_layer)
        params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
        ids = jax.ShapeDtypeStruct((1, 64), jnp.int32)
        fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(3, 4))
        return len(fn.lower(params, ids, ids, cfg, backend).as_text().splitlines())
    assert UNROLLED_DEPTH == 2
    size = {n_layer: hlo_size(n_layer) for n_layer in (1, 2, 3, 12, 24)}
    assert size[24] == size[12] == size[3]
    assert size[1] < size[2] <= 1.2 * size[3]


def test_shallow_stacks_are_unrolled():
    """Up to UNROLLED_DEPTH blocks the gradient program has no loop over the layers; one more
    block adds one forward and one backward loop (the attention's and the loss's own loops are
    the same at every depth)."""
    def loops(n_layer):
        cfg = GPTConfig.preset("tiny", n_layer=n_layer)
        params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
        ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(3, 4))
        return fn.lower(params, ids, ids, cfg, "manual").as_text().count("stablehlo.while")
    assert loops(1) == loops(UNROLLED_DEPTH) == loops(UNROLLED_DEPTH + 1) - 2


def test_merge_lora_gives_the_same_model():
    for tied in (True, False):
        cfg = GPTConfig.preset("tiny", tied_embeddings=tied, lora=LoRAConfig(rank=2, targets=ALL_TARGETS))
        params = random_model(cfg)
        inputs, _ = tokens(cfg, 2, 8)
        merged, merged_cfg = merge_lora(params, cfg)
        assert merged_cfg.lora is None and "lora" not in merged
        np.testing.assert_allclose(jit_forward(merged, inputs, merged_cfg, "manual"),
                                   jit_forward(params, inputs, cfg, "manual"),
                                   rtol=1e-4, atol=1e-4)


def test_lora_starts_as_the_base_model():
    cfg = GPTConfig.preset("tiny", lora=LoRAConfig(rank=4, targets=ALL_TARGETS))
    params = init_params(cfg, jax.random.key(0))
    base = {k: v for k, v in params.items() if k != "lora"}
    inputs, _ = tokens(cfg, 1, 8)
    np.testing.assert_array_equal(jit_forward(params, inputs, cfg, "manual"),
                                  jit_forward(base, inputs, cfg.replace(lora=None), "manual"))


# --- bad input: ValueError naming the argument, before any compute -----------------------------

@pytest.mark.parametrize("make,name", [
    (lambda cfg: (jnp.zeros((2, 4), jnp.int32).at[0, 1].set(65), None), "inputs"),
    (lambda cfg: (jnp.zeros((2, 4), jnp.int32).at[0, 1].set(-1), None), "inputs"),
    (lambda cfg: (jnp.zeros((2, 33), jnp.int32), None), "inputs"),
    (lambda cfg: (jnp.zeros((4,), jnp.int32), None), "inputs"),
    (lambda cfg: (jnp.zeros((2, 4), jnp.float32), None), "inputs"),
    (lambda cfg: (jnp.zeros((2, 4), jnp.int32), jnp.full((2, 4), 70)), "targets"),
    (lambda cfg: (jnp.zeros((2, 4), jnp.int32), jnp.full((2, 4), -2)), "targets"),
    (lambda cfg: (jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 3), jnp.int32)), "targets"),
    (lambda cfg: (jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4), jnp.float32)), "targets"),
])
def test_bad_input_raises_value_error(make, name):
    cfg = GPTConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    inputs, targets = make(cfg)
    with pytest.raises(ValueError, match=name):
        if targets is None:
            forward(params, inputs, cfg)
        else:
            loss_fn(params, inputs, targets, cfg)


def test_bad_backend_and_mismatched_params():
    cfg = GPTConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="backend"):
        loss_fn(params, ids, ids, cfg, backend="torch")
    with pytest.raises(ValueError, match="params"):
        forward(params, ids, cfg.replace(n_embd=64))
    with pytest.raises(ValueError, match="cfg"):
        init_params({"n_layer": 2}, jax.random.key(0))


# --- lean backward: memory, and mixed precision -------------------------------------------------

def compiled_step_memory(cfg, backend, B, T):
    """XLA's accounting of the compiled value_and_grad step: temp bytes (activations saved for
    the backward and scratch), from shapes only."""
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    step = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(3, 4))
    return step.lower(params, ids, ids, cfg, backend).compile().memory_analysis().temp_size_in_bytes


def test_lean_backward_needs_less_than_half_the_memory_of_autodiff():
    cfg = GPTConfig(vocab_size=2048, block_size=512, n_layer=2, n_head=4, n_embd=64,
                    attn_block_size=64, loss_chunk=256)
    lean = compiled_step_memory(cfg, "manual", 4, 512)
    paper = compiled_step_memory(cfg.replace(backward="paper"), "manual", 4, 512)
    autodiff = compiled_step_memory(cfg, "autodiff", 4, 512)
    assert lean < 0.5 * autodiff and lean < paper, (lean, paper, autodiff)


@pytest.mark.parametrize("dtype,backward", [
    ("bfloat16", "lean"),
    pytest.param("bfloat16", "paper", marks=pytest.mark.slow),
    pytest.param("float16", "lean", marks=pytest.mark.slow),
    pytest.param("float16", "paper", marks=pytest.mark.slow)])
def test_mixed_precision_tracks_float32(dtype, backward):
    """Half-precision compute with float32 parameters: same loss and gradients as float32 to
    half-precision rounding, gradients returned in float32."""
    cfg32 = GPTConfig.preset("tiny", backward=backward, attn_block_size=8, loss_chunk=16)
    cfg = cfg32.replace(dtype=dtype)
    params = random_model(cfg32, scale=0.1)
    assert cfg.storage_dtype == "float32"
    inputs, targets = tokens(cfg, 2, 32)
    loss32, g32 = jit_value_and_grad(params, inputs, targets, cfg32, "manual")
    loss, g = jit_value_and_grad(params, inputs, targets, cfg, "manual")
    _, g_ref = jit_value_and_grad(params, inputs, targets, cfg, "autodiff")
    assert loss.dtype == jnp.float32 and abs(float(loss) - float(loss32)) < 0.02 * float(loss32)
    for a, b, c in zip(jax.tree.leaves(g), jax.tree.leaves(g32), jax.tree.leaves(g_ref)):
        assert a.dtype == jnp.float32
        assert rel_err(a, b) < 0.1 and rel_err(a, c) < 0.1
