"""Checksummed, atomic checkpoints (manual_grad.checkpoint)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from manual_grad import GPTConfig, init_params
from manual_grad.checkpoint import (CheckpointError, load_checkpoint, restore_like, save_checkpoint,
                                    verify_checkpoint)


@pytest.fixture(scope="module")
def trained():
    """Tiny params and an AdamW state after two updates (non-trivial mu, nu, count)."""
    cfg = GPTConfig.preset("tiny", n_layer=1, n_embd=16)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))

    @jax.jit
    def make():
        params = init_params(cfg, jax.random.key(0))
        state = opt.init(params)
        for i in range(2):
            grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), params)
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, state
    params, state = make()
    return params, opt, state


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bitwise(tmp_path, trained):
    params, opt, opt_state = trained
    path = tmp_path / "ckpt.mgc"
    digest = save_checkpoint(path, {"step": 2, "note": "ok"}, params=params, opt_state=opt_state,
                             rng={"root": jax.random.key(5)})
    ckpt = load_checkpoint(path)
    assert ckpt.sha256 == digest == verify_checkpoint(path)
    assert ckpt.meta["step"] == 2 and ckpt.meta["note"] == "ok"
    _assert_trees_equal(ckpt.tree("params"), params)
    restored = restore_like(jax.eval_shape(opt.init, params), ckpt.flat("opt_state"))   # NamedTuples from a fresh template
    _assert_trees_equal(restored, opt_state)
    key = jax.random.wrap_key_data(jnp.asarray(ckpt.array("rng/root")))
    assert np.array_equal(jax.random.normal(key, (3,)), jax.random.normal(jax.random.key(5), (3,)))
    assert os.listdir(tmp_path) == ["ckpt.mgc"]                          # no temporary file left


def test_bfloat16_round_trip(tmp_path):
    tree = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) / 3}
    save_checkpoint(tmp_path / "c.mgc", {}, params=tree)
    _assert_trees_equal(load_checkpoint(tmp_path / "c.mgc").tree("params"), tree)


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "missing"])
def test_damaged_checkpoints_are_refused(tmp_path, trained, damage):
    path = tmp_path / "ckpt.mgc"
    save_checkpoint(path, {}, params=trained[0])
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 1
        path.write_bytes(raw)
    elif damage == "truncate":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "foreign":
        path.write_bytes(b"PK\x03\x04 not ours")
    else:
        path.unlink()
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        verify_checkpoint(path)


def test_failed_write_keeps_the_old_checkpoint(tmp_path, trained, monkeypatch):
    path = tmp_path / "ckpt.mgc"
    save_checkpoint(path, {"v": 1}, params=trained[0])
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"v": 2}, params=trained[0])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.mgc"]


def test_restore_like_rejects_another_config(tmp_path, trained):
    params = trained[0]
    save_checkpoint(tmp_path / "c.mgc", {}, params=params)
    other = jax.eval_shape(lambda: init_params(GPTConfig.preset("tiny", n_layer=1, n_embd=32), jax.random.key(0)))
    with pytest.raises(CheckpointError, match="another config"):
        restore_like(other, load_checkpoint(tmp_path / "c.mgc").flat("params"))
    fewer = {k: v for k, v in params.items() if k != "wpe"}
    with pytest.raises(CheckpointError, match="unexpected entries"):
        restore_like(fewer, load_checkpoint(tmp_path / "c.mgc").flat("params"))
