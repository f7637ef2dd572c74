"""Training on a device mesh (manual_grad.parallel).

Multi-device checks run ``tests/parallel_worker.py`` in a subprocess with 8 (or 4, or 1)
virtual CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), so the device
count and float64 of those runs do not leak into the rest of the suite. The rules, the
command-line setup and the checkpoint format are also checked in-process on one device.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from manual_grad import GPTConfig, init_params, loss_fn, parallel
from manual_grad.checkpoint import load_state, save_state
from manual_grad.training import OptimizerConfig, TrainConfig, make_optimizer, make_train_step
from manual_grad.training.loop import compile_step
from tests.parallel_worker import CONFIG, init_state

ROOT = Path(__file__).resolve().parent.parent
# Same partitioner, cheaper LLVM code generation: the worker's runs are compile-bound.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
RTOL = {"float64": 1e-12, "float32": 1e-5}


def run_worker(*args: str, devices: int = 8, env: dict | None = None, timeout: int = 900,
               wait: bool = True):
    """Runs the worker with ``devices`` virtual CPU devices; its RESULT json (or the process)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
           **(env or {})}
    command = [sys.executable, "-m", "tests.parallel_worker", *args]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return worker_result(proc.returncode, proc.stdout, proc.stderr)


def worker_result(returncode: int, stdout: str, stderr: str) -> dict:
    assert returncode == 0, f"worker failed ({returncode}):\n{stderr[-6000:]}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"worker printed no RESULT:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_same_step(results: dict, fields=("loss", "metrics", "params", "opt_state")):
    """Every layout's step within the dtype's tolerance of the single-device step."""
    for case, r in results.items():
        dtype = case.split("/")[0]
        assert r["dtype"] == dtype, case
        for field in fields:
            err = r[field] if field == "loss" else r[field][0]
            where = "" if field == "loss" else f" at {r[field][1]}"
            assert err <= RTOL[dtype], f"{case}: {field} differs by {err:.3g}{where}"
        if ":fsdp" in case:   # the state really was split, not silently replicated
            assert any("'data'" in spec for spec in r["specs"]), (case, r["specs"])


# --- acceptance 1: one sharded step == the single-device step -----------------------------

@pytest.mark.parametrize("backend", ["manual", "autodiff"])
def test_sharded_step_matches_single_device(backend):
    """Data parallel and FSDP on 8 devices: loss, updates (new - old parameters, as the
    optimizer returns them), new parameters and optimizer state of one SGD-with-momentum step
    (its update is linear in the gradient) equal the one-device step's, float64 <= 1e-12 and
    float32 <= 1e-5 relative, per array."""
    results = run_worker("equivalence", "--backend", backend, "--optimizer", "sgd",
                         "--dtypes", "float64", "float32",
                         "--layouts", "data=8:replicated", "data=8:fsdp")
    assert len(results) == 4
    assert_same_step(results)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["manual", "autodiff"])
def test_adamw_step_matches_single_device(backend):
    """AdamW: same loss and moments (hence gradients) in both dtypes, and same updates and
    parameters in float64. Adam's first update is g / (|g| + eps): it turns the rounding of a
    gradient that is zero in exact arithmetic (the key bias's: softmax ignores a constant
    added to all keys) into update differences of ~1e-4 relative in float32: on one device,
    averaging the gradients of two half batches instead of one whole batch already does that
    (1.1e-4 on b_qkv with the autodiff backend). So float32 is judged by the moments, which
    agree to ~5e-7."""
    results = run_worker("equivalence", "--backend", backend, "--optimizer", "adamw",
                         "--dtypes", "float64", "float32",
                         "--layouts", "data=8:replicated", "data=8:fsdp")
    assert_same_step({k: v for k, v in results.items() if k.startswith("float64")})
    assert_same_step({k: v for k, v in results.items() if k.startswith("float32")},
                     fields=("loss", "opt_state"))


def test_project_train_step_on_the_mesh():
    """manual_grad.training.make_train_step (clipping, AdamW, schedule) in float32, the training
    dtype, on 8 devices in FSDP: same loss, gradient norm and moments as on one device (the
    parameters' update, Adam's conditioning aside, is an elementwise function of those)."""
    results = run_worker("equivalence", "--backend", "manual", "--optimizer", "train",
                         "--dtypes", "float32", "--layouts", "data=8:fsdp")
    assert len(results) == 1
    assert_same_step(results, fields=("loss", "metrics", "opt_state"))


