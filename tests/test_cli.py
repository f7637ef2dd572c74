"""The command line (manual_grad.cli): help, a tiny train/resume/sample round, one-line errors."""
import importlib.metadata
import json
import re
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

import manual_grad
from manual_grad import GPTConfig, LoRAConfig, init_params, train
from manual_grad.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from manual_grad.cli import _train_config, build_parser, main
from manual_grad.data import _bytes_to_unicode
from manual_grad.paths import PathError, path_errors
from manual_grad.training import TRAIN_MODEL, OptimizerConfig, TrainConfig

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "4",
        "--eval-iters", "1", "--log-interval", "5", "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("abcab cabba bca. " * 60)
    return path


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A tiny run trained through the CLI, with the paper's backward and a tile size from --set."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", str(corpus), "--out-dir", str(out), "--max-iters", "5", "--eval-interval", "5",
                 "--lr-decay-iters", "7", "--set", "backward=paper", "--set", "attn_block_size=64", *TINY]) == 0
    return out


def _fails(capsys, argv, message):
    """The command exits non-zero with one stderr line naming the problem, and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("manual-grad"), err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "sample", "finetune"])
def test_help(capsys, command):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    flags = {"train": ["--data", "--n-layer", "--block-size", "--resume", "--backend", "--eval-iters"],
             "sample": ["--prompt", "--max-new-tokens", "--temperature", "--top-k", "--seed", "--from-hf"],
             "finetune": ["--init-from", "--lora-rank", "--lora-alpha", "--lora-targets", "--merge"]}[command]
    assert all(flag in out for flag in flags)


def test_flags_map_to_train_config_zeros_included():
    args = build_parser().parse_args(["train", "--grad-clip", "0", "--weight-decay", "0", "--seed", "0",
                                      "--sample-tokens", "0", "--n-layer", "2", "--lr-decay-iters", "9"])
    tc = _train_config(args)
    assert (tc.optim.grad_clip, tc.optim.weight_decay, tc.seed, tc.sample_tokens, tc.optim.lr_decay_iters) == (0, 0, 0, 0, 9)
    assert tc.model == {"n_layer": 2} and tc.model_config(65).n_head == TRAIN_MODEL["n_head"]   # not given: the default
    finetune = _train_config(build_parser().parse_args(["finetune", "--init-from", "x", "--lora-targets", "q,fc"]))
    assert "block_size" not in finetune.model and finetune.lora.targets == ("q", "fc")   # absent: the base model's


def _dests(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {a.dest for a in sub._actions}


def _leaf_fields(cls, prefix=""):
    """Every field of the config tree, as the CLI's dest names ('optim.min_lr', 'lora.rank')."""
    import dataclasses
    names = set()
    for f in dataclasses.fields(cls):
        if f.name == "model":
            continue                                      # GPTConfig overrides: --set (below)
        sub = {"optim": OptimizerConfig, "lora": LoRAConfig}.get(f.name)
        names |= _leaf_fields(sub, f.name + ".") if sub else {prefix + f.name}
    return names


def test_every_config_field_has_a_flag():
    """A field added to TrainConfig, OptimizerConfig or LoRAConfig without a flag fails here."""
    assert _leaf_fields(TrainConfig) <= _dests("train") | _dests("finetune")
    assert {"optim." + n for n in OptimizerConfig.__dataclass_fields__} <= _dests("finetune") & _dests("train")
    assert "set" in _dests("train") and "set" in _dests("finetune")


@pytest.mark.parametrize("name", sorted(set(GPTConfig.__dataclass_fields__) - {"vocab_size", "lora"}))
def test_set_reaches_every_model_field(name):
    value = getattr(GPTConfig.preset("tiny"), name)
    text = "none" if value is None else str(value)
    tc = _train_config(build_parser().parse_args(["train", "--set", f"{name}={text}"]))
    assert tc.model == {name: value}


def test_train_runs_with_set_backward_paper(run):
    model_config = load_checkpoint(run / "ckpt.mgc").meta["model_config"]
    assert (model_config["backward"], model_config["attn_block_size"]) == ("paper", 64)


def test_set_backward_and_tile_from_train():
    tc = _train_config(build_parser().parse_args(["train", "--set", "backward=paper", "--set", "attn_block_size=64",
                                                  "--n-head", "2"]))
    cfg = tc.model_config(vocab_size=11)
    assert (cfg.backward, cfg.attn_block_size, cfg.n_head, cfg.n_layer) == ("paper", 64, 2, TRAIN_MODEL["n_layer"])


