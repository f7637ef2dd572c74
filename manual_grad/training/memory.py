"""Will the step fit? XLA's own accounting of the compiled step against the device's memory,
read before the first step runs, so that an oversized run stops in seconds with the numbers
instead of swapping or being killed.

XLA's ``compiled.memory_analysis()`` counts the buffers live while the step runs:
``temp`` (activations kept for the backward and every intermediate), ``argument``
(parameters, optimizer state, batch) and ``output`` (the new state), less what aliases.
The memory to compare with is the accelerator's ``bytes_limit`` or, on a CPU, the host's
available memory (``MemAvailable`` of ``/proc/meminfo``; total physical memory elsewhere).
"""
from __future__ import annotations

import os

import jax

__all__ = ["step_bytes", "device_memory", "check_fits", "GiB"]

GiB = 2**30


def step_bytes(compiled) -> dict[str, int] | None:
    """``{"temp", "argument", "output", "total"}`` bytes of a compiled function (XLA's
    estimate); None when the backend does not report it."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, jax.errors.JaxRuntimeError):
        return None
    if stats is None:
        return None
    out = {"temp": int(stats.temp_size_in_bytes), "argument": int(stats.argument_size_in_bytes),
           "output": int(stats.output_size_in_bytes)}
    out["total"] = out["temp"] + out["argument"] + out["output"] - int(stats.alias_size_in_bytes)
    return out


def _meminfo() -> dict[str, int]:
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
    except (OSError, ValueError, IndexError):
        return {}


def device_memory(device=None) -> tuple[int, int, str] | None:
    """``(total, available, what)`` bytes of ``device`` (default the first); None if unknown."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if not limit:
            return None
        return int(limit), int(limit - stats.get("bytes_in_use", 0)), f"{device.device_kind} memory"
    info = _meminfo()
    if "MemTotal" in info:
        return info["MemTotal"], info.get("MemAvailable", info["MemTotal"]), "this machine's memory"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None
    return total, total, "this machine's memory"


def check_fits(compiled, *, device=None, what: str = "the train step") -> dict[str, int] | None:
    """XLA's estimate of ``compiled``; ValueError (one line: the estimate and the memory) when what
    it would allocate beyond its arguments (already in memory) exceeds what ``device`` has available."""
    needed, memory = step_bytes(compiled), device_memory(device)
    if needed is None or memory is None:
        return needed
    total, available, where = memory
    if needed["total"] - needed["argument"] > available:      # the arguments are in memory already
        raise ValueError(
            f"{what} needs about {needed['total'] / GiB:.1f} GiB (XLA's estimate of the compiled step: "
            f"{needed['temp'] / GiB:.1f} GiB of activations and temporaries, "
            f"{(needed['total'] - needed['temp']) / GiB:.1f} GiB of parameters, optimizer state and batch) "
            f"but {where} is {total / GiB:.1f} GiB ({available / GiB:.1f} GiB available): "
            "lower --block-size, --batch-size or the model's size")
    return needed
