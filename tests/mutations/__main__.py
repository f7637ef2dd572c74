"""``python -m tests.mutations [--only NAME ...] [--sample N --seed S] [--out DIR]``: run the
catalog (or part of it) and write ``report.json`` and ``REPORT.md``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

from tests.mutations.catalog import CATALOG
from tests.mutations.report import write_report
from tests.mutations.runner import check_imports_from_copy, run


def merge(path: Path, meta: dict, rows: list[dict]) -> tuple[dict, list[dict]]:
    """The earlier report's outcomes with ``rows`` replacing theirs, in catalog order; the command
    lines of both runs and the sum of their times."""
    old = json.loads(path.read_text())
    by_name = {o["name"]: o for o in old["outcomes"]} | {o["name"]: o for o in rows}
    ordered = [by_name[m.name] for m in CATALOG if m.name in by_name]
    meta = dict(meta, command=f"{old['meta']['command']}, then {meta['command']} --update",
                total_seconds=round(sum(o["seconds"] for o in ordered), 1))
    return meta, ordered


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__)
    parser.add_argument("--only", nargs="*", help="mutation names (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="where report.json and REPORT.md go")
    parser.add_argument("--no-report", action="store_true", help="print only, write nothing")
    parser.add_argument("--update", action="store_true",
                        help="merge these outcomes into the existing report.json (the others are kept)")
    args = parser.parse_args(argv)
    chosen = [m for m in CATALOG if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in CATALOG}
    if unknown:
        parser.error(f"unknown mutations: {sorted(unknown)}")
    check_imports_from_copy()
    start, outcomes = time.perf_counter(), []
    for mutation in chosen:
        outcome = run(mutation)
        outcomes.append(outcome)
        print(f"{outcome.verdict:8s} {outcome.seconds:7.1f} s  {mutation.name}  {outcome.killed_by}", flush=True)
    total = time.perf_counter() - start
    if not args.no_report:
        command = "python -m tests.mutations" + (" --only " + " ".join(args.only) if args.only else "")
        meta = dict(command=command, total_seconds=round(total, 1), python=platform.python_version(),
                    machine=platform.machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        rows = [dataclasses.asdict(o) for o in outcomes]
        if args.update:
            meta, rows = merge(Path(args.out) / "report.json", meta, rows)
        write_report(Path(args.out), rows, meta)
    survivors = [o.name for o in outcomes if o.verdict != "killed"]
    print(f"{len(outcomes) - len(survivors)}/{len(outcomes)} killed in {total:.0f} s"
          + (f"; not killed: {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
