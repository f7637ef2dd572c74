import jax
import pytest


@pytest.fixture
def x64():
    """Runs the test with 64-bit types enabled (and restores the setting after)."""
    with jax.enable_x64(True):
        yield
