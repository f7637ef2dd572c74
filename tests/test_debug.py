"""Debug mode: checkify reports, from inside jit, what the eager checks cannot see."""
import jax
import jax.numpy as jnp
import pytest

from manual_grad import GPTConfig, init_params
from manual_grad.debug import checked_loss_fn, checked_value_and_grad

CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, ln_eps=0.0)
PARAMS = init_params(CFG, jax.random.key(0))
IDS = jax.random.randint(jax.random.key(1), (2, 8), 0, CFG.vocab_size)


def _zero_embeddings(params):
    """Every token's embedding 0: with eps = 0, ln1 divides 0 by 0."""
    return {**params, "wte": jnp.zeros_like(params["wte"]), "wpe": jnp.zeros_like(params["wpe"])}


def _inf_param(params):
    return {**params, "blocks": {**params["blocks"], "ln2": {**params["blocks"]["ln2"],
                                                             "scale": params["blocks"]["ln2"]["scale"].at[0, 3].set(jnp.inf)}}}


@pytest.mark.parametrize("backend", ["manual", "autodiff"])
def test_debug_mode_names_bad_ids_and_the_non_finite_layer(backend):
    cases = [  # (params, inputs, targets, the message expected)
        (None, None, None, None),
        (None, IDS.at[1, 3].set(40), None, "inputs has an id outside [0, 11): 40 at flat position 11"),
        (None, IDS.at[0, 0].set(-1), None, "inputs has an id outside [0, 11): -1 at flat position 0"),
        (None, None, IDS.at[0, 2].set(-5), "targets has an id outside [0, 11) or -100: -5 at flat position 2"),
        (None, None, IDS.at[0, 2].set(-100), None),
        (_zero_embeddings, None, None, "non-finite values in the output of blocks/ln1"),
    ]
    for params, inputs, targets, message in cases:
        params = params(PARAMS) if params else PARAMS
        error, loss = checked_loss_fn(params, IDS if inputs is None else inputs,
                                      IDS if targets is None else targets, CFG, backend)
        if message is None:
            assert error.get() is None and jnp.isfinite(loss)
        else:
            assert message in error.get(), error.get()
            with pytest.raises(Exception, match="non-finite|outside"):
                error.throw()


def test_debug_mode_names_non_finite_parameters_and_gradients():
    error, _ = checked_value_and_grad(_inf_param(PARAMS), IDS, IDS, CFG)
    assert "non-finite values in params/blocks/ln2/scale: 1 entries" in error.get()
    error, (loss, grads) = checked_value_and_grad(PARAMS, IDS, IDS, CFG)
    assert error.get() is None and jnp.isfinite(loss)
