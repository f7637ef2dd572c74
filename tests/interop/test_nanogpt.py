"""nanoGPT state dicts in: a small model written here with nanoGPT's ``model.py`` structure and
names (nn.Linear layers, optional biases, tied lm_head, the causal-mask buffer) is imported and
checked against PyTorch autograd: logits, loss and every parameter gradient."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from tests.interop.required import reference

torch = reference("torch")
nn = torch.nn
F = torch.nn.functional

from manual_grad import GPTConfig  # noqa: E402
from manual_grad.interop import load_nanogpt_checkpoint, load_nanogpt_state_dict  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.interop.compare import assert_matches_torch, batch, logits_jit, perturb_  # noqa: E402


# --- a nanoGPT-shaped model (same module tree and names as nanoGPT's model.py) -----------------

class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, bias):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head = n_head
        # the causal mask nanoGPT registers when flash attention is unavailable
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd, bias, approximate):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU(approximate=approximate)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, a, approximate):
        super().__init__()
        self.ln_1 = LayerNorm(a["n_embd"], a["bias"])
        self.attn = CausalSelfAttention(a["n_embd"], a["n_head"], a["block_size"], a["bias"])
        self.ln_2 = LayerNorm(a["n_embd"], a["bias"])
        self.mlp = MLP(a["n_embd"], a["bias"], approximate)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, model_args, approximate="tanh"):
        super().__init__()
        a = model_args
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(a["vocab_size"], a["n_embd"]), wpe=nn.Embedding(a["block_size"], a["n_embd"]),
            drop=nn.Dropout(a["dropout"]), h=nn.ModuleList([Block(a, approximate) for _ in range(a["n_layer"])]),
            ln_f=LayerNorm(a["n_embd"], a["bias"])))
        self.lm_head = nn.Linear(a["n_embd"], a["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight   # weight tying, as nanoGPT

    def forward(self, idx):
        pos = torch.arange(idx.size(1))
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def model_args(bias=True, **overrides):
    return dict(n_layer=2, n_head=3, n_embd=36, block_size=12, bias=bias, vocab_size=43, dropout=0.0) | overrides


def make_nanogpt(args, seed=0, approximate="tanh"):
    torch.manual_seed(seed)
    return perturb_(NanoGPT(args, approximate), seed).eval()


# --- the checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("bias, compiled", [(True, False), (False, True)],
                         ids=["bias-plain", "no-bias-compiled-prefix"])
def test_import_matches_torch(bias, compiled):
    args = model_args(bias, n_layer=1 if compiled else 2)
    model = make_nanogpt(args)
    state_dict = model.state_dict()
    assert "lm_head.weight" in state_dict and "transformer.h.0.attn.bias" in state_dict
    if compiled:   # torch.compile's wrapper names its module _orig_mod
        state_dict = {"_orig_mod." + k: v for k, v in state_dict.items()}
    params, cfg = load_nanogpt_state_dict(state_dict, args)
    assert cfg.bias == bias and cfg.tied_embeddings and cfg.activation == "gelu"
    if not bias:   # nanoGPT without biases has none in LayerNorm either: ours are zeros
        assert not np.any(np.asarray(params["blocks"]["ln1"]["bias"]))
        assert "b_qkv" not in params["blocks"]["attn"]
    inputs, targets = batch(cfg.vocab_size, 2, cfg.block_size, seed=1)
    assert_matches_torch(params, cfg, model, model, inputs, targets, logits_rtol=1e-5, grad_rtol=1e-4,
                         linear_transposed=True, exact_count=bias)


def test_biasless_state_dict_into_a_config_with_biases():
    """A bias=False state dict loaded for a GPTConfig that demands biases: they are zeros."""
    args = model_args(bias=False)
    model = make_nanogpt(args, seed=3)
    cfg = GPTConfig(vocab_size=43, block_size=12, n_layer=2, n_head=3, n_embd=36, bias=True)
    params, cfg_loaded = load_nanogpt_state_dict(model.state_dict(), cfg)
    assert cfg_loaded == cfg
    assert all(not np.any(np.asarray(params["blocks"][g][b])) for g, b in
               (("attn", "b_qkv"), ("attn", "b_o"), ("mlp", "b_fc"), ("mlp", "b_proj")))
    inputs, _ = batch(cfg.vocab_size, 2, cfg.block_size, seed=4)
    with torch.no_grad():
        theirs = model(torch.from_numpy(inputs).long()).numpy()
    assert rel_err(logits_jit(params, inputs, cfg), theirs) <= 1e-5


def test_checkpoint_file(tmp_path):
    """nanoGPT's ckpt.pt (model, optimizer, model_args, iter_num, best_val_loss, config)."""
    args = model_args()
    model = make_nanogpt(args, seed=5)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    ckpt = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), model_args=args,
                iter_num=1, best_val_loss=torch.tensor(3.5), config=dict(dataset="x", learning_rate=6e-4))
    torch.save(ckpt, tmp_path / "ckpt.pt")
    params, cfg = load_nanogpt_checkpoint(tmp_path / "ckpt.pt")
    expected, cfg_expected = load_nanogpt_state_dict(model.state_dict(), args)
    assert cfg == cfg_expected
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    torch.save({"weights": model.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a nanoGPT checkpoint"):
        load_nanogpt_checkpoint(tmp_path / "other.pt")


def _drop(key):
    return lambda sd, a: ({k: v for k, v in sd.items() if k != key}, a)


BROKEN = {
    "missing key": (_drop("transformer.h.1.mlp.c_proj.weight"), r"missing key 'transformer\.h\.1\.mlp\.c_proj\.weight'"),
    "biases partly missing": (_drop("transformer.h.0.ln_2.bias"), r"missing key 'transformer\.h\.0\.ln_2\.bias'"),
    "conv1d layout": (lambda sd, a: (sd | {"transformer.h.0.attn.c_attn.weight": sd["transformer.h.0.attn.c_attn.weight"].T}, a),
                      r"'transformer\.h\.0\.attn\.c_attn\.weight' has shape \(36, 108\).*\(108, 36\)"),
    "vocab size": (lambda sd, a: (sd, a | {"vocab_size": 50304}), r"vocab size mismatch.*43 rows.*50304"),
    "bias flag": (lambda sd, a: ({k: v for k, v in sd.items() if not k.endswith("bias") or ".attn.bias" in k}, a),
                  "no biases but model_args says bias=True"),
    "unexpected key": (lambda sd, a: (sd | {"transformer.h.0.attn.rotary": sd["transformer.ln_f.weight"]}, a),
                       r"unexpected key.*rotary"),
    "missing model arg": (lambda sd, a: (sd, {k: v for k, v in a.items() if k != "n_head"}), r"missing \['n_head'\]"),
    "not a dict": (lambda sd, a: (list(sd.values()), a), "state_dict must be a dict"),
    "untied head": (lambda sd, a: (sd | {"lm_head.weight": sd["lm_head.weight"] + 1}, a), r"lm_head\.weight' differs"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_state_dict_is_refused(case):
    edit, match = BROKEN[case]
    args = model_args()
    state_dict, args = edit(make_nanogpt(args).state_dict(), args)
    with pytest.raises(ValueError, match=match):
        load_nanogpt_state_dict(state_dict, args)
