import json
import math

from benchmarks import gemm


def test_gemm_rows_are_positive_and_finite(tmp_path):
    out = tmp_path / "gemm.json"
    gemm.main(["--tokens", "8", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["gemm"] for r in result["rows"]] == [name for name, _, _ in gemm.SHAPES]
    for row in result["rows"]:
        assert row["m"] == 8
        for key in ("jax_s", "torch_s", "jax_gflops", "torch_gflops", "jax_over_torch"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["gemm"], key)
        assert math.isclose(row["jax_over_torch"], row["jax_s"] / row["torch_s"])
    assert result["meta"]["torch_threads"] >= 1
