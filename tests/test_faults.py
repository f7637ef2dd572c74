"""Training faults: non-finite loss or gradient, a process killed during a checkpoint save,
damaged checkpoints, and run-to-run determinism."""
import io
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad import loading
from manual_grad.training import loop as train_lib
from manual_grad.checkpoint import CheckpointError, load_checkpoint
from manual_grad.cli import main
from manual_grad.loading import CHECKPOINT
from manual_grad.training import train
from tests.helpers import train_config

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4, learning_rate=1e-2, min_lr=1e-3,
            warmup_iters=2, eval_iters=2, sample_tokens=0)
FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "4",
         "--learning-rate", "1e-2", "--min-lr", "1e-3", "--warmup-iters", "2", "--eval-iters", "2",
         "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "a cat sat on the mat and a dog ate the hat".split()
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("".join(" ".join(rng.choice(words, 5)) + ".\n" for _ in range(200)))
    return path


def _poison_step(monkeypatch, bad_step: int, metric: str, value: float):
    """Makes training step ``bad_step`` report ``metric = value`` and leave NaN parameters,
    as a real overflow would."""
    real = train_lib.compile_step

    def compile_step(run, state):
        state, step_fn, put_batch = real(run, state)

        def step(state, batch, key):
            new_state, metrics = step_fn(state, batch, key)
            if int(state["step"]) == bad_step:
                metrics = {**metrics, metric: jnp.float32(value)}
                new_state = {**new_state, "params": jax.tree.map(lambda p: p * jnp.nan, new_state["params"])}
            return new_state, metrics
        return state, step, put_batch
    monkeypatch.setattr(train_lib, "compile_step", compile_step)


@pytest.mark.parametrize("metric, value", [("loss", np.nan), ("grad_norm", np.inf)])
def test_non_finite_step_stops_keeps_last_good_checkpoint_and_resume_continues(
        corpus, tmp_path, monkeypatch, capsys, metric, value):
    common = ["train", "--data", str(corpus), "--out-dir", str(tmp_path), "--max-iters", "20",
              "--eval-interval", "10", "--log-interval", "5", *FLAGS]
    _poison_step(monkeypatch, 13, metric, value)
    assert main(common) == 2
    err = capsys.readouterr().err
    # Found at the step-15 log check (steps are read back lazily), reported as step 13.
    assert f"non-finite {metric}" in err and "at step 13" in err and "(step 10) is kept" in err, err
    kept = load_checkpoint(tmp_path / CHECKPOINT)
    assert kept.meta["step"] == 10
    assert all(np.isfinite(a).all() for a in kept.flat("params").values())

    monkeypatch.undo()                                   # the fault is gone: --resume continues
    assert main(["train", "--resume", "--out-dir", str(tmp_path)]) == 0
    resumed = load_checkpoint(tmp_path / CHECKPOINT)
    assert resumed.meta["step"] == 20
    # ... to exactly where a run that never failed gets.
    straight = train(train_config(out_dir=str(tmp_path / "straight"), data=str(corpus), max_iters=20,
                                 eval_interval=10, log_interval=5, **TINY), log=io.StringIO())
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.tree("params"))):
        assert np.array_equal(a, b)


def test_non_finite_before_first_checkpoint_writes_none(corpus, tmp_path, monkeypatch):
    _poison_step(monkeypatch, 2, "loss", np.nan)
    with pytest.raises(FloatingPointError, match="at step 2: training stopped; no checkpoint was written"):
        train(train_config(out_dir=str(tmp_path), data=str(corpus), max_iters=20, eval_interval=10,
                          log_interval=5, **TINY), log=io.StringIO())
    assert not (tmp_path / CHECKPOINT).exists()


# A child process saves v1, then is SIGKILL-ed from inside the write of v2, once half of
# v2's bytes are in the temporary file: the kill lands in the middle of the save every time.
_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from manual_grad import checkpoint

    path = sys.argv[1]
    checkpoint.save_checkpoint(path, {"version": 1}, params={"w": np.arange(1000, dtype=np.float32)})
    real_fdopen = os.fdopen

    class HalfThenKill:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.os.fdopen = lambda fd, mode: HalfThenKill(real_fdopen(fd, mode))
    big = np.random.default_rng(0).standard_normal(2_000_000).astype(np.float32)   # 8 MB
    checkpoint.save_checkpoint(path, {"version": 2}, params={"w": big})
    sys.exit("not killed")
