"""Every JAX transformation a user reaches for, on the hand-written ops, in float64, against the
same transformation of the ``*_ref`` twins (docs/transformations.md lists them).

Per layer op: jax.jvp (the hand-written tangent formula), vmap(grad) per-example gradients, and
Hessian-vector products both ways (grad of grad, jvp of grad). Whole model (tiny configs): jvp
and jacfwd, vmap(grad), HVPs, full Hessians by jax.jacrev(jax.jacrev(f)) and jax.hessian,
jax.checkpoint policies (including the ``<op>_residuals`` names), jax.export round trips,
lax.scan and vmap over layers, jax.eval_shape. And the proof that jax.grad runs the
hand-written backward, and the error of forward mode on an op without a tangent formula.
"""
from __future__ import annotations

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params
from jax.flatten_util import ravel_pytree

from manual_grad import GPTConfig, init_params, layers, loss_fn
from manual_grad.layers.cross_attention import cross_attention, cross_attention_ref
from manual_grad.model import _layer_settings
from manual_grad.vjp import manual_vjp
from tests.helpers import assert_trees_close, normal, random_tree

B, T, C, H, V, F = 2, 5, 4, 2, 11, 8
# These programs run once: XLA's cheapest optimisation level compiles them in about 60% of the time.
QUICK = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_once(f, *args):
    """``jax.jit(f)(*args)``, compiled at the cheapest optimisation level."""
    return jax.jit(f).lower(*args).compile(compiler_options=QUICK)(*args)


def _model_settings(op, backward):
    """The settings the model gives ``op`` with the paper's or the lean backward (flash tiles of
    2 tokens, loss chunks of 4 tokens), so these tests follow the model's own choices."""
    cfg = GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=H, n_embd=C, dtype="float64",
                    backward=backward, attn_block_size=2, loss_chunk=4, kernels="xla",
                    tied_embeddings=False, lm_head_bias=True)
    return _layer_settings(cfg, "manual")[op]


def _case(name):
    """(op, ref, args, settings, batched): ``batched`` are the inputs that carry examples."""
    k = iter(jax.random.split(jax.random.key(0), 16))
    n = lambda *s, std=0.5: normal(next(k), s, "float64", std)
    x = n(B, T, C, std=1.0)
    ids = jax.random.randint(next(k), (B, T), 0, V)
    kind, _, variant = name.partition("-")
    if kind == "linear":
        return layers.linear, layers.linear_ref, (x, n(C, F), n(F)), {}, (0,)
    if kind == "lora_linear":
        return (layers.lora_linear, layers.lora_linear_ref, (x, n(C, F), n(F), n(C, 2), n(2, F)),
                dict(scale=0.5), (0,))
    if kind == "embedding":
        return layers.embedding, layers.embedding_ref, (ids, n(V, C), n(8, C)), {}, (0,)
    if kind == "layernorm":
        return (layers.layernorm, layers.layernorm_ref, (x, 1.0 + n(C), n(C)),
                _model_settings("layernorm", variant), (0,))
    if kind in ("gelu", "relu"):
        return getattr(layers, kind), getattr(layers, kind + "_ref"), (2.0 * x,), {}, (0,)
    if kind == "dropout":
        return layers.dropout, layers.dropout_ref, (x, jax.random.key(3)), dict(rate=0.3), (0,)
    if kind == "mlp":
        adapters = {"fc": {"a": n(C, 2), "b": n(2, F)}}
        return (layers.mlp, layers.mlp_ref, (x, n(C, F), n(F), n(F, C), n(C), adapters),
                dict(activation=variant, lora_scale=0.5), (0,))
    if kind == "attention":
        adapters = {"q": {"a": n(C, 2), "b": n(2, C)}, "v": {"a": n(C, 2), "b": n(2, C)}}
        return (layers.attention, layers.attention_ref, (x, n(C, 3 * C), n(3 * C), n(C, C), n(C), adapters),
                {**_model_settings("attention", variant), "lora_scale": 0.5}, (0,))
    if kind == "logits":
        return (layers.logits, layers.logits_ref, (x, n(V, C), None, {"logits": {"a": n(C, 2), "b": n(2, V)}}),
                dict(tied=True, lora_scale=0.5), (0,))
    if kind == "loss":
        targets = jnp.roll(ids, -1, 1).at[0, 2].set(-100)
        return (layers.logits_loss, layers.logits_loss_ref, (x, n(C, V), n(V), targets, {}),
                _model_settings("loss", variant), (0, 3))
    raise ValueError(name)


