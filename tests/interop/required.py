"""Imports of the outside references (PyTorch, transformers): skipped where they are absent, a
failure where they must be there.

The interop tests are the only checks of the forward against code we did not write, so a CI run
that skips them proves less than it says. Where ``MANUAL_GRAD_REQUIRE_INTEROP=1`` is set (CI sets
it), or ``CI`` is set (as hosted CI services do), a missing reference is an error at collection,
not a skip. Elsewhere (a checkout without the ``interop`` extra) the tests are skipped as before.
"""
from __future__ import annotations

import importlib
import os

import pytest

REQUIRE_VARIABLE = "MANUAL_GRAD_REQUIRE_INTEROP"


def required() -> bool:
    """Whether a missing reference must fail the run here."""
    flag = os.environ.get(REQUIRE_VARIABLE, "")
    return flag not in ("", "0") or (flag == "" and os.environ.get("CI", "") not in ("", "0", "false"))


def reference(module: str, *, reason: str | None = None):
    """``importorskip(module)``, or a plain import (ImportError fails the run) where required."""
    if required():
        try:
            return importlib.import_module(module)
        except ImportError as error:
            raise ImportError(f"{module} is required here ({REQUIRE_VARIABLE} or CI is set), "
                              f"but cannot be imported: {error}") from error
    return pytest.importorskip(module, reason=reason)