def test_train_writes_outputs_and_sample_continues_the_prompt(run, capsys):
    for name in ("ckpt.mgc", "metrics.json", "metrics.csv", "loss.png"):
        assert (run / name).is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["step"] for e in metrics["eval"]] == [0, 5] and metrics["backend"] == "manual"
    capsys.readouterr()
    argv = ["sample", "--out-dir", str(run), "--prompt", "ab", "--max-new-tokens", "12", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("ab") and len(first.rstrip("\n")) == 14
    assert set(first.rstrip("\n")) <= set("abc .")
    assert main(argv) == 0
    assert capsys.readouterr().out == first                              # same seed, same text


def test_resume_continues_and_refuses_another_config(run, corpus, capsys):
    before = verify_checkpoint(run / "ckpt.mgc")
    _fails(capsys, ["train", "--resume", "--out-dir", str(run), "--n-layer", "2"], "another config")
    assert verify_checkpoint(run / "ckpt.mgc") == before
    assert main(["train", "--resume", "--out-dir", str(run), "--max-iters", "7"]) == 0
    assert load_checkpoint(run / "ckpt.mgc").meta["step"] == 7


def test_checkpoint_whose_arrays_do_not_fit_its_config(run, tmp_path, capsys):
    meta = load_checkpoint(run / "ckpt.mgc").meta
    cfg = GPTConfig.from_dict(meta["model_config"]).replace(n_embd=8)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    save_checkpoint(tmp_path / "ckpt.mgc", meta, params=params)
    _fails(capsys, ["sample", "--out-dir", str(tmp_path)], "another config")


@pytest.mark.parametrize("resume", [False, True])
def test_unreadable_checkpoint_is_never_overwritten(corpus, tmp_path, capsys, resume):
    damaged = tmp_path / "ckpt.mgc"
    damaged.write_bytes(b"MANUALGRAD-CKPT 1\n{\"sha256\": \"00\", \"size\": 3}\nabc")
    _fails(capsys, ["train", "--data", str(corpus), "--out-dir", str(tmp_path), *TINY] + (["--resume"] if resume else []),
           "checksum")
    assert damaged.read_bytes() == b"MANUALGRAD-CKPT 1\n{\"sha256\": \"00\", \"size\": 3}\nabc"


def _bad_inputs(tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("abc abc abc abc")
    other = tmp_path / "other.txt"
    other.write_text("xyz " * 100)
    data = ["--data", str(corpus), "--out-dir", str(tmp_path / "out")]
    return [
        (["train", "--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["train", "--data", str(empty)], "is empty"),
        (["train", "--data", str(short), "--block-size", "64"], "block_size=64 is too large"),
        (["train", *data, "--block-size", "16", "--val-fraction", "0.99"], "too large for the train split"),
        (["train", *data, "--backend", "symbolic"], "invalid choice: 'symbolic'"),
        (["train", *data, "--tokenizer", "words"], "invalid choice: 'words'"),
        (["train", *data, "--n-layer", "0"], "expected a positive integer"),
        (["train", *data, "--n-head", "3", "--n-embd", "16"], "divisible"),
        (["train", *data, "--dropout", "1.5"], "dropout must be in [0, 1)"),
        (["train", *data, "--tokenizer", "gpt2"], "bpe_dir"),
        (["train", *data, "--colour", "blue"], "unrecognized arguments: --colour"),
        (["train", "--resume", "--out-dir", str(tmp_path / "nothing")], "does not exist"),
        (["train", "--data", str(corpus), "--out-dir", str(corpus)], "--out-dir '%s' is a file, not a folder" % corpus),
        (["train", "--data", str(corpus), "--out-dir", str(corpus / "run")], "is a file, not a folder"),
        (["train", *data, "--resume", "--overwrite"], "--resume and --overwrite are exclusive"),
        (["export", "--out-dir", str(tmp_path / "nothing"), "--to", str(tmp_path / "out")], "does not exist"),
        (["export", "--out-dir", str(tmp_path / "nothing")], "the following arguments are required: --to"),
        (["sample", "--out-dir", str(tmp_path / "nothing")], "does not exist"),
        (["finetune", *data], "one of the arguments --init-from --from-hf is required"),
        (["finetune", *data, "--init-from", str(tmp_path), "--lora-targets", "q,w"], "subset of q,k,v,o,fc,proj,logits"),
        (["finetune", *data, "--init-from", str(tmp_path / "nothing")], "does not exist"),
        (["train", *data, "--set", "backward=fast"], "backward must be one of"),
        (["train", *data, "--set", "colour=blue"], "expected FIELD=VALUE with FIELD one of"),
        (["train", *data, "--set", "attn_block_size=0"], "attn_block_size must be a positive integer"),
        ([], "the following arguments are required: COMMAND"),
    ]


def test_bad_input_is_one_line_and_exit_2(tmp_path, corpus, capsys):
    for argv, message in _bad_inputs(tmp_path, corpus):
        _fails(capsys, argv, message)
    assert not (tmp_path / "out").exists()                              # nothing written


def test_finetune_text_outside_the_base_vocabulary(run, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("xyz " * 100)
    _fails(capsys, ["finetune", "--init-from", str(run), "--data", str(other), "--out-dir", str(tmp_path / "ft")],
           "outside the tokenizer's vocabulary")
    _fails(capsys, ["finetune", "--init-from", str(run), "--data", str(other), "--out-dir", str(tmp_path / "ft")],
           "or train a new base that covers any text (manual-grad train --tokenizer byte)")


def test_error_from_the_console_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "manual_grad", "train", "--data", str(tmp_path / "nope.txt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_sample_from_hf_folder(tmp_path, capsys, monkeypatch):
    """--from-hf goes through manual_grad.interop.load_gpt2(path) -> (params, cfg) and the
    folder's vocab.json/merges.txt (a stand-in loader: the interop module is tested on its own)."""
    byte_chars = list(_bytes_to_unicode().values())
    (tmp_path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(byte_chars)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16)
    calls = []

    def load_gpt2(path):
        calls.append(str(path))
        return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)), cfg
    monkeypatch.setitem(sys.modules, "manual_grad.interop", types.SimpleNamespace(load_gpt2=load_gpt2))
    assert main(["sample", "--from-hf", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert calls == [str(tmp_path)]
    assert capsys.readouterr().out.startswith("hi")


def test_fresh_run_never_replaces_a_valid_checkpoint(run, corpus, tmp_path, capsys):
    """Without --resume or --overwrite, a fresh train (CLI or Python) stops before any compute and
    leaves the checkpoint byte for byte; with --overwrite it starts afresh."""
    before = (run / "ckpt.mgc").read_bytes()
    _fails(capsys, ["train", "--data", str(corpus), "--out-dir", str(run), "--max-iters", "2", *TINY],
           "holds a run: continue it with --resume, replace it with --overwrite")
    with pytest.raises(CheckpointError, match="overwrite"):
        train(TrainConfig(data=str(corpus), out_dir=str(run), max_iters=2), log=sys.stderr)
    assert (run / "ckpt.mgc").read_bytes() == before
    (tmp_path / "ckpt.mgc").write_bytes(before)
    assert main(["train", "--data", str(corpus), "--out-dir", str(tmp_path), "--overwrite", "--max-iters", "2",
                 "--eval-interval", "2", *TINY]) == 0
    assert load_checkpoint(tmp_path / "ckpt.mgc").meta["step"] == 2


def test_usage_error_has_one_prefix(capsys):
    assert main(["train", "--n-layer", "0"]) == 2
    assert capsys.readouterr().err == "manual-grad train: error: argument --n-layer: expected a positive integer, got '0'\n"


def test_version_is_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"manual-grad {manual_grad.__version__}\n"
    assert importlib.metadata.version("manual-grad") == manual_grad.__version__


def test_oversized_block_size_is_refused_in_seconds_with_the_estimate(tmp_path, capsys):
    """T = 100,000 at batch 4096: XLA's estimate of the compiled step (hundreds of GiB) is read
    before the first step and the run stops with it and the machine's memory."""
    start = time.perf_counter()
    assert main(["train", "--max-chars", "220000", "--val-fraction", "0.5", "--block-size", "100000",
                 "--batch-size", "4096", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                 "--out-dir", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - start < 120
    *progress, error = capsys.readouterr().err.splitlines()              # the model, "compiling ...", the error
    assert progress[-1].startswith("compiling the train step")
    assert re.fullmatch(r"manual-grad: error: the train step needs about \d+\.\d GiB \(XLA's estimate of the "
                        r"compiled step: .*\) but this machine's memory is \d+\.\d GiB .*", error), error
    assert not (tmp_path / "out").exists()


def test_os_errors_on_user_paths_name_the_flag(tmp_path):
    with pytest.raises(PathError, match=r"^--to '.*': Permission denied$"):
        with path_errors("--to", tmp_path):
            raise PermissionError(13, "Permission denied", str(tmp_path))
