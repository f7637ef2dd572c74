"""experiments/README.md is what ``python -m experiments.report`` makes of results/*.json, and its
verdicts follow the numbers (changing a number in the JSON changes the verdict)."""
import json
import shutil

import pytest

from experiments import report


def test_readme_agrees_with_the_json():
    assert report.README.read_text() == report.render(report.RESULTS), \
        "experiments/README.md differs from results/*.json: run python -m experiments.report"


def test_every_results_file_is_on_the_page():
    shown = {name for name, _ in report.ROWS}
    on_disk = {p.stem for p in report.RESULTS.glob("*.json")} - {"run_all"}
    assert on_disk <= shown, on_disk - shown


@pytest.fixture
def results_copy(tmp_path):
    out = tmp_path / "results"
    shutil.copytree(report.RESULTS, out)
    return out


def _edit(results, name, change):
    path = results / f"{name}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_verdicts_follow_the_numbers(results_copy):
    """A gap within its spread is "not resolved"; a non-zero key-bias gradient under softmax fails 2a;
    a cached decode step growing like the recomputed one is "not shown"."""
    def unresolved(d):
        d["nope_minus_learned"].update(mean=0.01, std=0.02)

    def softmax_bias(d):
        d["gradient_ratio_db_k_over_db_q"]["float64"]["softmax (manual)"] = 1e-3

    def slow_cache(d):
        d["slopes"]["cached"] = 1.9

    before = report.render(results_copy)
    for name, change, phrase in (("position_vs_causal", unresolved, "not resolved"),
                                 ("key_bias", softmax_bias, "**fails**: below"),
                                 ("kv_cache", slow_cache, "**not shown**")):
        if not (results_copy / f"{name}.json").exists():
            continue
        assert phrase not in before
        _edit(results_copy, name, change)
        assert phrase in report.render(results_copy)
