"""Static input checks of the layers' public ops: shapes, ranks and dtypes.

Each op declares what its array inputs look like, one spec string per input::

    "B T C"          rank 3; B, T, C bound on first sight, checked after
    "... C"          any leading axes, then C
    "C 3*C"          a multiple of a bound (or, on first sight, bound) size
    "int B T"        an integer array (token ids, targets) instead of a floating one
    "optional C"     ``None`` allowed (an absent bias)

Shapes and dtypes are static under ``jit``, so the checks cost nothing at run time and
fire while tracing, before anything is computed: a wrong input gives a ``ValueError`` (shape,
rank) or ``TypeError`` (dtype, not an array) naming the op, the argument, what was expected
and what was given, instead of a broadcasting error deep inside the formula or, worse, a
silently broadcast result.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

__all__ = ["check_inputs", "parse_spec"]

_DIM = re.compile(r"^(?:(\d+)\*)?([A-Za-z_]\w*)$")


def _dtype_of(x) -> np.dtype | None:
    dtype = getattr(x, "dtype", None)
    return None if dtype is None else np.dtype(dtype)


def parse_spec(spec: str) -> tuple[bool, bool, list[str]]:
    """``"optional int ... T"`` -> (optional, integer, dims): ``(True, True, ["...", "T"])``."""
    words = spec.split()
    optional = words[:1] == ["optional"]
    words = words[optional:]
    integer = words[:1] == ["int"]
    return optional, integer, words[integer:]


def _check_one(op: str, name: str, x: Any, spec: str, sizes: dict[str, int], source: dict[str, str]) -> None:
    optional, integer, dims = parse_spec(spec)
    if x is None:
        if optional:
            return
        raise TypeError(f"{op}(): {name} must be an array of shape ({', '.join(dims)}), got None")
    dtype, shape = _dtype_of(x), getattr(x, "shape", None)
    if dtype is None or shape is None:
        raise TypeError(f"{op}(): {name} must be an array, got {type(x).__name__}")
    if integer and not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{op}(): {name} must be an integer array (token ids), got dtype {dtype}")
    if not integer and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{op}(): {name} must be a floating array, got dtype {dtype}")
    leading = dims[:1] == ["..."]
    dims = dims[leading:]
    rank_ok = len(shape) >= len(dims) if leading else len(shape) == len(dims)
    pattern = "(" + ", ".join((["..."] if leading else []) + dims) + ")"
    if not rank_ok:
        rank = f"at least {len(dims)}" if leading else f"{len(dims)}"
        raise ValueError(f"{op}(): {name} must have rank {rank} {pattern}, got shape {tuple(shape)}")
    trailing = shape[len(shape) - len(dims):] if dims else ()
    for dim, size in zip(dims, trailing):
        if dim.isdigit():
            expected, bound = int(dim), ""
        else:
            factor, symbol = _DIM.match(dim).groups()
            factor = int(factor or 1)
            if symbol not in sizes:
                if size % factor:
                    raise ValueError(f"{op}(): {name} has shape {tuple(shape)}; its {dim} axis must "
                                     f"be a multiple of {factor}, got {size}")
                sizes[symbol], source[symbol] = size // factor, name
            expected, bound = factor * sizes[symbol], f" with {symbol}={sizes[symbol]} from {source[symbol]}"
        if size != expected:
            raise ValueError(f"{op}(): {name} must have shape {pattern}{bound}; got {tuple(shape)} "
                             f"({dim} should be {expected}, is {size})")


def check_inputs(op: str, specs: Mapping[str, str], inputs: Mapping[str, Any]) -> None:
    """Checks ``inputs[name]`` against ``specs[name]`` in the order of ``specs``, sizes bound by
    one input holding for the next. Inputs without a spec (pytrees of adapters, PRNG keys) are
    not checked here."""
    sizes: dict[str, int] = {}
    source: dict[str, str] = {}
    for name, spec in specs.items():
        _check_one(op, name, inputs[name], spec, sizes, source)
