"""Timing done right: warm-up excluded, every call waited for, several repeats, and the
contenders interleaved in ABBA order (A B B A A B ...) so slow machine drift cancels in
their ratio. Reported as median and spread (quartiles, min, max)."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

__all__ = ["summarise", "time_interleaved", "ratio"]


def summarise(samples) -> dict:
    """Median, quartiles (q25, q75), min, max and count of a list of numbers."""
    a = np.asarray(samples, dtype=float)
    q25, median, q75 = np.percentile(a, [25, 50, 75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def time_interleaved(fns: dict[str, Callable[[], object]], *, repeats: int,
                     warmup: int = 1, settle_below: float = 1.0) -> dict[str, list[float]]:
    """Wall-clock seconds of each ``fns[name]()`` over ``repeats`` rounds.

    Each callable must return only once its work is done (``jax.block_until_ready``,
    ``torch.cuda.synchronize``). ``warmup`` untimed rounds run first. Rounds alternate the
    order of the contenders (forward, then reversed), so a linear drift in machine speed
    hits every contender equally.

    A contender whose last warm-up call took less than ``settle_below`` seconds makes one
    untimed call right before each timed one, so each callable must be compiled before it
    comes here: one that compiles on its first call looks long and is timed cold. A call
    timed straight after another contender's is timed cold: that contender's threads are
    still spinning on the cores (OpenMP's and XLA's pools spin for milliseconds before they
    sleep), its own threads are asleep, its data is out of the caches, and the other's
    allocations may have taken the hole its temporaries used. In a training loop a step runs
    straight after a step of its own, and so it is timed here (findings 6 and 7 of
    ``benchmarks/findings.md``; ``benchmarks.run`` settles every step call under 10 s).
    Calls of ``settle_below`` seconds or more are timed directly.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    last_warmup = dict.fromkeys(names, float("inf"))
    for _ in range(warmup):
        for name in names:
            start = time.perf_counter()
            fns[name]()
            last_warmup[name] = time.perf_counter() - start
    settle = {name: last_warmup[name] < settle_below for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if settle[name]:
                fns[name]()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Summary of the per-round ratios ``numerator[i] / denominator[i]`` (paired rounds)."""
    return summarise(np.asarray(numerator) / np.asarray(denominator))
