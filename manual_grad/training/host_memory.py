"""Keep the host memory a CPU step frees inside the process, for the next step.

XLA:CPU allocates each call's buffers with ``malloc``: one temporary buffer holding every
activation and residual of a training step (tens to hundreds of MiB), and the outputs (the
gradients, the new parameters). glibc serves a request above its mmap threshold (which
rises with use to at most 32 MiB), or one made by a worker thread whose heap cannot hold it,
with a fresh ``mmap``, and unmaps it on ``free``.
So every call faults its whole working set back in, a page at a time. That costs little on
a machine whose freed pages stay resident. On a virtual machine whose host reclaims freed
guest memory it is not cheap. Measured on the 2-core cloud VM of the committed benchmarks:
writing 531 MiB of freshly mapped memory took 62-77 ms when the previous block had just
been freed and 0.5-1.6 s after 1-8 s of other work, while the same write into memory the
process had kept took 21-63 ms however long it waited. A shakespeare-char step at T = 4096
(531 MiB of temporaries) then pays up to a second for memory it used a moment ago whenever
something else ran in between: an evaluation, a checkpoint, another model in the process.

:func:`keep_host_memory` sets three glibc ``mallopt`` options for the rest of the process:

- ``M_ARENA_MAX = 1``: threads started afterwards allocate from the main heap, the one heap
  that can grow past 64 MiB without ``mmap`` (JAX's CPU worker threads among them, so it must
  run before JAX starts its CPU client; threads already running keep their own heaps);
- ``M_MMAP_MAX = 0``: no request is served by its own ``mmap``;
- ``M_TRIM_THRESHOLD = SIZE_MAX``: ``free`` never hands the top of the heap back.

Freed blocks then stay mapped and are reused by the next call; the process's resident memory
stays at its peak working set instead of rising and falling every step. :func:`train`
calls it first thing; a program that drives the step itself calls it at start-up. Setting
``MANUAL_GRAD_KEEP_HOST_MEMORY=0`` turns it off. Elsewhere than on glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_host_memory"]

# glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
OPT_OUT = "MANUAL_GRAD_KEEP_HOST_MEMORY"

_applied = False


def _glibc():
    """The C library when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_host_memory() -> bool:
    """Make freed host memory stay with the process for reuse (see the module docstring).

    Returns True when the policy is in force (now or from an earlier call), False on a C
    library other than glibc or when ``MANUAL_GRAD_KEEP_HOST_MEMORY=0``.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt takes an int: -1 becomes SIZE_MAX in glibc's size_t threshold.
    _applied = all(libc.mallopt(option, value) == 1 for option, value in
                   ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
    return _applied
