"""Our model vs a PyTorch GPT-2 (Hugging Face or nanoGPT-style): logits, loss and every
parameter gradient, with the torch gradients mapped to our tree by name, independently of the
importer's own name map."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad import count_params, forward, init_params, loss_fn
from manual_grad.model import IGNORE_INDEX
from tests.helpers import rel_err

# GPT-2 / nanoGPT per-block parameter name -> (group, leaf) in our params["blocks"].
BLOCK_NAMES = {
    "ln_1.weight": ("ln1", "scale"), "ln_1.bias": ("ln1", "bias"),
    "attn.c_attn.weight": ("attn", "w_qkv"), "attn.c_attn.bias": ("attn", "b_qkv"),
    "attn.c_proj.weight": ("attn", "w_o"), "attn.c_proj.bias": ("attn", "b_o"),
    "ln_2.weight": ("ln2", "scale"), "ln_2.bias": ("ln2", "bias"),
    "mlp.c_fc.weight": ("mlp", "w_fc"), "mlp.c_fc.bias": ("mlp", "b_fc"),
    "mlp.c_proj.weight": ("mlp", "w_proj"), "mlp.c_proj.bias": ("mlp", "b_proj"),
}


def our_array(tree, name: str, *, linear_transposed: bool) -> np.ndarray:
    """The array of our tree that torch's parameter ``name`` corresponds to, in torch's layout."""
    block = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
    if block:
        group, leaf = BLOCK_NAMES[block[2]]
        array = np.asarray(tree["blocks"][group][leaf][int(block[1])])
        return array.T if linear_transposed and array.ndim == 2 else array
    if name == "lm_head.weight":
        return np.asarray(tree["lm_head"]["w"]).T
    return np.asarray({"transformer.wte.weight": tree["wte"], "transformer.wpe.weight": tree["wpe"],
                       "transformer.ln_f.weight": tree["ln_f"]["scale"],
                       "transformer.ln_f.bias": tree["ln_f"]["bias"]}[name])


def perturb_(model, seed: int, scale: float = 0.1):
    """Adds N(0, scale^2) noise to every parameter so that biases and LayerNorm are not trivial."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def batch(vocab_size: int, B: int, T: int, seed: int):
    """(inputs, targets) int32 (B, T) with a few targets ignored (-100)."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab_size, (B, T), dtype=np.int32)
    targets = rng.integers(0, vocab_size, (B, T), dtype=np.int32)
    targets[rng.random((B, T)) < 0.2] = IGNORE_INDEX
    targets[0, 0] = 1
    return inputs, targets


@functools.partial(jax.jit, static_argnames=("cfg",))
def logits_jit(params, inputs, cfg):
    return forward(params, inputs, cfg, backend="manual")


def random_params(cfg, seed: int, scale: float = 0.3):
    """Parameters shaped as ``init_params(cfg)`` with N(0, scale^2) entries (numpy, no compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s: jnp.asarray((scale * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ours(params, inputs, targets, cfg):
    logits = forward(params, inputs, cfg, backend="manual")
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, cfg, "manual")
    return logits, loss, grads


def torch_reference(model, logits_of, inputs, targets):
    """(logits, loss, {name: grad}) from PyTorch autograd; the loss is torch's cross-entropy
    with ignore_index=-100, the mean over counted tokens as ours."""
    import torch
    model.zero_grad()
    logits = logits_of(torch.from_numpy(inputs).long())
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).long().flatten(),
                                             ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    return logits.detach().numpy(), loss.item(), grads


def assert_matches_torch(params, cfg, model, logits_of, inputs, targets, *, logits_rtol, grad_rtol,
                         linear_transposed=False, exact_count=True):
    """Our manual-backend logits, loss and every gradient vs PyTorch's, parameter by parameter.
    ``exact_count``: our tree has exactly torch's parameters (False where ours adds zero
    LayerNorm biases that a bias-free torch model lacks). Returns the relative errors measured."""
    logits, loss, grads = _ours(params, inputs, targets, cfg)
    t_logits, t_loss, t_grads = torch_reference(model, logits_of, inputs, targets)
    assert logits.dtype == np.dtype(cfg.dtype)
    errors = {"logits": rel_err(logits, t_logits), "loss": abs(float(loss) - t_loss) / abs(t_loss)}
    assert errors["logits"] <= logits_rtol, errors
    assert errors["loss"] <= logits_rtol, errors
    # every torch parameter is one of ours and vice versa (a tied wte counts once in both)
    if exact_count:
        assert sum(g.size for g in t_grads.values()) == count_params(grads)
    for name, t_grad in t_grads.items():
        ours = our_array(grads, name, linear_transposed=linear_transposed)
        assert ours.shape == t_grad.shape, name
        assert np.abs(t_grad).max() > 0, f"{name}: torch gradient is zero, the check would be void"
        errors[name] = rel_err(ours, t_grad)
        assert errors[name] <= grad_rtol, f"gradient of {name}: rel err {errors[name]:.3g} > {grad_rtol:g}"
    return errors