@pytest.mark.slow
def test_paper_backward_step_matches_single_device():
    """The manual backend's other backward variant ("paper": saved probabilities and logits,
    no chunking) on 8 devices, data parallel and FSDP."""
    results = run_worker("equivalence", "--backend", "manual", "--backward", "paper",
                         "--optimizer", "sgd", "--dtypes", "float64", "float32",
                         "--layouts", "data=8:replicated", "data=8:fsdp")
    assert_same_step(results)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["manual", "autodiff"])
def test_tensor_parallel_and_dropout_steps_match_single_device(backend):
    """Tensor parallelism over a model axis (alone and with FSDP) and a step with dropout
    (the random bits do not depend on the sharding) give the one-device step."""
    results = run_worker("equivalence", "--backend", backend, "--optimizer", "sgd",
                         "--dropout", "0.1", "--dtypes", "float64", "float32",
                         "--layouts", "data=4,model=2:replicated", "data=4,model=2:fsdp", "data=8:fsdp")
    assert_same_step(results)
    for case, r in results.items():
        if "model=2" in case:
            assert any("'model'" in spec for spec in r["specs"]), (case, r["specs"])


# --- acceptance 2: collectives and per-device memory -------------------------------------

def test_compiled_collectives_and_fsdp_memory():
    """Data parallel all-reduces every gradient and reduces nothing to shards; FSDP gathers
    every parameter and reduces every gradient, and each device's arguments hold ~1/8 of the
    AdamW state. Every array is split here (min_size=0): the LayerNorms and biases the
    default leaves whole are 4% of this tiny model (a 6x drop instead of 8x) but 0.001% of
    GPT-2 small. (Byte counts are of the collectives' results in the compiled HLO.)"""
    r = run_worker("compiled", "--mesh", "data=8", "--min-size", "0")
    n = r["devices"]
    assert n == 8
    rep, fsdp = r["replicated"], r["fsdp"]
    rep_c, fsdp_c = rep["collectives"], fsdp["collectives"]
    assert rep_c["all-reduce"]["bytes"] >= r["param_bytes"], rep_c      # the whole gradient
    assert rep_c["reduce-scatter"]["count"] == 0, rep_c
    assert fsdp_c["all-gather"]["bytes"] >= r["param_bytes"], fsdp_c     # every parameter, whole
    reduced = fsdp_c["all-reduce"]["bytes"] + fsdp_c["reduce-scatter"]["bytes"] * n
    assert reduced >= r["param_bytes"], fsdp_c                           # every gradient
    # replicated: the whole state on every device; FSDP: the shards measured on the arrays
    assert rep["state_bytes_on_device"] == r["state_bytes"]
    assert fsdp["state_bytes_on_device"] <= r["state_bytes"] / (0.8 * n)
    for mode in (rep, fsdp):   # what XLA reports = the state's share + a small batch and key
        assert 0 <= mode["argument_bytes"] - mode["state_bytes_on_device"] <= 4096, mode
    assert rep["argument_bytes"] / fsdp["argument_bytes"] >= 0.75 * n, (rep, fsdp)
    assert "not divisible" in r["indivisible_batch_error"]


# --- acceptance 3: checkpoints move between mesh shapes ----------------------------------

