"""The device allocator's peak bytes for one training step, measured in a fresh process.

XLA's peak counter cannot be reset, so each (preset, backend, B, T) gets its own process:
``python -m benchmarks.peak '{"preset": "gpt2", "backend": "manual", "batch": 8,
"seq_len": 1024, "overrides": {"dtype": "bfloat16"}}'`` prints ``{"peak_bytes": ...}``
(``null`` on CPU, which has no allocator statistics).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax

from benchmarks.compiled import device_peak_bytes

__all__ = ["measure_step_peak", "step_peak_in_subprocess"]


def measure_step_peak(spec: dict) -> int | None:
    """Runs one training step described by ``spec`` and returns the device's peak bytes."""
    from benchmarks.train_step import bench_config, make_optimizer, make_train_step, random_batch
    from manual_grad import init_params

    cfg = bench_config(spec["preset"], spec["seq_len"], spec.get("overrides", {}))
    params = init_params(cfg, jax.random.key(0))
    optimizer = make_optimizer()
    opt_state = optimizer.init(params)
    inputs, targets = random_batch(cfg, spec["batch"], spec["seq_len"], jax.random.key(1))
    step = jax.jit(make_train_step(cfg, spec["backend"], optimizer))
    jax.block_until_ready(step(params, opt_state, inputs, targets))
    return device_peak_bytes()


def step_peak_in_subprocess(spec: dict, timeout_s: float = 600) -> dict:
    """``{"peak_bytes": int}`` or ``{"unavailable": reason}``."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.peak", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout_s, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = done.stdout.strip().splitlines()
        if done.returncode or not lines:
            return {"unavailable": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
        peak = json.loads(lines[-1])["peak_bytes"]
    except Exception as error:
        return {"unavailable": f"{type(error).__name__}: {error}"[:300]}
    if peak is None:
        return {"unavailable": f"no allocator statistics on {jax.devices()[0].platform}"}
    return {"peak_bytes": int(peak)}


if __name__ == "__main__":
    print(json.dumps({"peak_bytes": measure_step_peak(json.loads(sys.argv[1]))}))
