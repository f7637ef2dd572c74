import pytest

from manual_grad import GPTConfig, LoRAConfig


def test_presets():
    paper = GPTConfig.preset("paper")
    assert (paper.vocab_size, paper.block_size, paper.n_embd, paper.n_head, paper.n_layer) == (10, 4, 32, 2, 1)
    assert paper.activation == "relu" and paper.ln_eps == 0 and not paper.tied_embeddings and paper.lm_head_bias
    gpt2 = GPTConfig.preset("gpt2")
    assert gpt2.tied_embeddings and gpt2.activation == "gelu" and gpt2.ln_eps == 1e-5
    assert GPTConfig.preset("gpt2-untied").lm_head_bias
    assert GPTConfig.preset("shakespeare-char").vocab_size == 65
    assert GPTConfig.preset("tiny", n_layer=3).n_layer == 3


def test_config_is_hashable_and_round_trips():
    cfg = GPTConfig.preset("tiny", lora=LoRAConfig(rank=2, targets=["q", "logits"]))
    assert hash(cfg) == hash(GPTConfig.from_dict(cfg.to_dict()))
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs,name", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_head=0), "n_head"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(activation="swish"), "activation"),
    (dict(ln_eps=-1e-5), "ln_eps"),
    (dict(dropout=1.0), "dropout"),
    (dict(dtype="int8"), "dtype"),
    (dict(lm_head_bias=True), "lm_head_bias"),
    (dict(lora=LoRAConfig(rank=64)), "lora.rank"),
])
def test_invalid_config_raises_naming_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        GPTConfig.preset("tiny", **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(rank=0), "lora.rank"), (dict(targets=("x",)), "lora.targets"), (dict(targets=()), "lora.targets"),
    (dict(convention="rank"), "lora.convention"), (dict(alpha=0), "lora.alpha")])
def test_invalid_lora_config(kwargs, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        LoRAConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        GPTConfig.preset("gpt5")