LAYER_CASES = ["linear", "lora_linear", "embedding", "layernorm-paper", "layernorm-lean", "gelu", "relu",
               "dropout", "mlp-gelu", "attention-paper", "attention-lean", "logits", "loss-paper",
               "loss-lean"]


def _is_float(a):
    leaves = jax.tree.leaves(a)
    return bool(leaves) and all(jnp.issubdtype(l.dtype, jnp.floating) for l in leaves)


def _layer_transforms(op, args, settings, batched, key):
    """jvp, per-example gradients and the HVP by grad of grad (whose second reverse pass is the
    transpose of the backward: the tangent formula again) of ``<op(args), ct>`` with respect to
    the floating inputs, in one jitted function."""
    where = [i for i, a in enumerate(args) if _is_float(a)]
    float_args = [args[i] for i in where]
    k_t, k_ct, k_v, k_ex = jax.random.split(key, 4)
    tangents = random_tree(k_t, float_args)
    ct = random_tree(k_ct, jax.eval_shape(lambda: op(*args, **settings)))
    v = random_tree(k_v, float_args)
    # a second example for every input that carries examples: (2, ...) stacks
    examples = [jnp.stack([a, a * 0.5 + normal(k_ex, a.shape, a.dtype)]) if i in batched and _is_float(a)
                else jnp.stack([a, jnp.roll(a, 1)]) if i in batched else a for i, a in enumerate(args)]

    def call(float_args, args=args):
        full = list(args)
        for i, a in zip(where, float_args):
            full[i] = a
        return op(*full, **settings)

    def scalar(float_args, args=args):
        return sum(jnp.vdot(y, c) for y, c in zip(jax.tree.leaves(call(float_args, args)), jax.tree.leaves(ct)))

    def per_example(example_args):
        return jax.grad(scalar)([example_args[i] for i in where], example_args)

    def run(float_args, tangents, v, examples):
        grad = jax.grad(scalar)
        in_axes = [0 if i in batched else None for i in range(len(args))]
        return {
            "jvp": jax.jvp(call, (float_args,), (tangents,)),
            "vmap(grad)": jax.vmap(per_example, in_axes=(in_axes,))(examples),
            "grad(grad)": jax.grad(lambda p: sum(jnp.vdot(g, w) for g, w in zip(
                jax.tree.leaves(grad(p)), jax.tree.leaves(v))))(float_args),
        }
    return run_once(run, float_args, tangents, v, examples)


@pytest.mark.parametrize("name", LAYER_CASES)
def test_layer_transformations_match_autodiff(x64, name):
    op, ref, args, settings, batched = _case(name)
    got = _layer_transforms(op, args, settings, batched, jax.random.key(7))
    want = _layer_transforms(ref, args, settings, batched, jax.random.key(7))
    assert_trees_close(got, want, "float64")


# --- the whole model ------------------------------------------------------------------------

def _model(backward="paper", **fields):
    cfg = GPTConfig(**{**dict(vocab_size=V, block_size=8, n_layer=1, n_head=H, n_embd=8, dtype="float64",
                              backward=backward, attn_block_size=2, loss_chunk=4, kernels="xla",
                              tied_embeddings=False, lm_head_bias=True), **fields})
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.1 * normal(jax.random.key(p.size), p.shape, p.dtype), params)
    inputs = jax.random.randint(jax.random.key(1), (B, min(T, cfg.block_size)), 0, cfg.vocab_size)
    targets = jnp.roll(inputs, -1, 1).at[1, 0].set(-100)
    return cfg, params, inputs, targets


