"""``report.json`` and ``REPORT.md`` from a run's outcomes (the Markdown is made from the JSON)."""
from __future__ import annotations

import json
from pathlib import Path

HOLES = {
    "H1": "attention grid had no causal case with the paper backward at T > 1 (an unmasked saved ρ passed)",
    "H2": "loss grid never reached a padded loss chunk (padding targets with 0 passed)",
    "H3": "the float64 model grid never ran the chunked loss (V < C turned it off)",
    "H4": "key-bias tests checked the written 0 only (dropping the flash backward's - delta passed)",
    "H5": "dS row sums were tested for softmax_bwd only, not for the flash tiles of the kernels",
    "H6": "the default-tier layer fuzz drew no MLP (and its first draws were degenerate)",
}


def markdown(outcomes: list[dict], meta: dict) -> str:
    killed = sum(o["verdict"] == "killed" for o in outcomes)
    lines = [
        "# Mutation report",
        "",
        f"Made by `{meta['command']}` on {meta['date']} (Python {meta['python']}, {meta['machine']}): "
        f"**{killed} of {len(outcomes)} mutations killed** by default-tier tests "
        f"(`pytest -m 'not slow'`), {meta['total_seconds']:.0f} s in all, one mutant at a time.",
        "",
        "Each mutation is applied to a temporary copy of the package (`tests/mutations/catalog.py` "
        "says what it replaces); the tests listed are the ones meant to catch it, run with `-x`. "
        "Seconds are wall time of that pytest run (start-up and compilation included) on a shared machine.",
        "",
        "| mutation | file | what | tests run | verdict | killed by | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        name = f"{o['name']} ({o['hole']})" if o["hole"] else o["name"]
        lines.append(f"| {name} | `{o['path']}` | {o['what']} | `{o['command']}` | **{o['verdict']}** | "
                     f"`{o['killed_by']}` | {o['seconds']:.0f} |")
    lines += ["", "## The earlier holes, each closed", ""]
    for hole, text in HOLES.items():
        closing = [o for o in outcomes if o["hole"] == hole]
        shown = "; ".join(f"`{o['name']}` {o['verdict']} by `{o['killed_by']}`" for o in closing) or "not run"
        lines.append(f"- **{hole}**: {text}. Now: {shown}.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, outcomes: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(dict(meta=meta, outcomes=outcomes), indent=1) + "\n")
    (out / "REPORT.md").write_text(markdown(outcomes, meta))
