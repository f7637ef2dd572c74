"""Hugging Face GPT-2 in and out, checked against transformers' own GPT2LMHeadModel: logits,
loss and every parameter gradient (PyTorch autograd) on small random models, the round trip
import -> export -> from_pretrained, and the refusal of broken checkpoints."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from tests.interop.required import reference

torch = reference("torch")
transformers = reference("transformers")
safetensors_numpy = reference("safetensors.numpy")

from manual_grad import GPTConfig, LoRAConfig, count_params, merge_lora  # noqa: E402
from manual_grad.interop import config_from_hf, config_to_hf, load_gpt2, save_gpt2  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.interop.compare import assert_matches_torch, batch, logits_jit, perturb_, random_params  # noqa: E402

# Small GPT-2s: odd head counts, n_embd not a power of two, 1 to 3 layers, tied and untied,
# GELU and ReLU, a non-default MLP width and LayerNorm eps.
HF_CONFIGS = {
    "1L-3h-C48-tied": dict(vocab_size=61, n_positions=16, n_embd=48, n_layer=1, n_head=3),
    "3L-3h-C72-untied": dict(vocab_size=50, n_positions=12, n_embd=72, n_layer=3, n_head=3,
                             tie_word_embeddings=False, layer_norm_epsilon=1e-3),
    "2L-5h-C40-relu-F80": dict(vocab_size=33, n_positions=8, n_embd=40, n_layer=2, n_head=5,
                               n_inner=80, activation_function="relu"),
}


def make_hf_model(hf_config: dict, seed: int = 0):
    """A random, perturbed GPT2LMHeadModel in eval mode with eager attention, no dropout."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**hf_config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config)
    model.set_attn_implementation("eager")
    return perturb_(model, seed).eval()


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """(folder, model): a random GPT2LMHeadModel saved with save_pretrained."""
    folder = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(HF_CONFIGS[request.param])
    model.save_pretrained(folder)
    return folder, model


def hf_logits_of(model):
    return lambda ids: model(input_ids=ids).logits


# The manual backend's two backward variants; the lean one with small attention tiles and loss
# chunks so that several of each are used (T = 8 to 16, B T = 16 to 32 tokens).
BACKWARDS = {"lean": dict(backward="lean", attn_block_size=4, loss_chunk=7), "paper": dict(backward="paper")}


@pytest.mark.parametrize("backward", ["lean", pytest.param("paper", marks=pytest.mark.slow)])
def test_import_matches_torch_float32(hf_checkpoint, backward):
    folder, model = hf_checkpoint
    params, cfg = load_gpt2(folder)
    assert cfg.dtype == "float32" and cfg.tied_embeddings == model.config.tie_word_embeddings
    cfg = cfg.replace(**BACKWARDS[backward])
    inputs, targets = batch(cfg.vocab_size, 2, cfg.block_size, seed=1)
    assert_matches_torch(params, cfg, model.float(), hf_logits_of(model), inputs, targets,
                         logits_rtol=1e-5, grad_rtol=1e-4)


# The default tier runs float64 on the deepest, untied config with the paper backward (float32
# runs the lean one); every other combination is the slow tier's.
@pytest.mark.parametrize("backward", ["paper", pytest.param("lean", marks=pytest.mark.slow)])
@pytest.mark.parametrize("hf_checkpoint", [
    pytest.param(name, marks=[] if name == "3L-3h-C72-untied" else pytest.mark.slow) for name in HF_CONFIGS
], indirect=True)
def test_import_matches_torch_float64(hf_checkpoint, backward, x64):
    folder, model = hf_checkpoint
    params, cfg = load_gpt2(folder, dtype="float64")
    assert cfg.dtype == "float64" and jax.tree.leaves(params)[0].dtype == np.float64
    cfg = cfg.replace(**BACKWARDS[backward])
    inputs, targets = batch(cfg.vocab_size, 2, cfg.block_size, seed=2)
    try:
        assert_matches_torch(params, cfg, model.double(), hf_logits_of(model), inputs, targets,
                             logits_rtol=1e-10, grad_rtol=1e-10)
    finally:
        model.float()


