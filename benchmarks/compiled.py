"""What XLA makes of a function: compile time, its own memory accounting, an op census of
the optimised HLO, and the arrays a forward pass saves for the backward."""
from __future__ import annotations

import collections
import re
import time

import jax
import numpy as np

__all__ = ["compile_timed", "memory_bytes", "hlo_census", "top_level_buffers", "saved_residuals", "device_peak_bytes"]


def compile_timed(fn, *args):
    """``jax.jit(fn)`` lowered and compiled for ``args``: (compiled, {lower_s, compile_s})."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return compiled, {"lower_s": lowered_at - start, "compile_s": done - lowered_at}


def memory_bytes(compiled) -> dict:
    """XLA's accounting of a compiled function (``compiled.memory_analysis()``).

    ``total = temp + argument + output``: the buffers that are live while it runs (the step
    is compiled here without donation, so nothing aliases; the timed step donates, see
    ``benchmarks.run.donating_step``). ``temp`` holds the activations kept for
    the backward and every intermediate; arguments and outputs are the same for both
    backends of one case.
    """
    stats = compiled.memory_analysis()
    out = {"temp": int(stats.temp_size_in_bytes), "argument": int(stats.argument_size_in_bytes),
           "output": int(stats.output_size_in_bytes), "alias": int(stats.alias_size_in_bytes),
           "generated_code": int(stats.generated_code_size_in_bytes)}
    out["total"] = out["temp"] + out["argument"] + out["output"]
    return out


# `%name = shape opcode(` with shape a plain type (f32[2,3]{1,0}) or a tuple `( ... )`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (\([^=]*?\)|\S+) ([a-z][\w\-]*)\(", re.M)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_NO_BUFFER = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _shape_bytes(shape: str) -> int:
    return sum(_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
               for dtype, dims in _ARRAY.findall(shape))


def top_level_buffers(compiled) -> list[tuple[int, str, str, str]]:
    """(bytes, shape, opcode, JAX op name) of every instruction of the entry computation and
    loop bodies that produces a new buffer (fused computations excluded: their values never
    reach memory), largest first."""
    found, in_fused = [], False
    for line in compiled.as_text().splitlines():
        if line and not line[0].isspace():
            in_fused = line.startswith("%fused") or "fused" in line.split("(")[0]
            continue
        m = _INSTRUCTION.match(line)
        if in_fused or not m or m.group(2) in _NO_BUFFER:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        found.append((_shape_bytes(m.group(1)), m.group(1).split("{")[0], m.group(2),
                      op_name.group(1).split("/", 1)[-1] if op_name else ""))
    return sorted(found, key=lambda item: -item[0])


def hlo_census(compiled) -> dict:
    """Counts in the optimised HLO (every computation, fused ones included): instructions,
    fusions (kernels on CPU/GPU), dots, transposes, copies, and the summed bytes of the
    top-level buffers (:func:`top_level_buffers`), a measure of memory traffic."""
    ops = collections.Counter(opcode for _, opcode in _INSTRUCTION.findall(compiled.as_text()))
    return {"instructions": int(sum(ops.values())), "fusion": ops["fusion"], "dot": ops["dot"],
            "convolution": ops["convolution"], "transpose": ops["transpose"], "copy": ops["copy"],
            "reduce": ops["reduce"], "scatter": ops["scatter"], "while": ops["while"],
            "materialised_bytes": int(sum(size for size, *_ in top_level_buffers(compiled)))}


def saved_residuals(fn, *args) -> dict:
    """The arrays ``jax.vjp(fn, *args)`` keeps for the backward (before XLA optimises).

    Residuals that are arguments are free (they are alive anyway); ``intermediate_bytes``
    counts the rest, listed largest first in ``arrays`` as ``"f32[8,12,256,256] exp (...)"``.
    Uses JAX's ``saved_residuals`` (the engine of ``jax.ad_checkpoint.print_saved_residuals``).
    """
    try:
        from jax._src.ad_checkpoint import saved_residuals as _saved
        found = _saved(fn, *args)
    except Exception as error:     # a private helper: degrade to "unknown", never fail a run
        return {"available": False, "reason": f"{type(error).__name__}: {error}"}
    arrays, intermediate = [], 0
    for aval, source in found:
        size = int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
        if "from the argument" in source or "from a literal" in source:
            continue
        intermediate += size
        where = re.sub(r" from \S+/", " from ", source)
        arrays.append((size, f"{aval.str_short()} {where}"))
    arrays.sort(key=lambda item: -item[0])
    return {"available": True, "intermediate_bytes": intermediate, "count": len(arrays),
            "arrays": [text for _, text in arrays]}


def device_peak_bytes(device=None) -> int | None:
    """The device allocator's peak bytes in use (GPU/TPU); None where there is none (CPU)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])