""")


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / CHECKPOINT
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(partial) == 1 and partial[0].stat().st_size > 4_000_000   # the kill hit mid-write
    ckpt = load_checkpoint(path)                                           # checksum verified
    assert ckpt.meta["version"] == 1
    np.testing.assert_array_equal(ckpt.flat("params")["w"], np.arange(1000, dtype=np.float32))
    with pytest.raises(CheckpointError, match="not a manual_grad checkpoint|damaged"):
        load_checkpoint(partial[0])                                        # the half-written file


@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(train_config(out_dir=str(out), data=str(corpus), max_iters=2, eval_interval=2, log_interval=1, **TINY),
          log=io.StringIO())
    return out / CHECKPOINT


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_reported_not_loaded(saved_run, tmp_path, capsys, damage):
    raw = bytearray(saved_run.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 1]
    else:
        raw[len(raw) // 2] ^= 0x10
    (tmp_path / CHECKPOINT).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged"):
        loading.load_model(tmp_path)
    assert main(["train", "--resume", "--out-dir", str(tmp_path)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert main(["train", "--out-dir", str(tmp_path), "--max-iters", "1", *FLAGS]) == 2   # not overwritten
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / CHECKPOINT).read_bytes() == bytes(raw)


def _losses(corpus, out_dir, steps):
    result = train(train_config(out_dir=str(out_dir), data=str(corpus), max_iters=steps, eval_interval=steps,
                               log_interval=1, dropout=0.1, seed=7, **TINY), log=io.StringIO())
    return [row[1] for row in result.history["train"]], result.params


@pytest.mark.parametrize("steps", [20, pytest.param(100, marks=pytest.mark.slow)])
def test_same_seed_gives_bitwise_identical_losses(corpus, tmp_path, steps):
    losses_a, params_a = _losses(corpus, tmp_path / "a", steps)
    losses_b, params_b = _losses(corpus, tmp_path / "b", steps)
    assert len(losses_a) == steps and np.isfinite(losses_a).all()
    assert losses_a == losses_b                                            # bitwise, not approximately
    assert losses_a[-1] < losses_a[0]                                      # and it did train
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        assert np.array_equal(a, b)


# python -m manual_grad, with Python's Ctrl-C handler installed even when this process was started
# with SIGINT ignored (a background job inherits that, and Python then keeps it ignored).
_CLI_WITH_CTRL_C = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "from manual_grad.cli import main; sys.exit(main(sys.argv[1:]))")


def test_ctrl_c_saves_the_step_reached_and_resume_continues(corpus, tmp_path):
    """SIGINT to a training process (as Ctrl-C sends it) once it has logged step 3: it writes a
    checkpoint at the step reached, says how to resume and exits 130; --resume continues."""
    argv = [sys.executable, "-c", _CLI_WITH_CTRL_C, "train", "--data", str(corpus), "--out-dir", str(tmp_path),
            "--max-iters", "100000", "--eval-interval", "100000", "--log-interval", "1", *FLAGS]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        for line in proc.stderr:
            if line.startswith("step ") and "/100000" in line and int(line.split()[1].split("/")[0]) >= 3:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    message = err.strip().splitlines()[-1]
    step = load_checkpoint(tmp_path / CHECKPOINT).meta["step"]
    assert step >= 3
    assert message == (f"manual-grad: interrupted: checkpoint {tmp_path / CHECKPOINT} holds step {step}; "
                       f"continue with: manual-grad train --resume --out-dir {tmp_path}")
    params, cfg, _ = loading.load_model(tmp_path)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    assert main(["train", "--resume", "--out-dir", str(tmp_path), "--max-iters", str(step + 2)]) == 0
    assert load_checkpoint(tmp_path / CHECKPOINT).meta["step"] == step + 2