def test_model_forward_mode_per_example_grads_and_hessians_match_autodiff(x64):
    """On a tiny model with dropout on, so every op of the model is crossed, with both backwards
    (lean: flash attention, chunked loss, LayerNorm from x; paper: ρ, logits, x̂ saved):

    * jax.jvp of loss_fn(..., backend="manual") equals autodiff's to 1e-12 (the acceptance);
    * vmap(grad): per-example gradients;
    * (paper) full Hessians over every parameter by jax.jacrev(jax.jacrev(f)) (grad of grad: its
      outer reverse pass transposes the backwards, i.e. runs the tangent formulas) and by
      jax.hessian (jacfwd of grad: forward mode through the backwards).
    """
    cfg, params, inputs, targets = _model("lean", n_embd=4, vocab_size=5, block_size=3, loss_chunk=2,
                                          dropout=0.2)
    flat, unravel = ravel_pytree(params)
    tangent = normal(jax.random.key(2), flat.shape, flat.dtype)

    def run(flat, tangent, backend, cfg, hessians):
        def loss(w, x=inputs, y=targets):
            return loss_fn(unravel(w), x, y, cfg, backend, dropout_key=jax.random.key(5))
        out = {"jvp": jax.jvp(loss, (flat,), (tangent,)),
               "vmap(grad)": jax.vmap(lambda x, y: jax.grad(loss)(flat, x[None], y[None]))(inputs, targets)}
        if hessians:
            out["hessian"] = jax.hessian(loss)(flat)
        if hessians and backend == "manual":
            out["jacrev(jacrev)"] = jax.jacrev(jax.jacrev(loss))(flat)
        return out

    def runs(backend, cfg, hessians):
        return run_once(functools.partial(run, backend=backend, cfg=cfg, hessians=hessians), flat, tangent)

    want = runs("autodiff", cfg, True)                          # autodiff ignores cfg.backward
    lean, paper = runs("manual", cfg, False), runs("manual", cfg.replace(backward="paper"), True)
    assert_trees_close(lean, {k: want[k] for k in lean}, "float64")
    assert_trees_close(paper, {**want, "jacrev(jacrev)": want["hessian"]}, "float64")
    assert abs(float(lean["jvp"][1])) > 1e-3                # a real derivative, not 0 = 0
    assert paper["hessian"].shape == (flat.size, flat.size)
    np.testing.assert_allclose(paper["hessian"], paper["hessian"].T, atol=1e-12)


POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "named": jax.checkpoint_policies.save_only_these_names("attention_residuals", "layernorm_residuals"),
}


def test_checkpoint_policies_match_autodiff(x64):
    cfg, params, inputs, targets = _model("lean")
    loss = lambda p, backend: loss_fn(p, inputs, targets, cfg, backend)

    got = run_once(lambda params: {
        name: jax.value_and_grad(jax.checkpoint(lambda p: loss(p, "manual"), policy=policy))(params)
        for name, policy in POLICIES.items()}, params)
    want = run_once(jax.value_and_grad(lambda p: loss(p, "autodiff")), params)
    assert_trees_close(got, {name: want for name in POLICIES}, "float64")


def test_checkpoint_names_select_the_saved_residuals(x64):
    """Under save_only_these_names, what a layer computes for its backward is saved exactly when
    its ``<op>_residuals`` name is listed."""
    cfg, params, inputs, targets = _model("paper", n_layer=1)
    loss = lambda p: loss_fn(p, inputs, targets, cfg, "manual")

    def saved(*names):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(
                jax.checkpoint(loss, policy=jax.checkpoint_policies.save_only_these_names(*names)), params)
        return out.getvalue()

    probs = f"f64[1,{B},{H},{T},{T}]"                        # attention's ρ, for the L = 1 layers
    pre_activation = f"f64[1,{B},{T},{cfg.mlp_width}]"       # the MLP's h
    assert probs in saved("attention_residuals") and pre_activation not in saved("attention_residuals")
    assert pre_activation in saved("mlp_residuals") and probs not in saved("mlp_residuals")
    assert probs not in saved() and pre_activation not in saved()


def test_export_round_trip_of_value_and_grad(x64):
    """jax.export of the jitted value-and-grad, serialized and deserialized, gives autodiff's
    loss and gradients."""
    cfg, params, inputs, targets = _model("lean")
    step = jax.jit(jax.value_and_grad(lambda p, x, y: loss_fn(p, x, y, cfg, "manual")))
    exported = jax.export.export(step)(params, inputs, targets)
    restored = jax.export.deserialize(exported.serialize())
    got = restored.call(params, inputs, targets)
    want = run_once(jax.value_and_grad(lambda p: loss_fn(p, inputs, targets, cfg, "autodiff")), params)
    assert_trees_close(got, want, "float64")


def _block(ops, x, p, backward):
    """A pre-LN block written with the layer ops of one backend."""
    h = ops[0](x, p["ln"]["scale"], p["ln"]["bias"], **_model_settings("layernorm", backward))
    x = x + ops[1](h, p["w_qkv"], None, p["w_o"], None, {}, **_model_settings("attention", backward))
    return x + ops[2](x, p["w_fc"], p["b_fc"], p["w_proj"], None, {}, activation="gelu")


