"""Benchmarks: hand-written (``backend="manual"``) vs automatic (``backend="autodiff"``)
gradients, per layer and for the whole training step, with PyTorch peers.

Run ``python -m benchmarks.run`` (``--quick`` for a one-minute smoke run); results go to
``benchmarks/results/<device>/`` as ``results.json``, ``results.md`` and PNG plots.
"""
