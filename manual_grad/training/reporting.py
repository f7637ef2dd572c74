"""What a run shows and leaves behind: the progress line, metrics.json / metrics.csv and the
loss-curve PNG."""
from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["Progress", "write_metrics", "plot_losses"]


class Progress:
    """A one-line progress bar on a terminal (``\\r``), plain log lines otherwise."""

    def __init__(self, total: int, stream, width: int = 24):
        self.total, self.stream, self.width = max(total, 1), stream, width
        self.live = hasattr(stream, "isatty") and stream.isatty()

    def update(self, step: int, text: str) -> None:
        filled = int(self.width * step / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] {text}"
        self.stream.write(("\r" + line + "\033[K") if self.live else line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
        self.stream.flush()


def write_metrics(out_dir: Path, history: dict, summary: dict) -> None:
    """``metrics.json`` (summary + history) and ``metrics.csv`` (one row per logged or evaluated step)."""
    (out_dir / "metrics.json").write_text(json.dumps({**summary, **history}, indent=1))
    evals = {e["step"]: e for e in history["eval"]}
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train_loss", "lr", "grad_norm", "eval_train_loss", "eval_val_loss", "elapsed_s"])
        steps = sorted({row[0] for row in history["train"]} | set(evals))
        rows = {row[0]: row for row in history["train"]}
        for s in steps:
            _, loss, lr, norm = rows.get(s, (s, "", "", ""))
            e = evals.get(s, {})
            writer.writerow([s, loss, lr, norm, e.get("train", ""), e.get("val", ""), e.get("elapsed_s", "")])


def plot_losses(runs: dict[str, dict], path, title: str = "") -> None:
    """Loss curves of one or more runs (label -> metrics history) into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, history) in enumerate(runs.items()):
        color = f"C{i}"
        if history["train"]:
            steps, losses = zip(*((row[0], row[1]) for row in history["train"]))
            ax.plot(steps, losses, color=color, alpha=0.3, lw=0.8, label=f"{label} train (batch)")
        if history["eval"]:
            steps = [e["step"] for e in history["eval"]]
            ax.plot(steps, [e["val"] for e in history["eval"]], marker="o", ls=("-", "--", ":")[i % 3], color=color,
                    ms=3 + 2 * (i == 0), label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
