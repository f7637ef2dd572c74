"""Flash attention for CPUs: a C++ kernel pair (``cpu_attention.cc``), forward and hand-written
backward, called through the XLA FFI, and registered like a layer (fwd, bwd, op, ``*_ref``).

One head, S = q k^T / sqrt(D), ρ = softmax(mask(S)) row by row, out = ρ v (T, D):
Forward:   per (batch, head, 64-row query tile), an online softmax over 64-key tiles j <= i
           (all j without the causal mask); saves q, k, v, out and lse (B, H, T).
Backward:  per (batch, head): delta = rowsum(Δ ∘ out), then with ρ_ij = exp(S_ij - lse_i)
           recomputed tile by tile, dv_j = Σ_i ρ_ij^T Δ_i, dS_ij = ρ_ij ∘ (Δ_i v_j^T - delta_i),
           dq_i = Σ_j dS_ij k_j / sqrt(D), dk_j = Σ_i dS_ij^T q_i / sqrt(D).
Every tile product is a register-tiled GEMM on a 16 KiB block; work is spread over XLA's own
intra-op thread pool. The kernel takes q, k, v packed and time-major, qkv (B, T, 3, H, D), and
returns dq, dk, dv packed the same way; out and its cotangent are (B, T, H, D). These are the
layouts of the qkv projection and of the merged heads: the attention layer hands the projection
over as it is and takes dqkv back whole (``cpu_attention.packed``), so nothing is sliced,
concatenated or transposed around the call. The op on separate (B, H, T, D) q, k, v
(``cpu_attention``) packs them first, one copy (XLA does not fold a concatenation of slices
back into the sliced array).

The kernel is compiled on first use with the machine's C++ compiler (``$CXX``, else ``g++``)
with ``-O3 -march=native`` into a cache directory (``$MANUAL_GRAD_CACHE``, default
``~/.cache/manual_grad``) keyed by the source, the flags, JAX's version and the CPU, so each
machine builds its own once (about 10 s). :func:`available` says whether it serves a dtype
here (float32 and float64 on a CPU backend, with a compiler); elsewhere the model keeps the
XLA lean attention. ``MANUAL_GRAD_NO_CPU_KERNEL=1`` turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from manual_grad.layers.attention import _probs as attention_probs
from manual_grad.layers.attention import attend_jvp, attend_ref
from manual_grad.vjp import manual_vjp

__all__ = ["cpu_attention", "cpu_attention_fwd", "cpu_attention_bwd", "cpu_attention_ref",
           "cpu_attention_packed_fwd", "cpu_attention_packed_bwd", "PackedCore",
           "available"]

SOURCE = Path(__file__).with_name("cpu_attention.cc")
HEADERS = (Path(__file__).with_name("cpu_tiles.h"),)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared")
SUPPORTED_DTYPES = (jnp.dtype("float32"), jnp.dtype("float64"))
_TARGETS = {"forward": "manual_grad_cpu_attention_fwd", "backward": "manual_grad_cpu_attention_bwd"}


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), *(h.read_bytes() for h in HEADERS), " ".join(FLAGS).encode(), compiler.encode(),
                 jax.__version__.encode(), _cpu_signature().encode()):
        key.update(part)
    root = Path(os.environ.get("MANUAL_GRAD_CACHE", Path.home() / ".cache" / "manual_grad"))
    return root / f"cpu_attention-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    """Compiles the kernel into ``target``, atomically (parallel test workers may race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=None)
def _load() -> bool:
    """Builds (once per machine) and registers the kernel; False, with a warning, if it cannot."""
    if platform.system() != "Linux" or os.environ.get("MANUAL_GRAD_NO_CPU_KERNEL"):
        return False
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        warnings.warn("manual_grad: no C++ compiler found; the CPU attention kernel falls back "
                      "to the XLA lean attention", RuntimeWarning, stacklevel=3)
        return False
    path = _library_path(compiler)
    try:
        if not path.exists():
            _build(compiler, path)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"manual_grad: building the CPU attention kernel failed; the XLA lean "
                      f"attention is used instead.\n{detail[-2000:]}", RuntimeWarning, stacklevel=3)
        return False
    jax.ffi.register_ffi_target(_TARGETS["forward"], jax.ffi.pycapsule(library.MgAttentionForward),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGETS["backward"], jax.ffi.pycapsule(library.MgAttentionBackward),
                                platform="cpu")
    return True


