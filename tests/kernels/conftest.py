import pytest

from manual_grad.kernels.flash_attention import BLOCKS as ATTENTION_BLOCKS
from manual_grad.kernels.linear_cross_entropy import BLOCKS as LOSS_BLOCKS


@pytest.fixture
def small_tiles(monkeypatch):
    """CPU tiles of 16 (attention) and (16 tokens, 16 vocabulary entries, 16 channels) (loss),
    so that small shapes span several tiles, the last one padded."""
    monkeypatch.setitem(ATTENTION_BLOCKS, "cpu", 16)
    monkeypatch.setitem(LOSS_BLOCKS, "cpu", (16, 16, 16))