def test_checkpoint_from_4_devices_resumes_on_1_and_8(tmp_path):
    """Saved from an FSDP state on 4 devices; restored on 8 devices (FSDP) and on a single
    device without a mesh: the same arrays (checksum), step and next-step loss."""
    path = str(tmp_path / "state.mgc")
    saved = run_worker("save", "--mesh", "data=4", "--path", path, devices=4)
    assert saved["devices"] == 4 and os.path.exists(path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.mgc"]   # no temporary file left
    for mesh, devices in (("data=8", 8), ("none", 1)):
        resumed = run_worker("resume", "--mesh", mesh, "--path", path, devices=devices)
        assert resumed["devices"] == resumed["state_on_devices"] == devices
        assert resumed["step"] == 1
        assert resumed["checksum"] == saved["checksum"]
        assert abs(resumed["next_loss"] - saved["next_loss"]) <= RTOL["float32"] * abs(saved["next_loss"])


# --- ring attention: the time axis split over a seq axis ---------------------------------

def assert_ring_step(result: dict, spec: str, T: int = 48):
    """float64 loss and every gradient within 1e-12 of one device; the ring's
    collective-permutes are in the compiled step and no all-gather has a time axis of length
    T (K/V stay split; a tensor-parallel mesh gathers the (3C,) qkv bias, a parameter)."""
    r = result[spec]
    assert r["loss"] <= RTOL["float64"], (spec, r["loss"])
    assert r["grads"][0] <= RTOL["float64"], (spec, r["grads"])
    assert r["collectives"]["collective-permute"]["count"] > 0, (spec, r["collectives"])
    dims = [[int(d) for d in shape.split("[")[1].split("]")[0].split(",") if d] for shape in r["all_gather_shapes"]]
    assert not any(T in shape for shape in dims), (spec, r["all_gather_shapes"])


def test_ring_attention_step_matches_single_device():
    """data=2,seq=4, causal, ignored targets (a quarter of one row): loss and gradients of the
    split model equal one device's; a T the causal ring cannot split raises a ValueError
    naming inputs."""
    result = run_worker("ring", "--meshes", "data=2,seq=4")
    assert_ring_step(result, "data=2,seq=4")
    assert result["data=2,seq=4"]["all_gather_shapes"] == []
    assert result["odd_error"].startswith("inputs: T=20 must be divisible by 8"), result["odd_error"]


@pytest.mark.slow
def test_ring_attention_op_and_other_meshes():
    """The op on a ring of 8 against its twin and plain attention (causal and not); the model
    on data=1,seq=8 and data=2,seq=2,model=2 (tensor parallel heads), logits too."""
    result = run_worker("ring", "--op", "--meshes", "data=1,seq=8", "data=2,seq=2,model=2", "--forward")
    for case, errors in result["op"].items():
        assert max(errors.values()) <= RTOL["float64"], (case, errors)
    for spec in ("data=1,seq=8", "data=2,seq=2,model=2"):
        assert_ring_step(result, spec)
        assert result[spec]["logits"] <= RTOL["float64"], (spec, result[spec]["logits"])


@pytest.mark.slow
def test_ring_attention_without_mask_on_odd_shards():
    """Non-causal: T=24 over seq=8 gives 3 (odd) positions per device; still exact."""
    result = run_worker("ring", "--causal", "0", "--T", "24", "--meshes", "data=1,seq=8")
    assert_ring_step(result, "data=1,seq=8", T=24)


@pytest.mark.slow
def test_ring_attention_memory_falls_with_seq():
    """Per-device temporary memory of value-and-grad at T=2048 (compiled.memory_analysis)
    falls roughly as 1/seq: each doubling of seq at least 1.6x less."""
    temp = run_worker("ring_memory", "--T", "2048", "--seqs", "1", "2", "4", "8")
    for small, big in ((1, 2), (2, 4), (4, 8)):
        assert temp[str(small)] >= 1.6 * temp[str(big)], temp


@pytest.mark.slow
def test_checkpoint_from_ring_mesh_resumes_on_8_and_1(tmp_path):
    """Saved after a step on data=2,seq=4 (ring attention); the next-step loss is the same on
    data=8 (no seq axis) and on one device."""
    path = str(tmp_path / "state.mgc")
    saved = run_worker("save", "--mesh", "data=2,seq=4", "--path", path)
    for mesh, devices in (("data=8", 8), ("none", 1)):
        resumed = run_worker("resume", "--mesh", mesh, "--path", path, devices=devices)
        assert resumed["step"] == 1 and resumed["checksum"] == saved["checksum"]
        assert abs(resumed["next_loss"] - saved["next_loss"]) <= RTOL["float32"] * abs(saved["next_loss"])


# --- several processes -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_fsdp_step_and_write_one_checkpoint(tmp_path):
    """Two processes of 4 CPU devices each, joined by jax.distributed through the JAX_*
    environment variables, feed their own halves of the batch to one FSDP step on the global
    8-device mesh: the step equals the whole batch's step on one device (and the step fed the
    whole batch on every process, process_local=False), and the checkpoint (gathered across
    processes, written by process 0) loads on one device."""
    path = tmp_path / "state.mgc"
    address = f"127.0.0.1:{_free_port()}"
    procs = [run_worker("multihost", "--mesh", "data=8", "--path", str(path), devices=4, wait=False,
                        env={"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
                             "JAX_PROCESS_ID": str(rank)})
             for rank in range(2)]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(worker_result(proc.returncode, stdout, stderr))
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert r["started"] and r["processes"] == 2 and r["local_devices"] == 4 and r["devices"] == 8
        assert r["loss"] <= RTOL["float32"], r
        assert r["update"][0] <= RTOL["float32"], r
        assert r["whole_batch_same"], "process_local=False must give the same global batch"
    assert [p.name for p in tmp_path.iterdir()] == ["state.mgc"]
    cfg = GPTConfig(**CONFIG)
    like = jax.eval_shape(lambda: init_state(cfg, optax.sgd(0.1, momentum=0.9)))
    assert int(load_state(path, like)["step"]) == 1


# --- in-process: rules, flags, format ----------------------------------------------------

@pytest.mark.parametrize("spec, axes", [
    ("data=8", {"data": 8}),
    ("data=4,model=2", {"data": 4, "model": 2}),
    ("data=2,seq=2,model=2", {"data": 2, "seq": 2, "model": 2}),
    (" data = -1 , model=2 ", {"data": -1, "model": 2}),
])
def test_parse_mesh_spec(spec, axes):
    assert parallel.parse_mesh_spec(spec) == axes


@pytest.mark.parametrize("spec", ["", "data", "data=0", "data=x", "model=2", "data=2,data=2",
                                  "data=-1,model=-1", "pipe=2,data=2", "data=-3"])
def test_parse_mesh_spec_rejects(spec):
    with pytest.raises(ValueError, match="mesh"):
        parallel.parse_mesh_spec(spec)


def test_make_mesh_checks_device_count():
    n = len(jax.devices())
    mesh = parallel.make_mesh("data=-1")
    assert dict(mesh.shape) == {"data": n}
    with pytest.raises(ValueError, match="mesh"):
        parallel.make_mesh(f"data={n + 1}")


MESH_8 = AbstractMesh((8,), ("data",))
MESH_4x2 = AbstractMesh((4, 2), ("data", "model"))


@pytest.mark.parametrize("shape, mesh, mode, name, expected", [
    ((2, 32, 96), MESH_8, "replicated", "w_qkv", P(None, None, None)),
    ((2, 32, 96), MESH_8, "fsdp", "w_qkv", P(None, None, "data")),     # the largest dimension
    ((64, 64), MESH_8, "fsdp", "wte", P(None, "data")),                # ties: the later one
    ((50257, 768), MESH_8, "fsdp", "wte", P(None, "data")),            # 50257 does not divide
    ((50257, 770), MESH_8, "fsdp", "wte", P(None, None)),              # nothing divides
    ((2, 32), MESH_8, "fsdp", "scale", P(None, None)),                 # too small to split
    ((), MESH_8, "fsdp", "count", P()),
    ((2, 32, 96), MESH_4x2, "replicated", "w_qkv", P(None, None, "model")),   # column parallel
    ((2, 32, 96), MESH_4x2, "fsdp", "w_qkv", P(None, "data", "model")),
    ((2, 128, 32), MESH_4x2, "fsdp", "w_proj", P(None, "model", "data")),     # row parallel
    ((64, 32), MESH_4x2, "replicated", "wte", P(None, None)),          # no tensor-parallel rule
])
def test_partition_spec(shape, mesh, mode, name, expected):
    assert parallel.partition_spec(shape, mesh, mode, name=name) == expected


def test_partition_spec_rejects_mode():
    with pytest.raises(ValueError, match="mode"):
        parallel.partition_spec((8,), MESH_8, "zero")


def test_optimizer_moments_follow_their_parameters():
    """FSDP shards Adam's mu and nu exactly like the parameter each shadows."""
    cfg = GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=4, n_embd=32)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    specs = jax.tree.map(lambda s: s.spec, parallel.state_shardings(
        {"params": params, "opt_state": opt_state}, MESH_8, "fsdp"))
    assert specs["params"]["blocks"]["mlp"]["w_fc"] == P(None, None, "data")
    for moment in (specs["opt_state"][0].mu, specs["opt_state"][0].nu):
        assert moment == specs["params"]
    assert specs["opt_state"][0].count == P()


