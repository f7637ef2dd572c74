"""KV-cache decoding (manual_grad.generate) against recomputing the whole context each step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad import GPTConfig, LoRAConfig, forward, init_params
from manual_grad.generate import generate, sample_logits

# Two blocks (the cache is stacked per layer), untied head with bias, ReLU, no block biases and
# every LoRA target with non-zero B: every path of the decoder differs from the default GPT.
CFG = GPTConfig.preset("tiny", block_size=8, n_embd=16, n_head=2, n_layer=2, tied_embeddings=False,
                       lm_head_bias=True, activation="relu", bias=False,
                       lora=LoRAConfig(rank=2, alpha=4.0, targets=("q", "k", "v", "o", "fc", "proj", "logits")))


_full_forward = jax.jit(forward, static_argnums=2)


@functools.lru_cache
def _params(cfg):
    """Initial parameters plus noise: larger weights and non-zero adapters B, so the logits are
    far from uniform."""
    @jax.jit
    def make(key):
        leaves, treedef = jax.tree.flatten(init_params(cfg, key))
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return jax.tree.unflatten(treedef, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return make(jax.random.key(0))


@pytest.mark.parametrize("prompt_len, n_new", [(3, 12), (10, 3)], ids=["cached-then-cropped", "long-prompt"])
def test_kv_cache_logits_and_greedy_text_equal_full_recomputation(prompt_len, n_new):
    """3 + 12 tokens: KV cache up to block_size 8, then the cropped window; a 10-token prompt is
    cropped from the start."""
    cfg = CFG
    params = _params(cfg)
    prompt = np.asarray(jax.random.randint(jax.random.key(2), (2, prompt_len), 0, cfg.vocab_size))
    tokens, logits = generate(params, cfg, prompt, n_new, key=jax.random.key(3), temperature=0.0,
                              return_logits=True)
    assert tokens.shape == (2, prompt_len + n_new) and logits.shape == (2, n_new, cfg.vocab_size)
    assert np.array_equal(tokens[:, :prompt_len], prompt)

    # The reference: greedy decoding that runs the full model on the (cropped) context at every
    # step. The context is right-padded to block_size so one compiled forward serves every step:
    # with the causal mask, padding after position n - 1 does not change its logits.
    sequence = prompt
    for i in range(n_new):
        context = sequence[:, -cfg.block_size:]
        n = context.shape[1]
        padded = np.pad(context, ((0, 0), (0, cfg.block_size - n)))
        reference = np.asarray(_full_forward(params, jnp.asarray(padded), cfg)[:, n - 1])      # (B, V)
        error = np.abs(np.asarray(logits[:, i]) - reference).max() / np.abs(reference).max()
        assert error <= 1e-5, (i, error)
        sequence = np.concatenate([sequence, reference.argmax(-1)[:, None]], axis=1)
    assert np.array_equal(np.asarray(tokens), sequence)                             # the same greedy text


def test_sampling_respects_top_k_and_seed():
    cfg = CFG
    params = _params(cfg)
    prompt = np.array([1, 2, 3])
    tokens, logits = generate(params, cfg, prompt, 10, key=jax.random.key(7), temperature=1.5, top_k=3,
                              return_logits=True)
    assert tokens.shape == (13,)
    top3 = np.argsort(np.asarray(logits), axis=-1)[:, -3:]                          # (N, 3)
    assert all(t in row for t, row in zip(np.asarray(tokens[3:]), top3))
    again = generate(params, cfg, prompt, 10, key=jax.random.key(7), temperature=1.5, top_k=3)
    assert np.array_equal(tokens, again)
    greedy, greedy_logits = generate(params, cfg, prompt, 10, key=jax.random.key(8), temperature=0.0, top_k=3,
                                     return_logits=True)
    assert np.array_equal(greedy[3:], np.argmax(greedy_logits, -1))


def test_sample_logits_draws_by_probability():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
    draws = jax.vmap(lambda k: sample_logits(logits, k, jnp.float32(1.0), None))(
        jax.random.split(jax.random.key(0), 4000))[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=3) / 4000
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_tokens=np.zeros(0, int)), "non-empty"),
    (dict(prompt_tokens=np.array([0, 99])), r"ids in \[0, 65\)"),
    (dict(prompt_tokens=np.array([0.5])), "integers"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"),
])
def test_bad_arguments(kwargs, message):
    cfg = GPTConfig.preset("tiny")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    args = dict(prompt_tokens=np.array([1]), max_new_tokens=2, temperature=1.0, top_k=None) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(params, cfg, args.pop("prompt_tokens"), args.pop("max_new_tokens"), key=jax.random.key(0), **args)
