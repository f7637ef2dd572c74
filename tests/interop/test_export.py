"""``manual-grad export``: a trained run (character-level, and GPT-2 BPE) as a Hugging Face GPT-2
folder that transformers' own GPT2LMHeadModel loads with the same logits, and GPT2Tokenizer with
the same ids; what GPT-2 cannot hold is refused in one line."""
from __future__ import annotations

import io
import json
import shutil

import jax
import numpy as np
import pytest

from tests.interop.required import reference

torch = reference("torch")
transformers = reference("transformers")

from manual_grad import GPTConfig, forward, init_params, load_model, train  # noqa: E402
from manual_grad.checkpoint import save_checkpoint  # noqa: E402
from manual_grad.cli import main  # noqa: E402
from manual_grad.data import _bytes_to_unicode  # noqa: E402
from tests.helpers import train_config  # noqa: E402

TEXT = "the cat sat on the mat; the hat is on the cat. 12 cats, 3 hats!\n" * 40
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("Ġ", "h"), ("Ġh", "at")]
TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=2, eval_interval=2,
            eval_iters=1, log_interval=1, sample_tokens=0)


def _write_bpe(folder, merges):
    byte_chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(byte_chars)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


@pytest.fixture(scope="module", params=["char-untied", "gpt2-tied"])
def exported(request, tmp_path_factory):
    """(run folder, export folder, tokenizer kind): a 2-step run, exported by the CLI."""
    root = tmp_path_factory.mktemp(request.param)
    (root / "text.txt").write_text(TEXT)
    if request.param == "char-untied":
        tc = train_config(data=str(root / "text.txt"), out_dir=str(root / "run"), tied_embeddings=False,
                          ln_eps=1e-3, **TINY)
    else:
        (root / "bpe").mkdir()
        _write_bpe(root / "bpe", MERGES)
        tc = train_config(data=str(root / "text.txt"), out_dir=str(root / "run"), tokenizer="gpt2",
                          bpe_dir=str(root / "bpe"), **TINY)
    train(tc, log=io.StringIO())
    shutil.rmtree(root / "bpe", ignore_errors=True)          # the checkpoint carries its tokenizer
    assert main(["export", "--out-dir", str(root / "run"), "--to", str(root / "hf")]) == 0
    return root / "run", root / "hf", request.param.split("-")[0]


def test_transformers_loads_the_export_with_equal_logits(exported):
    run, hf, _ = exported
    params, cfg, tokenizer = load_model(run)
    ids = tokenizer.encode(TEXT[:200])[None, :cfg.block_size]                # (1, T)
    ours = np.asarray(forward(params, ids, cfg, backend="manual"))
    model = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()
    assert theirs.shape == ours.shape == (1, cfg.block_size, cfg.vocab_size)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    hf_config = json.loads((hf / "config.json").read_text())
    assert (hf_config["vocab_size"], hf_config["n_positions"], hf_config["layer_norm_epsilon"],
            hf_config["tie_word_embeddings"]) == (cfg.vocab_size, cfg.block_size, cfg.ln_eps, cfg.tied_embeddings)


def test_the_export_carries_the_gpt2_tokenizer(exported):
    run, hf, kind = exported
    _, _, tokenizer = load_model(run)
    if kind != "gpt2":
        assert not (hf / "vocab.json").exists()                # no Hugging Face class for our char ids
        return
    theirs = transformers.GPT2Tokenizer.from_pretrained(hf)
    for text in ["the cat sat on the hat", "12 cats, 3 hats!\n", TEXT[:120]]:
        assert theirs.encode(text) == tokenizer.encode(text).tolist()


def test_export_refuses_to_replace_an_export_unless_overwrite(exported, capsys):
    run, hf, _ = exported
    before = (hf / "model.safetensors").read_bytes()
    assert main(["export", "--out-dir", str(run), "--to", str(hf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "--to" in err
    assert (hf / "model.safetensors").read_bytes() == before
    assert main(["export", "--out-dir", str(run), "--to", str(hf), "--overwrite"]) == 0


def test_export_refuses_what_gpt2_cannot_hold(tmp_path, capsys):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, tied_embeddings=False,
                    lm_head_bias=True)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    save_checkpoint(tmp_path / "run" / "ckpt.mgc", {"kind": "full", "model_config": cfg.to_dict(),
                                                   "tokenizer": {"kind": "byte"}}, params=params)
    assert main(["export", "--out-dir", str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lm_head_bias" in err
    assert not (tmp_path / "hf").exists()