def _same_state_dicts(a, b):
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for name in sd_a:
        assert sd_a[name].dtype == sd_b[name].dtype and torch.equal(sd_a[name], sd_b[name]), name


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_round_trip_is_exact(hf_checkpoint, tmp_path, safe_serialization):
    folder, model = hf_checkpoint
    params, cfg = load_gpt2(folder)
    save_gpt2(params, cfg, tmp_path, safe_serialization=safe_serialization)
    assert os.path.isfile(tmp_path / ("model.safetensors" if safe_serialization else "pytorch_model.bin"))
    again, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "activation_function",
                  "layer_norm_epsilon", "tie_word_embeddings"):
        assert getattr(again.config, field) == getattr(model.config, field), field
    assert (again.config.n_inner or 4 * again.config.n_embd) == (model.config.n_inner or 4 * model.config.n_embd)
    _same_state_dicts(again, model)
    ids = torch.from_numpy(batch(cfg.vocab_size, 2, cfg.block_size, seed=3)[0]).long()
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    params_again, cfg_again = load_gpt2(tmp_path)
    assert cfg_again == cfg
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def _save_renamed(model, folder, rename, *, bin_format=False, extra=None):
    """The model's tensors under other names (and extra buffers), as safetensors or a .bin."""
    tensors = {rename(k): v.detach().clone() for k, v in model.state_dict().items()} | (extra or {})
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    if bin_format:
        torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    else:
        safetensors_numpy.save_file({k: v.numpy() for k, v in tensors.items()},
                                    os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def test_other_layouts_give_the_same_params(hf_checkpoint, tmp_path):
    """pytorch_model.bin, GPT2Model names (no "transformer." prefix, as the original gpt2
    repository) with attention-mask buffers, and a sharded checkpoint all import alike."""
    folder, model = hf_checkpoint
    reference, cfg = load_gpt2(folder)
    T = cfg.block_size
    mask = {"h.0.attn.bias": torch.tril(torch.ones(1, 1, T, T)), "h.0.attn.masked_bias": torch.tensor(-1e4)}
    _save_renamed(model, tmp_path / "bin", lambda k: k, bin_format=True)
    _save_renamed(model, tmp_path / "bare", lambda k: k.removeprefix("transformer."), extra=mask)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    for variant in ("bin", "bare", "sharded"):
        params, cfg_variant = load_gpt2(tmp_path / variant)
        assert cfg_variant == cfg, variant
        jax.tree.map(np.testing.assert_array_equal, params, reference)


def transformers_logits(folder, inputs) -> np.ndarray:
    """Logits of the GPT2LMHeadModel that transformers loads from ``folder``."""
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(inputs).long()).logits.numpy()


@pytest.mark.parametrize("tied", [True, False])
def test_export_of_our_model_matches_transformers(tmp_path, tied):
    """Export alone: a model made here (random weights, not imported) gives the same logits
    in transformers as in our forward."""
    cfg = GPTConfig(vocab_size=37, block_size=10, n_layer=2, n_head=3, n_embd=24,
                    tied_embeddings=tied)
    params = random_params(cfg, seed=4)
    save_gpt2(params, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] == tied
    inputs, _ = batch(cfg.vocab_size, 3, cfg.block_size, seed=5)
    assert rel_err(logits_jit(params, inputs, cfg), transformers_logits(tmp_path, inputs)) <= 1e-5


def test_export_of_merged_lora_matches(tmp_path):
    """A LoRA model is saved after merge_lora (a logits adapter unties the head)."""
    cfg = GPTConfig(vocab_size=29, block_size=8, n_layer=1, n_head=2, n_embd=16,
                    lora=LoRAConfig(rank=2, targets=("q", "v", "logits")))
    params = random_params(cfg, seed=6)
    with pytest.raises(ValueError, match="merge_lora"):
        save_gpt2(params, cfg, tmp_path)
    merged, merged_cfg = merge_lora(params, cfg)
    save_gpt2(merged, merged_cfg, tmp_path)
    inputs, _ = batch(cfg.vocab_size, 2, cfg.block_size, seed=7)
    assert rel_err(logits_jit(params, inputs, cfg), transformers_logits(tmp_path, inputs)) <= 1e-5


@pytest.mark.parametrize("change, match", [
    (dict(bias=False), "bias=False"),
    (dict(tied_embeddings=False, lm_head_bias=True), "lm_head_bias"),
    (dict(causal=False), "causal"),
])
def test_save_refuses_what_gpt2_cannot_represent(tmp_path, change, match):
    cfg = GPTConfig.preset("tiny", **change)
    with pytest.raises(ValueError, match=match):
        save_gpt2(random_params(cfg, seed=0), cfg, tmp_path)
    assert not os.listdir(tmp_path)


def test_save_refuses_params_that_do_not_match_cfg(tmp_path):
    cfg = GPTConfig.preset("tiny")
    params = random_params(cfg, seed=0)
    with pytest.raises(ValueError, match="blocks.mlp.w_fc"):
        save_gpt2(params, cfg.replace(mlp_ratio=2), tmp_path)
    with pytest.raises(ValueError, match="lm_head.w"):
        save_gpt2(random_params(cfg.replace(tied_embeddings=False), seed=0), cfg, tmp_path)


# --- broken checkpoints: each refused with a ValueError naming what is wrong --------------------

def _edit_checkpoint(src, dst, *, tensors=None, config=None):
    """A copy of the checkpoint in ``src`` with its tensors and/or config.json edited."""
    weights = safetensors_numpy.load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        hf_config = json.load(f)
    weights = tensors(weights) if tensors else weights
    hf_config = config(hf_config) if config else hf_config
    os.makedirs(dst, exist_ok=True)
    safetensors_numpy.save_file(weights, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf_config, f)
    return dst


