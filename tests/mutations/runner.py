"""Apply one mutation to a temporary copy of the repository and run its tests there.

The copy holds ``manual_grad/``, ``tests/`` and ``pyproject.toml`` (pytest's settings); the tests
run in a fresh interpreter with the copy first on ``PYTHONPATH`` and as working directory, so the
mutated package is the one imported and the working tree is never touched. The C++ attention
kernel is built per source hash, so a mutated ``.cc`` gets its own build on first use.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.mutations.catalog import Mutation

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("manual_grad", "tests", "pyproject.toml")
DEFAULT_TIER = ("-m", "not slow")


@dataclass
class Outcome:
    name: str
    path: str
    verdict: str          # "killed" (a test failed), "survived" (all passed), "error" (pytest could not run)
    seconds: float
    killed_by: str        # the first failing test, if any
    command: str
    what: str
    hole: str


def apply(mutation: Mutation, root: Path) -> None:
    """Replace ``old`` by ``new`` in ``root / path``; ``old`` must occur exactly once."""
    path = root / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise ValueError(f"mutation {mutation.name}: the text to replace occurs {count} times in "
                         f"{mutation.path} (expected once): the catalog is out of date")
    path.write_text(text.replace(mutation.old, mutation.new))


def copy_tree(dest: Path, source: Path = ROOT) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = source / name
        (shutil.copytree(src, dest / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dest / name))


def pytest_command(mutation: Mutation) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rf",
            *DEFAULT_TIER, *mutation.tests]


def run(mutation: Mutation, *, timeout: float = 900) -> Outcome:
    """Run ``mutation``'s tests against a mutated copy; killed when a test fails."""
    cmd = pytest_command(mutation)
    shown = "pytest -x -m 'not slow' " + " ".join(a if " " not in a else repr(a) for a in mutation.tests)
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        root = Path(tmp)
        copy_tree(root)
        apply(mutation, root)
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = -1, f"timed out after {timeout} s\n{e.stdout or ''}"
        seconds = time.perf_counter() - start
    failed = re.findall(r"^FAILED (.+?)(?: - .*)?$", output, re.M)
    if rc == 1 and failed:
        verdict, killed_by = "killed", failed[0]
    elif rc == 0:
        verdict, killed_by = "survived", ""
    else:
        verdict, killed_by = "error", output.strip().splitlines()[-1][:200] if output.strip() else f"rc {rc}"
    return Outcome(mutation.name, mutation.path, verdict, round(seconds, 1), killed_by, shown,
                   mutation.what, mutation.hole)


def check_imports_from_copy() -> None:
    """The copy, not the installed working tree, must be what a mutant's tests import."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manual_grad").mkdir()
        (Path(tmp) / "manual_grad" / "__init__.py").write_text("MUTANT = True\n")
        out = subprocess.run([sys.executable, "-c", "import manual_grad; print(manual_grad.MUTANT)"],
                             cwd=tmp, env={**os.environ, "PYTHONPATH": tmp}, capture_output=True, text=True)
        if out.stdout.strip() != "True":
            raise RuntimeError("PYTHONPATH does not take precedence over the installed manual_grad: "
                               + out.stderr[-500:])
