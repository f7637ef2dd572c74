"""What a run shows and leaves behind: the progress line, metrics.json / metrics.csv and the
loss-curve PNG."""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

__all__ = ["Progress", "write_metrics", "plot_losses"]


def _clock(seconds: float) -> str:
    """``1:02:03`` / ``2:03``: a duration for the progress line."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """The progress of a run: on a terminal one line redrawn in place (``\\r``) and cut to the
    terminal's width; otherwise one plain line per update.

    ``update`` shows the step, loss, learning rate, tokens/s of the steps since the last update
    (the caller times the steps alone: compilation and evaluation are not in it), the time
    elapsed since :meth:`start` and the time left at the mean step time so far (ETA);
    ``status`` names what is happening between updates (compiling, evaluating, saving).
    """

    def __init__(self, total: int, stream, width: int = 20, *, start_step: int = 0):
        self.total, self.stream, self.width = max(total, 1), stream, width
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self.start_step, self.t0 = start_step, time.perf_counter()
        self.step_seconds, self.steps_timed = 0.0, 0

    def start(self, step: int) -> None:
        """The loop starts at ``step``: elapsed time and ETA count from now."""
        self.start_step, self.t0 = step, time.perf_counter()

    def _emit(self, line: str, *, keep: bool) -> None:
        if self.live:             # a line redrawn in place must not wrap: a wrapped one leaves stale copies
            columns = shutil.get_terminal_size((80, 24)).columns
            line = line if keep else line[:max(columns - 1, 1)]
            self.stream.write("\r" + line + "\033[K" + ("\n" if keep else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def update(self, step: int, loss: float, lr: float, tokens: int, seconds: float, steps: int) -> None:
        """After ``step`` steps: ``steps`` of them, ``tokens`` tokens, took ``seconds`` of stepping."""
        self.step_seconds += seconds
        self.steps_timed += steps
        per_step = self.step_seconds / self.steps_timed if self.steps_timed else None
        filled = int(self.width * step / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        rate = f"{tokens / max(seconds, 1e-9):,.0f}" if steps else "-"
        eta = _clock(per_step * (self.total - step)) if per_step is not None else "-"
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:.4f} | lr {lr:.2e} | "
                f"{rate} tok/s | {_clock(time.perf_counter() - self.t0)} elapsed, ETA {eta}")
        self._emit(line, keep=not self.live)

    def status(self, text: str) -> None:
        """What runs now (until the next update or message): on a terminal it is replaced."""
        self._emit(text + " ...", keep=not self.live)

    def message(self, text: str) -> None:
        """A line that stays."""
        self._emit(text, keep=True)


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
