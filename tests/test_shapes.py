"""Every public layer op refuses a wrong input before computing anything: a ``ValueError``
(shape, rank) or ``TypeError`` (dtype, missing array) naming the op and the argument.

The bad inputs are derived from each op's declared specs (:mod:`manual_grad.shapes`): every
array input in turn gets the wrong dtype, ``None``, an extra axis, and each of its axes one
element too long wherever another input pins that size. The valid inputs are checked to pass.
"""
import jax
import jax.numpy as jnp
import pytest

from manual_grad.layers.attention import attention
from manual_grad.layers.attention_variants import alibi_attend, attention_variant, rms_normalise, rope, sigmoid_attend
from manual_grad.layers.cross_attention import cross_attention
from manual_grad.layers.dropout import dropout
from manual_grad.layers.embedding import embedding
from manual_grad.layers.layernorm import layernorm
from manual_grad.layers.linear import linear
from manual_grad.layers.linear_attention import linear_attend
from manual_grad.layers.lora import lora_linear
from manual_grad.layers.loss import logits, logits_loss
from manual_grad.layers.mlp import gelu, mlp, relu
from manual_grad.shapes import parse_spec

B, T, C, H, F, V, R, T_MAX = 2, 3, 4, 2, 8, 5, 2, 6


def f(*shape):
    return jnp.ones(shape, jnp.float32)


def ids(*shape, high=V):
    return jnp.arange(int(jnp.prod(jnp.array(shape))), dtype=jnp.int32).reshape(shape) % high


HEADS = dict(q=f(B, H, T, 2), k=f(B, H, T, 2), v=f(B, H, T, 2))
SELF_ATTENTION = dict(x=f(B, T, C), w_qkv=f(C, 3 * C), b_qkv=f(3 * C), w_o=f(C, C), b_o=f(C))

# op, valid inputs by name (in the op's order), settings
OPS = {
    "embedding": (embedding, dict(ids=ids(B, T), wte=f(V, C), wpe=f(T_MAX, C)), {}),
    "layernorm": (layernorm, dict(x=f(B, T, C), scale=f(C), bias=f(C)), dict(eps=1e-5)),
    "linear": (linear, dict(x=f(B, T, C), w=f(C, F), b=f(F)), {}),
    "lora_linear": (lora_linear, dict(x=f(B, T, C), w=f(C, F), bias=f(F), lora_a=f(C, R), lora_b=f(R, F)),
                    dict(scale=2.0)),
    "attention": (attention, dict(SELF_ATTENTION, adapters={}), dict(n_head=H)),
    "attention_variant": (attention_variant, SELF_ATTENTION, dict(n_head=H, kind="alibi")),
    "cross_attention": (cross_attention, dict(x=f(B, T, C), ctx=f(B, T + 2, C), w_q=f(C, C), b_q=f(C),
                                              w_kv=f(C, 2 * C), b_kv=f(2 * C), w_o=f(C, C), b_o=f(C)),
                        dict(n_head=H)),
    "alibi_attend": (alibi_attend, HEADS, {}),
    "sigmoid_attend": (sigmoid_attend, HEADS, {}),
    "linear_attend": (linear_attend, HEADS, {}),
    "rope": (rope, dict(x=f(B, H, T, 2)), {}),
    "rms_normalise": (rms_normalise, dict(x=f(B, H, T, 2)), {}),
    "gelu": (gelu, dict(x=f(B, T, F)), {}),
    "relu": (relu, dict(x=f(B, T, F)), {}),
    "mlp": (mlp, dict(x=f(B, T, C), w_fc=f(C, F), b_fc=f(F), w_proj=f(F, C), b_proj=f(C), adapters={}),
            dict(activation="gelu")),
    "dropout": (dropout, dict(x=f(B, T, C), key=jax.random.key(0)), dict(rate=0.5)),
    "logits_tied": (logits, dict(x=f(B, T, C), w=f(V, C), b=None, adapters={}), dict(tied=True)),
    "logits": (logits, dict(x=f(B, T, C), w=f(C, V), b=f(V), adapters={}), dict(tied=False)),
    "logits_loss": (logits_loss, dict(x=f(B, T, C), w=f(C, V), b=f(V), targets=ids(B, T), adapters={}),
                    dict(tied=False, backward="lean", chunk=2)),
}


def specs_of(op, settings):
    return op.shapes(**settings) if callable(op.shapes) else op.shapes


def bad_inputs(op, inputs, settings):
    """(argument, bad value, exception) for each way the specs say an input can be wrong."""
    parsed = {name: parse_spec(spec) for name, spec in specs_of(op, settings).items()
              if inputs[name] is not None}    # an absent optional bias: nothing to corrupt
    dims = {name: d for name, (_, _, d) in parsed.items()}
    pinned = lambda dim: dim.isdigit() or sum(d.split("*")[-1] == dim.split("*")[-1]
                                              for ds in dims.values() for d in ds) > 1
    for name, (optional, integer, _) in parsed.items():
        x = inputs[name]
        yield name, x.astype(jnp.float32 if integer else jnp.int32), TypeError
        if not optional:
            yield name, None, TypeError
        if "..." not in dims[name]:
            yield name, x[None], ValueError
        for axis, dim in enumerate(dims[name][::-1], start=1):
            if dim != "..." and pinned(dim):
                shape = list(x.shape)
                shape[-axis] += 1
                yield name, jnp.zeros(shape, x.dtype), ValueError


@pytest.mark.parametrize("op_name", OPS)
def test_valid_inputs_pass(op_name):
    op, inputs, settings = OPS[op_name]
    jax.eval_shape(lambda args: op(*args, **settings), tuple(inputs.values()))


CASES = [pytest.param(op_name, name, bad, error, id=f"{op_name}-{name}-{i}")
         for op_name, (op, inputs, settings) in OPS.items()
         for i, (name, bad, error) in enumerate(bad_inputs(op, inputs, settings))]


@pytest.mark.parametrize("op_name,name,bad,error", CASES)
def test_bad_input_raises_naming_the_argument(op_name, name, bad, error):
    op, inputs, settings = OPS[op_name]
    args = tuple(bad if key == name else value for key, value in inputs.items())
    with pytest.raises(error, match=rf"{op.__name__}\(\): .*\b{name}\b"):
        op(*args, **settings)
    with pytest.raises(error, match=rf"\b{name}\b"):                    # the same under jit
        jax.jit(lambda *a: op(*a, **settings))(*args)


def test_messages_state_the_expected_shape():
    with pytest.raises(ValueError, match=r"w_qkv must have shape \(C, 3\*C\) with C=4 from x; got \(4, 11\)"):
        attention(f(B, T, C), f(C, 11), None, f(C, C), None, {}, n_head=H)
    with pytest.raises(ValueError, match=r"x must have rank 3 \(B, T, C\), got shape \(3, 4\)"):
        attention(f(T, C), f(C, 3 * C), None, f(C, C), None, {}, n_head=H)
    with pytest.raises(TypeError, match="targets must be an integer array"):
        logits_loss(f(B, T, C), f(V, C), None, f(B, T), {}, tied=True)


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match=r"n_head must be a positive divisor of the width C=4, got 3"):
        attention(*SELF_ATTENTION.values(), {}, n_head=3)


def test_embedding_refuses_lengths_beyond_the_position_table():
    with pytest.raises(ValueError, match=r"T=7, beyond the 6 positions of wpe"):
        embedding(ids(B, T_MAX + 1), f(V, C), f(T_MAX, C))
