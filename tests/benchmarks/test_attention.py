"""benchmarks.attention: every contender runs and every figure is a positive finite number."""
import json
import math

from benchmarks import attention


def test_attention_benchmark_runs_every_core_and_peer(tmp_path):
    results = attention.main(["--preset", "tiny", "--seq-lens", "16", "70", "--batch", "2",
                              "--repeats", "2", "--out", str(tmp_path)])
    assert [c["seq_len"] for c in results["cells"]] == [16, 70]
    for cell in results["cells"]:
        assert {"manual (xla)", "manual (cpu)", "autodiff", "torch sdpa"} <= set(cell["time_s"])
        for stats in [*cell["time_s"].values(), *cell["over_xla"].values()]:
            assert all(math.isfinite(v) and v > 0 for v in stats.values())
    (device_dir,) = tmp_path.iterdir()
    assert json.loads((device_dir / "attention.json").read_text())["cells"] == json.loads(json.dumps(results["cells"]))
    assert "| 70 |" in (device_dir / "attention.md").read_text()