def _without(key):
    return lambda w: {k: v for k, v in w.items() if k != key}


def _replaced(key, make):
    return lambda w: w | {key: make(w[key])}


BROKEN = {
    "missing key": (dict(tensors=_without("transformer.h.0.mlp.c_fc.bias")),
                    r"missing key 'transformer\.h\.0\.mlp\.c_fc\.bias'"),
    "wrong shape": (dict(tensors=_replaced("transformer.h.0.attn.c_attn.weight", lambda a: a[:, :-3])),
                    r"'transformer\.h\.0\.attn\.c_attn\.weight' has shape \(48, 141\).*\(48, 144\)"),
    "transposed": (dict(tensors=_replaced("transformer.h.0.mlp.c_fc.weight", lambda a: a.T.copy())),
                   r"'transformer\.h\.0\.mlp\.c_fc\.weight' has shape \(192, 48\)"),
    "vocab size": (dict(config=lambda c: c | {"vocab_size": 50257}),
                   r"vocab size mismatch.*61 rows.*vocab_size=50257"),
    "too few layers": (dict(config=lambda c: c | {"n_layer": 2}), r"missing key 'transformer\.h\.1\."),
    "unexpected key": (dict(tensors=lambda w: w | {"transformer.h.0.attn.q_attn.weight": w["transformer.wpe.weight"]}),
                       r"unexpected key.*q_attn"),
    "untied head in a tied config": (dict(tensors=lambda w: w | {"lm_head.weight": w["transformer.wte.weight"] + 1}),
                                     r"lm_head\.weight' differs"),
    "exact gelu": (dict(config=lambda c: c | {"activation_function": "gelu"}), r"activation_function 'gelu'"),
    "cross attention": (dict(config=lambda c: c | {"add_cross_attention": True}), "add_cross_attention"),
    "other model": (dict(config=lambda c: c | {"model_type": "gpt_neo"}), "model_type"),
    "n_embd": (dict(config=lambda c: {k: v for k, v in c.items() if k != "n_embd"}), "missing field 'n_embd'"),
}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    make_hf_model(HF_CONFIGS["1L-3h-C48-tied"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_is_refused(small_checkpoint, tmp_path, case):
    edits, match = BROKEN[case]
    with pytest.raises(ValueError, match=match):
        load_gpt2(_edit_checkpoint(small_checkpoint, tmp_path / "broken", **edits))


def test_half_compute_keeps_float32_parameters(small_checkpoint):
    params, cfg = load_gpt2(small_checkpoint, dtype="bfloat16")
    reference, _ = load_gpt2(small_checkpoint)
    assert cfg.dtype == "bfloat16" and cfg.storage_dtype == "float32"
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_missing_files_are_refused(small_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="must be a folder"):
        load_gpt2(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        load_gpt2(tmp_path)
    (tmp_path / "config.json").write_text((small_checkpoint / "config.json").read_text())
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_gpt2(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_gpt2(small_checkpoint, dtype="int8")
    with jax.enable_x64(False), pytest.raises(ValueError, match="enable_x64"):
        load_gpt2(small_checkpoint, dtype="float64")


# --- GPT-2 124M ---------------------------------------------------------------------------------

# config.json of the published GPT-2 small checkpoint ("gpt2" / "openai-community/gpt2").
GPT2_SMALL_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
    "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
    "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
    "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257,
}


def test_gpt2_small_config_maps_to_the_preset():
    assert config_from_hf(GPT2_SMALL_CONFIG) == GPTConfig.preset("gpt2")
    exported = transformers.GPT2Config(**config_to_hf(GPTConfig.preset("gpt2")))
    published = transformers.GPT2Config(**GPT2_SMALL_CONFIG)
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                  "layer_norm_epsilon", "tie_word_embeddings", "scale_attn_weights", "bos_token_id"):
        assert getattr(exported, field) == getattr(published, field), field


@pytest.mark.slow
def test_gpt2_small_shaped_checkpoint(tmp_path):
    """A random model of GPT-2 small's exact shape, as the published checkpoint stores it (no
    "transformer." prefix, mask buffers): 124,439,808 parameters, logits equal to transformers'."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_SMALL_CONFIG)).eval()
    model.set_attn_implementation("eager")
    T = GPT2_SMALL_CONFIG["n_positions"]
    mask = {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, T, T)) for i in range(12)}
    _save_renamed(model, tmp_path, lambda k: k.removeprefix("transformer."), extra=mask)
    params, cfg = load_gpt2(tmp_path)
    assert cfg == GPTConfig.preset("gpt2") and count_params(params) == 124_439_808
    inputs, _ = batch(cfg.vocab_size, 1, 16, seed=8)
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(inputs).long()).logits.numpy()
    assert rel_err(logits_jit(params, inputs, cfg), theirs) <= 1e-5
