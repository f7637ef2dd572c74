"""Every Python block of the README runs as written: in order, each in a fresh namespace, all in
one empty folder (so a block that loads a run finds the one an earlier block trained there)."""
import re
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3 and any("load_model(" in b for b in BLOCKS)


@pytest.mark.slow          # about 30 s: it compiles the API block's gradient and trains a small run
def test_every_python_block_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(BLOCKS, 1):
        start = time.perf_counter()
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": f"readme_block_{i}"})
        except Exception as e:                                    # name the block, not just the line
            pytest.fail(f"README python block {i} fails: {type(e).__name__}: {e}\n{code}")
        print(f"block {i}: {time.perf_counter() - start:.1f} s")
    assert (tmp_path / "out-small" / "ckpt.mgc").is_file()
    assert (tmp_path / "out-small-hf" / "model.safetensors").is_file()
