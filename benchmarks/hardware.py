"""The machine a benchmark runs on: its name, library versions, and the peak FLOP rate
that model FLOP utilisation (MFU) is measured against.

CPU peak = cores x clock x FLOPs per cycle per core, where FLOPs per cycle is read off
the vector ISA in /proc/cpuinfo flags: two FMA pipes x lanes x 2 (multiply + add), i.e.
fp32: AVX-512 64, AVX2+FMA 32, SSE 8 (fp64: half of that). This is the textbook upper
bound; turbo clocks and AVX frequency offsets are ignored.

GPU peaks are the vendors' dense (no 2:4 sparsity) tensor-core / CUDA-core figures.
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import importlib
import os
import platform
import re

import jax

__all__ = ["GPU_PEAK_TFLOPS", "cpu_info", "cpu_peak_flops", "gpu_peak_flops", "device_info",
           "versions", "device_slug", "source_digest", "now_utc"]

# Dense peak TFLOP/s (no sparsity), from the vendors' data sheets (SXM parts).
GPU_PEAK_TFLOPS = {
    "H200": {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4},
    "H100": {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4},
    "H100 PCIe": {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0},
    "A100": {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0},
}


def cpu_info() -> dict:
    """CPU model, logical cores, clock (MHz) and vector flags, from /proc/cpuinfo."""
    model, mhz, flags = platform.processor() or "unknown", None, set()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
        mhz = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", text).group(1))
        flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    except (OSError, AttributeError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = ("avx512f" if "avx512f" in flags else "avx2+fma" if {"avx2", "fma"} <= flags
           else "sse")
    return {"model": model, "cores": cores, "clock_mhz": mhz, "isa": isa}


def cpu_peak_flops(dtype: str = "float32", info: dict | None = None) -> dict:
    """Peak FLOP/s = cores x clock x FLOPs/cycle, with the numbers used."""
    info = info or cpu_info()
    per_cycle = {"avx512f": 64, "avx2+fma": 32, "sse": 8}[info["isa"]]
    if dtype == "float64":
        per_cycle //= 2
    clock_hz = (info["clock_mhz"] or 1000.0) * 1e6
    return {"flops": info["cores"] * clock_hz * per_cycle,
            "formula": f"{info['cores']} cores x {clock_hz / 1e9:.3f} GHz x {per_cycle} "
                       f"FLOPs/cycle ({info['isa']}: 2 FMA pipes x lanes x 2, {dtype})"}


def gpu_peak_flops(device_kind: str, dtype: str) -> dict:
    """Dense peak of a known GPU. float32 matmuls run on TF32 tensor cores under JAX's
    default precision on Ampere and later, so both are returned for float32."""
    names = sorted(GPU_PEAK_TFLOPS, key=len, reverse=True)
    name = next((n for n in names if n.lower() in device_kind.lower()), None)
    if name is None:
        return {"flops": None, "formula": f"unknown GPU {device_kind!r}: no peak on file"}
    table = GPU_PEAK_TFLOPS[name]
    key = "bfloat16" if dtype in ("bfloat16", "float16") else "tf32"
    out = {"flops": table[key] * 1e12,
           "formula": f"{name} dense {key} peak {table[key]} TFLOP/s (vendor data sheet)"}
    if key == "tf32":
        out["flops_fp32_cuda_cores"] = table["float32"] * 1e12
    return out


def device_info(dtype: str = "float32") -> dict:
    """Platform, device kind, CPU and the peak used for MFU."""
    device = jax.devices()[0]
    info = {"platform": device.platform, "device_kind": device.device_kind,
            "n_devices": jax.device_count(), "cpu": cpu_info()}
    if device.platform == "cpu":
        info["peak"] = cpu_peak_flops(dtype, info["cpu"])
    else:
        info["peak"] = gpu_peak_flops(device.device_kind, dtype)
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "optax", "numpy", "torch", "manual_grad"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:          # an optional peer that is not installed
            out[name] = None
    return out


def device_slug(info: dict) -> str:
    """A directory name for the results of one device: ``cpu-amd-epyc-2c``, ``gpu-h100``."""
    if info["platform"] == "cpu":
        name = f"cpu-{info['cpu']['model']}-{info['cpu']['cores']}c"
    else:
        name = f"{info['platform']}-{info['device_kind']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def source_digest() -> str:
    """SHA-256 of the package's Python sources: which code the figures belong to."""
    root = os.path.dirname(importlib.import_module("manual_grad").__file__)
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        digest.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
