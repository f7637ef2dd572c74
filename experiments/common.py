"""Shared machinery of the experiments: command line, character-level data, a small seeded
AdamW training loop on the trainer's step (:func:`manual_grad.training.step.train_step`), timing, and result writing.

Every experiment script is ``python -m experiments.<name> [--quick] [--out DIR] [--data FILE]``
and writes ``<out>/<name>.json`` (and PNGs) from what it actually ran.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import manual_grad
from manual_grad import loss_fn
from manual_grad.training import OptimizerConfig
from manual_grad.training.optimizer import make_optimizer as trainer_optimizer
from manual_grad.training.step import init_state, train_step

RESULTS = Path(__file__).resolve().parent / "results"
# tinyshakespeare (nanoGPT's character-level corpus), relative to the repository; or --data FILE.
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


# --- command line and results -------------------------------------------------------------

def parse_args(description: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for <name>.json and PNGs")
    parser.add_argument("--data", type=Path, default=DATA, help="a plain-text file (character-level)")
    jax.config.update("jax_enable_x64", False)     # float32 unless an experiment asks for float64
    return parser.parse_args(argv)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return x


def write_result(out: Path, name: str, result: dict, quick: bool) -> Path:
    """Writes ``out/name.json`` with the result and where/how it was produced."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"experiment": name, "quick": quick,
              "environment": {"jax": jax.__version__, "manual_grad": manual_grad.__version__,
                              "backend": jax.default_backend(), "machine": platform.machine(),
                              "cpu_count": os.cpu_count(),
                              "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
              **result}
    path = out / f"{name}.json"
    path.write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    return path


def new_figure(ncols=1, width=5.0, height=3.6, constrained=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False,
                             layout="constrained" if constrained else None)
    return fig, list(axes[0])


def plot_lines(ax, series: dict, *, xlabel, ylabel, title=None, logx=None, logy=False, style="-"):
    """One line per ``{label: (xs, ys)}`` on ``ax``; ``logx`` is a log base or None."""
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, style, label=label)
    if logx:
        ax.set_xscale("log", base=logx)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    if title:
        ax.set_title(title)


def save_figure(fig, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    if not fig.get_constrained_layout():
        fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return f"{name}.png"


# --- data ------------------------------------------------------------------------------------

def load_chars(path: Path) -> tuple[np.ndarray, list[str]]:
    """(ids (N,) int32, vocabulary): the file's characters, vocabulary sorted."""
    text = Path(path).read_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return np.array([index[c] for c in text], np.int32), vocab


def sample_batch(ids: np.ndarray, batch: int, block: int, rng: np.random.Generator):
    """(inputs, targets) (batch, block): random windows and their next characters."""
    start = rng.integers(0, len(ids) - block - 1, batch)
    window = np.stack([ids[s:s + block + 1] for s in start])
    return jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])


def fixed_batches(ids: np.ndarray, n: int, batch: int, block: int, seed: int = 1234):
    """``n`` evaluation batches, the same for every run."""
    rng = np.random.default_rng(seed)
    return [sample_batch(ids, batch, block, rng) for _ in range(n)]


# --- training --------------------------------------------------------------------------------

def make_optimizer(lr: float, weight_decay: float, trainable=None):
    """The trainer's AdamW (:func:`manual_grad.training.optimizer.make_optimizer`: decay on the
    weight matrices only, never on biases or LayerNorm gains) at a constant ``lr``, without
    clipping or warmup; when ``trainable`` (a pytree of bools like the params) is given, the other
    leaves get a zero update (frozen)."""
    opt = trainer_optimizer(OptimizerConfig(learning_rate=lr, min_lr=lr, warmup_iters=0, weight_decay=weight_decay,
                                            beta1=0.9, beta2=0.999, grad_clip=0.0, lr_decay_iters=1))
    if trainable is None:
        return opt
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    return optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()}, labels)


OPTIMIZER = "AdamW (the trainer's: decay on weight matrices only), constant lr, betas (0.9, 0.999), no clipping"


def train(params, cfg, train_ids, val_batches, *, steps, batch, lr=1e-3, weight_decay=0.1,
          seed=0, trainable=None, backend="manual", eval_every=50, track=None):
    """Seeded AdamW training. Returns a dict of curves (``step``, ``train_loss``, ``val_loss``,
    and ``track``: ``{name: [f(params) at each eval]}``) and the final ``params``.

    The batch order depends only on ``seed``, so runs that differ in one setting see the same data.
    """
    opt = make_optimizer(lr, weight_decay, trainable)
    state = init_state(params, opt)
    step = jax.jit(partial(train_step, cfg=cfg, optimizer=opt, backend=backend))     # the trainer's step

    val_loss = jax.jit(lambda p, x, y: loss_fn(p, x, y, cfg, backend))

    def evaluate(p):
        return float(np.mean([val_loss(p, x, y) for x, y in val_batches]))

    rng = np.random.default_rng(seed)
    curves = {"step": [], "train_loss": [], "val_loss": [], "track": {k: [] for k in (track or {})}}
    recent = []
    t0 = time.perf_counter()
    for i in range(steps + 1):
        if i % eval_every == 0 or i == steps:
            curves["step"].append(i)
            params = state["params"]
            curves["val_loss"].append(evaluate(params))
            curves["train_loss"].append(float(np.mean(recent)) if recent else curves["val_loss"][-1])
            for name, f in (track or {}).items():
                curves["track"][name].append(f(params))
            recent = []
        if i == steps:
            break
        x, y = sample_batch(train_ids, batch, cfg.block_size, rng)
        state, metrics = step(state, (x, y), None)
        recent.append(float(metrics["loss"]))
    curves["seconds"] = time.perf_counter() - t0
    return curves, state["params"]


def time_call(fn, *args, repeats=5) -> float:
    """Median wall seconds of ``fn(*args)`` (compiled first, results blocked on)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def split_ids(ids: np.ndarray, val_fraction: float = 0.1):
    """(train, val): the last ``val_fraction`` of the text is the validation set."""
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:]