def available(dtype=jnp.float32) -> bool:
    """True when the kernel serves ``dtype`` here: JAX's default backend is the CPU, the dtype
    is float32 or float64, and the kernel was built."""
    return (jax.default_backend() == "cpu" and jnp.dtype(dtype) in SUPPORTED_DTYPES and _load())


class PackedCore(NamedTuple):
    """A core's entry points on packed q, k, v: ``fwd(qkv (B, T, 3, H, D), *, causal) -> (out
    (B, H, T, D), residuals)`` and ``bwd(causal, residuals, dout) -> dqkv (B, T, 3, H, D)``."""
    fwd: Callable
    bwd: Callable


def _time_major(a):
    """(B, H, T, D) <-> (B, T, H, D). Around the layer's split_heads / merge_heads transposes
    XLA cancels each pair."""
    return a.swapaxes(-2, -3)


def _pack(q, k, v):
    """(B, H, T, D) q, k, v -> qkv (B, T, 3, H, D)."""
    return jnp.stack([_time_major(a) for a in (q, k, v)], axis=-3)


def _unpack(qkv):
    """qkv (B, T, 3, H, D) -> (B, H, T, D) q, k, v."""
    return tuple(_time_major(qkv[..., i, :, :]) for i in range(3))


def cpu_attention_packed_fwd(qkv, *, causal=True):
    """``out = ρ v`` (B, H, T, D) for q, k, v packed as qkv (B, T, 3, H, D) (the qkv projection,
    reshaped); saves qkv, out (B, T, H, D) and lse (B, H, T)."""
    if not available(qkv.dtype):
        raise RuntimeError(f"cpu_attention: the CPU kernel does not serve {qkv.dtype} on the "
                           f"{jax.default_backend()} backend here (see cpu_attention.available)")
    *batch, T, _, H, D = qkv.shape
    call = jax.ffi.ffi_call(_TARGETS["forward"], (jax.ShapeDtypeStruct((*batch, T, H, D), qkv.dtype),
                                                  jax.ShapeDtypeStruct((*batch, H, T), qkv.dtype)),
                            vmap_method="broadcast_all")
    out, lse = call(qkv, causal=bool(causal))
    return _time_major(out), (qkv, out, lse)


def cpu_attention_packed_bwd(causal, residuals, dout):
    """Backward of :func:`cpu_attention_packed_fwd`: dqkv (B, T, 3, H, D), ρ recomputed tile by
    tile."""
    qkv, out, lse = residuals
    call = jax.ffi.ffi_call(_TARGETS["backward"], jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                            vmap_method="broadcast_all")
    return call(qkv, out, lse, _time_major(dout), causal=bool(causal))


def cpu_attention_fwd(q, k, v, *, causal=True):
    """``out = ρ v`` for (B, H, T, D) q, k, v: :func:`cpu_attention_packed_fwd` on them packed."""
    return cpu_attention_packed_fwd(_pack(q, k, v), causal=causal)


def cpu_attention_bwd(causal, residuals, dout):
    """Backward of :func:`cpu_attention_fwd`: ``(dq, dk, dv)``."""
    return _unpack(cpu_attention_packed_bwd(causal, residuals, dout))


def cpu_attention_jvp(residuals, tangents, *, causal=True):
    """Tangent of the output (forward mode): ρ rebuilt whole from q and k, then
    :func:`manual_grad.layers.attention.attend_jvp` (forward mode holds a (B, H, T, T) array)."""
    q, k, v = _unpack(residuals[0])
    return attend_jvp(q, k, v, attention_probs(q, k, causal), *tangents)


_QKV = "B H T D"
cpu_attention = manual_vjp(cpu_attention_fwd, cpu_attention_bwd, jvp=cpu_attention_jvp,
                           shapes=dict(q=_QKV, k=_QKV, v=_QKV))
cpu_attention.output = lambda residuals: _time_major(residuals[1])   # out (B, H, T, D), for the layer
# The kernel's own interface, for the layer: qkv (B, T, 3, H, D) in, dqkv out, no split or concatenate.
cpu_attention.packed = PackedCore(cpu_attention_packed_fwd, cpu_attention_packed_bwd)


def cpu_attention_ref(q, k, v, *, causal=True):
    """Plain-jnp twin of :func:`cpu_attention`."""
    return attend_ref(q, k, v, causal=causal)
