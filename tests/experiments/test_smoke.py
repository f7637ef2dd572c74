"""Each experiment end to end at its --quick size, on a small generated text, into a tmp dir.

The numbers a quick run produces are not asserted beyond what must hold at any size (the
properties each experiment exists to measure, where they are exact)."""
import importlib
import json
import random

import pytest

FAST = ("param_counts", "worked_example", "layernorm_independence", "embedding_sparsity")
TRAINING = ("key_bias", "linear_attention", "position_vs_causal", "lora_scale", "kv_cache")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = "the king and queen of love shall speak my lord thou art not here to night".split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(400)]
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(name, text_file, tmp_path):
    module = importlib.import_module(f"experiments.{name}")
    module.main(["--quick", "--out", str(tmp_path), "--data", str(text_file)])
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["experiment"] == name and result["quick"] is True and result["verdict"]
    if "plot" in result:
        assert (tmp_path / result["plot"]).stat().st_size > 0
    return result


def _check(name, result):
    if name == "param_counts":
        assert all(r["holds"] for r in result["rows"])
    elif name == "worked_example":
        verdicts = {r["quantity"]: r["verdict"] for r in result["rows"]}
        assert verdicts["softmax ŷ"] == "wrong" and verdicts["logits = z W_vocab^T"] == "right"
        assert result["cross_attention_layer_agrees_with_core"]
    elif name == "layernorm_independence":
        assert result["jacobian"]["layernorm (manual)"]["max_abs_cross_token"] == 0
        assert result["jacobian"]["token-norm (autodiff)"]["max_abs_cross_token"] > 0
    elif name == "embedding_sparsity":
        assert all(result["exact_zero_checks"][k] for k in ("absent_rows_all_exactly_zero",
                                                            "pos_rows_ge_T_exactly_zero"))
    elif name == "key_bias":
        g = result["gradient_ratio_db_k_over_db_q"]["float64"]
        assert g["library attention (manual)"] == 0 and g["softmax (manual)"] < 1e-12 and g["sigmoid (manual)"] > 1e-3
    elif name == "linear_attention":
        assert all(e["gradients"] < 1e-12 for e in result["gradient_rel_error_float64"].values())
    elif name == "position_vs_causal":
        assert result["equivariance_rel_error"]["noncausal_nope"] < 1e-12 < result["equivariance_rel_error"]["causal_nope"]
        assert len(result["nope_minus_learned"]["per_seed"]) == len(result["seeds"]) >= 2
    elif name == "lora_scale":
        assert max(max(v) for v in result["layer_linearity_rel_err_dA_dB"].values()) < 1e-12
        assert len(result["seeds"]) >= 2 and all(len(v) == len(result["seeds"])
                                                  for v in result["final_val_loss_by_seed"].values())
    elif name == "kv_cache":
        assert set(result["seconds"]) == {"cached", "recomputed"}
        assert all(t > 0 for kind in result["seconds"].values() for t in kind.values())


@pytest.mark.parametrize("name", FAST)
def test_experiment_runs_quick(name, text_file, tmp_path):
    _check(name, _run(name, text_file, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING)
def test_training_experiment_runs_quick(name, text_file, tmp_path):
    _check(name, _run(name, text_file, tmp_path))
