"""Runs every experiment, one process each, and records how long each took.

    python -m experiments.run_all [--quick] [--out DIR] [--data FILE] [--only NAME ...]

Writes ``<out>/run_all.json`` (wall seconds and exit status per experiment) next to the
experiments' own results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.common import DATA, RESULTS

EXPERIMENTS = ("param_counts", "worked_example", "layernorm_independence", "embedding_sparsity",
               "key_bias", "linear_attention", "position_vs_causal", "lora_scale", "kv_cache")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--only", nargs="*", choices=EXPERIMENTS, default=None)
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    record = {}
    for name in args.only or EXPERIMENTS:
        cmd = [sys.executable, "-m", f"experiments.{name}", "--out", str(args.out), "--data", str(args.data)]
        cmd += ["--quick"] if args.quick else []
        t0 = time.perf_counter()
        status = subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}).returncode
        record[name] = {"seconds": round(time.perf_counter() - t0, 1), "exit_status": status}
        print(f"{name}: {record[name]}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "run_all.json"
    previous = json.loads(log.read_text()) if log.exists() else {}
    log.write_text(json.dumps({**previous, **record, "cpu_count": os.cpu_count()}, indent=1) + "\n")
    if any(r["exit_status"] for r in record.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