def test_trainer_compiles_the_step_on_the_mesh():
    """The trainer's path (--mesh data=-1 --shard fsdp): mesh, sharded state and batch, the
    shared step jitted on them (here on the devices this process has, usually one)."""
    cfg = GPTConfig(vocab_size=16, block_size=4, n_layer=1, n_head=2, n_embd=8)
    n = len(jax.devices())
    tc = TrainConfig(mesh="data=-1", shard="fsdp", batch_size=2 * n, optim=OptimizerConfig(warmup_iters=0))
    run = types.SimpleNamespace(tc=tc, cfg=cfg, base=None)
    opt = make_optimizer(tc.optim)
    state = init_state(cfg, opt)
    batch = (np.ones((2 * n, 4), int), np.zeros((2 * n, 4), int))
    expected_state, expected = make_train_step(cfg, opt)(state, jax.tree.map(jnp.asarray, batch), None)
    sharded_state, sharded_step, put_batch = compile_step(run, state)
    new_state, metrics = sharded_step(sharded_state, put_batch(batch), jax.random.key(0))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert int(new_state["step"]) == 1
    np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(expected_state["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_frozen_tree_is_an_argument_not_a_constant():
    """jit_sharded_step(frozen=...): the step reads a frozen pytree passed as an argument (a
    LoRA base), gets the same result as closing over it, and its HLO holds no copy of it."""
    mesh = parallel.make_mesh("data=-1")
    frozen = {"w": jnp.arange(4096.0).reshape(64, 64) / 4096}
    state = {"v": jnp.ones((64,)), "step": jnp.int32(0)}

    def step(frozen, state, batch, key):
        v = state["v"] - 0.1 * (batch @ frozen["w"]).mean(0)
        return {"v": v, "step": state["step"] + 1}, {"norm": jnp.linalg.norm(v)}

    n = mesh.shape["data"]
    batch = parallel.shard_batch(np.ones((2 * n, 64), np.float32), mesh)
    shardings = parallel.state_shardings(state, mesh)
    sharded = parallel.jit_sharded_step(step, shardings, mesh, frozen=frozen, donate=False)
    new_state, metrics = sharded(parallel.shard_state(state, shardings), batch, None)
    expected_state, expected = jax.jit(lambda s, b: step(frozen, s, b, None))(state, batch)
    np.testing.assert_allclose(new_state["v"], expected_state["v"], rtol=1e-6)
    assert int(new_state["step"]) == 1
    program = sharded.lower(parallel.shard_state(state, shardings), batch, None).as_text()
    closed = jax.jit(lambda s, b: step(frozen, s, b, None)).lower(state, batch).as_text()
    main = next(line for line in program.splitlines() if "func.func public @main" in line)
    assert "tensor<64x64xf32>" in main                           # an argument of main
    assert 'dense<"0x' in closed and 'dense<"0x' not in program  # closing over bakes it in


def test_save_load_round_trip_and_mismatch(tmp_path):
    cfg = GPTConfig(vocab_size=16, block_size=4, n_layer=1, n_head=2, n_embd=8)
    opt = optax.adamw(1e-3)
    state = init_state(cfg, opt)
    path = tmp_path / "sub" / "state.mgc"
    save_state(path, state=state)
    save_state(path, state=state)   # overwriting is atomic too
    assert [p.name for p in path.parent.iterdir()] == ["state.mgc"]
    like = jax.eval_shape(lambda: init_state(cfg, opt))
    mesh = parallel.make_mesh("data=-1")
    loaded = load_state(path, like, parallel.state_shardings(like, mesh, "fsdp"))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    other = jax.eval_shape(lambda: init_state(cfg.replace(n_embd=16), opt))
    with pytest.raises(ValueError, match="shape"):
        load_state(path, other)
    with pytest.raises(ValueError, match="unexpected entries"):
        load_state(path, {"params": like["params"]})


def test_initialize_distributed_reads_flags_and_environment(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is False   # single process: nothing started
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError, match="num_processes, process_id"):
        parallel.initialize_distributed()
    with pytest.raises(ValueError, match="process_id <"):
        parallel.initialize_distributed(num_processes=2, process_id=2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        parallel.initialize_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["replicated", "fsdp"])
def test_train_command_on_a_mesh_matches_one_device(tmp_path, shard):
    """``manual-grad train --mesh data=4 --shard ...`` logs the losses of the one-device run."""
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(97 + (i * 7 + i // 5) % 26) + (" " if i % 9 == 0 else "") for i in range(6000)))
    losses = {}
    for name, extra, devices in (("one", [], 1), ("mesh", ["--mesh", "data=4", "--shard", shard], 4)):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "manual_grad", "train", "--data", str(text), "--out-dir", str(out),
                        "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "2", "--batch-size", "8",
                        "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
                        "--log-interval", "1", "--sample-tokens", "0", *extra],
                       env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
        losses[name] = [e["val"] for e in json.loads((out / "metrics.json").read_text())["eval"]]
    np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=1e-5)
