"""Suite-wide setup.

The suite compiles hundreds of small programs and runs each a few times, so compile time is
most of its time. XLA's backend optimisation (LLVM's passes over the compiled program) is
turned down for it: the HLO, and so every formula and every saved residual, is the same; only
machine-code quality changes, which no test measures. Set ``XLA_FLAGS`` with an explicit
``--xla_backend_optimization_level`` to run the suite at another level.
"""
import os

FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                " --xla_cpu_use_fusion_emitters=false")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax
import pytest


@pytest.fixture
def x64():
    """Runs the test with 64-bit types enabled (and restores the setting after)."""
    with jax.enable_x64(True):
        yield