def test_scan_and_vmap_over_layers_match_autodiff(x64):
    """Layers stacked on a leading axis L = 2, run one after another by lax.scan and side by
    side by vmap: values and gradients (loss_fn itself scans its blocks under every other test)."""
    k = iter(jax.random.split(jax.random.key(4), 10))
    n = lambda *s: normal(next(k), s, "float64", 0.5)
    L, backward = 2, "lean"
    stacked = {"ln": {"scale": 1 + n(L, C), "bias": n(L, C)}, "w_qkv": n(L, C, 3 * C), "w_o": n(L, C, C),
               "w_fc": n(L, C, F), "b_fc": n(L, F), "w_proj": n(L, F, C)}
    x = n(B, T, C)
    manual = (layers.layernorm, layers.attention, layers.mlp)
    ref = (layers.layernorm_ref, layers.attention_ref, layers.mlp_ref)

    def run(stacked, x, ops):
        scanned = lambda s: jax.lax.scan(lambda h, p: (_block(ops, h, p, backward), None), x, s)[0].sum()
        mapped = lambda s: (jax.vmap(lambda p: _block(ops, x, p, backward))(s) ** 2).sum()
        return {"scan": jax.value_and_grad(scanned)(stacked), "vmap": jax.value_and_grad(mapped)(stacked)}

    got, want = (run_once(functools.partial(run, ops=ops), stacked, x) for ops in (manual, ref))
    assert_trees_close(got, want, "float64")


def test_eval_shape_of_grad_and_jvp(x64):
    cfg, params, inputs, targets = _model("lean")
    loss = lambda p: loss_fn(p, inputs, targets, cfg, "manual")
    shapes = jax.eval_shape(jax.grad(loss), params)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(lambda p: (p.shape, p.dtype), params)
    out, tangent = jax.eval_shape(lambda p: jax.jvp(loss, (p,), (p,)), params)
    assert out.shape == tangent.shape == () and tangent.dtype == jnp.float64


# --- which derivative runs -------------------------------------------------------------------

def test_grad_runs_the_hand_written_backward(x64):
    """An op whose backward is deliberately wrong (twice the truth) and whose tangent formula is
    right: jax.grad and vmap(grad) return the wrong backward's numbers, jax.jvp the right ones.
    So reverse mode runs ``bwd``, not a transpose of ``jvp``."""
    def cube_fwd(x):
        return x ** 3, x

    def cube_bwd(x, dy):
        return (2 * 3 * x ** 2 * dy,)                        # wrong on purpose: 2x the derivative

    def cube_jvp(x, tangents):
        return 3 * x ** 2 * tangents[0]

    cube = manual_vjp(cube_fwd, cube_bwd, jvp=cube_jvp)
    x = normal(jax.random.key(0), (3, 4), "float64")
    true = 3 * x ** 2
    np.testing.assert_allclose(jax.grad(lambda x: cube(x).sum())(x), 2 * true, rtol=1e-15)
    np.testing.assert_allclose(jax.vmap(jax.grad(lambda r: cube(r).sum()))(x), 2 * true, rtol=1e-15)
    np.testing.assert_allclose(jax.jvp(cube, (x,), (jnp.ones_like(x),))[1], true, rtol=1e-15)


def test_model_gradient_calls_every_backward_and_no_tangent_formula(x64):
    """In the jaxpr of jax.grad(loss_fn) with the manual backend, every op's derivative is the
    linear map whose function is its hand-written backward; no tangent formula appears."""
    cfg, params, inputs, targets = _model("lean", dropout=0.1)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, inputs, targets, cfg, "manual",
                                                       dropout_key=jax.random.key(0))))(params)
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "manual_linear_map":
                names.add(eqn.params["fun"].__name__)
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert names == {f"{op}_backward" for op in ("embedding", "dropout", "layernorm", "attention", "mlp",
                                                  "logits_loss")}


def test_forward_mode_without_tangent_formula_names_the_op(x64):
    """cross_attention has no hand-written tangent: forward mode raises a TypeError naming it and
    pointing to backend="autodiff"; reverse mode and jax.hessian (forward over reverse, which
    runs only the backward) still work."""
    k = iter(jax.random.split(jax.random.key(0), 8))
    n = lambda *s: normal(next(k), s, "float64", 0.5)
    args = (n(1, 3, C), n(1, 4, C), n(C, C), None, n(C, 2 * C), None, n(C, C), None)
    f = lambda x: jnp.sin(cross_attention(x, *args[1:], n_head=H)).sum()
    with pytest.raises(TypeError, match=r"'cross_attention'.*backend=\"autodiff\".*jax\.hessian"):
        jax.jvp(f, (args[0],), (args[0],))
    f_ref = lambda x: jnp.sin(cross_attention_ref(x, *args[1:], n_head=H)).sum()
    got, want = run_once(lambda x: [(jax.grad(g)(x), jax.hessian(g)(x)) for g in (f, f_ref)], args[0])
    assert_trees_close(got, want, "float64")
