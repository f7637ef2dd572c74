"""The benchmark harness: ``--quick`` writes a complete, well-formed results.json (every
figure a positive finite number), the timing helpers interleave and summarise as stated,
the GPU-only paths (bfloat16, allocator peak in a subprocess) run at a tiny size on CPU,
and the PyTorch peer computes the same loss and gradients as our model."""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import hardware, report, run
from benchmarks.timing import ratio, summarise, time_interleaved
from tests.interop.required import reference

STATS_KEYS = {"median", "q25", "q75", "min", "max", "n"}


def _stats_ok(stats):
    assert set(stats) == STATS_KEYS
    assert all(math.isfinite(stats[k]) and stats[k] > 0 for k in STATS_KEYS)
    assert stats["min"] <= stats["q25"] <= stats["median"] <= stats["q75"] <= stats["max"]


def _walk_numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk_numbers(v, f"{path}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _walk_numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = run.main(["--quick", "--out", str(out)])
    (device_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return results, device_dir


def test_quick_writes_every_file(quick):
    results, device_dir = quick
    names = {p.name for p in device_dir.iterdir()}
    assert {"results.json", "results.md", "steps.png", "layers.png"} <= names
    with open(device_dir / "results.json") as f:
        assert json.load(f)["steps"] == json.loads(json.dumps(results["steps"]))
    text = (device_dir / "results.md").read_text()
    assert "manual / autodiff" in text and "| tiny |" in text


def test_quick_schema(quick):
    results, _ = quick
    assert {"date", "device", "versions", "command", "plan", "method", "layers", "steps",
            "wall_s"} <= set(results)
    for key in ("jax", "jaxlib", "optax"):
        assert isinstance(results["versions"][key], str)
    assert results["device"]["peak"]["flops"] > 0 and "FLOPs/cycle" in results["device"]["peak"]["formula"]
    assert {r["layer"] for r in results["layers"]} == {
        "embedding", "layernorm", "attention", "mlp", "logits_loss", "lora_linear"}
    assert [(s["preset"], s["seq_len"]) for s in results["steps"]] == [("tiny", 16), ("tiny", 32)]


def test_quick_every_figure_is_positive_and_finite(quick):
    results, _ = quick
    for path, value in _walk_numbers(results):
        assert math.isfinite(value) and value >= 0, path     # byte counts may be 0 (no temp buffer)
    for rec in results["layers"]:
        for backend in ("manual", "autodiff"):
            b = rec["backends"][backend]
            _stats_ok(b["time_s"])
            assert b["memory"]["total"] > 0 and b["compile_s"] > 0
        _stats_ok(rec["manual_over_autodiff"]["time"])
        assert rec["manual_over_autodiff"]["memory_total"] > 0
    for step in results["steps"]:
        assert step["flops_per_token"] > 0 and step["tokens_per_step"] == step["batch"] * step["seq_len"]
        timed = [n for n, b in step["backends"].items() if "time_s" in b]
        assert {"manual", "autodiff"} <= set(timed)
        for name in timed:
            b = step["backends"][name]
            _stats_ok(b["time_s"])
            assert b["tokens_per_s"] > 0 and 0 < b["mfu"] < 1
        for backend in ("manual", "autodiff"):
            assert step["backends"][backend]["memory"]["total"] > 0
        for ratios in step["ratios"].values():
            _stats_ok(ratios["time"])
        assert step["ratios"]["manual/autodiff"]["memory_total"] > 0
        # both backends start from the same loss on the same batch
        losses = [step["backends"][b]["loss_at_init"] for b in ("manual", "autodiff")]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_quick_runs_the_torch_peer(quick):
    """The eager peer runs (a peer that crashes is a failure, not a footnote) and computes our
    loss; torch.compile is absent by design under --quick, and says so."""
    results, _ = quick
    for step in results["steps"]:
        eager = step["backends"]["torch_eager"]
        assert "unavailable" not in eager, eager.get("unavailable")
        assert eager["loss_abs_diff_vs_jax"] < 1e-5
        _stats_ok(step["ratios"]["manual/torch_eager"]["time"])
        _stats_ok(step["forward_backward_ratios"]["manual/torch_eager"]["time"])
        _stats_ok(eager["forward_backward_s"])
        assert "--torch-compile" in step["backends"]["torch_compile"]["not_run"]
    assert run.peer_failures(results) == []


def test_doc_is_generated_from_results(quick, tmp_path):
    _, device_dir = quick
    doc = tmp_path / "benchmarks.md"
    report.write_doc([str(device_dir / "results.json")], str(doc))
    text = doc.read_text()
    assert "## CPU" in text and "No GPU results" in text and "steps.png" in text


@pytest.mark.slow
def test_gpu_path_bfloat16_and_peak_subprocess_at_tiny_size(tmp_path):
    """The options a GPU run uses (bfloat16, the allocator peak measured in a fresh process)
    run here; on CPU the peak is reported as unavailable, with the reason."""
    results = run.main(["--quick", "--no-layers", "--no-torch", "--no-plots", "--dtype", "bfloat16",
                        "--gpu-peak", "--seq-lens", "16", "--repeats", "1", "--tag", "bf16",
                        "--out", str(tmp_path)])
    (step,) = results["steps"]
    assert step["config"]["dtype"] == "bfloat16"
    for backend in ("manual", "autodiff"):
        peak = step["backends"][backend]["device_peak"]
        if jax.default_backend() == "cpu":
            assert "no allocator statistics" in peak["unavailable"]
        else:
            assert peak["peak_bytes"] > 0
    assert (tmp_path / (hardware.device_slug(results["device"]) + "-bf16") / "results.json").exists()


@pytest.mark.parametrize("kind, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "float32", 494.7e12), ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12), ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
    ("NVIDIA H200", "bfloat16", 989.4e12)])
def test_gpu_peak_table(kind, dtype, expected):
    assert hardware.gpu_peak_flops(kind, dtype)["flops"] == expected


def test_cpu_peak_is_cores_times_clock_times_flops_per_cycle():
    info = {"model": "x", "cores": 2, "clock_mhz": 2500.0, "isa": "avx2+fma"}
    assert hardware.cpu_peak_flops("float32", info)["flops"] == 2 * 2.5e9 * 32
    assert hardware.cpu_peak_flops("float64", info)["flops"] == 2 * 2.5e9 * 16


def test_time_interleaved_alternates_order_and_excludes_warmup():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "AB"}
    times = time_interleaved(fns, repeats=4, warmup=1, settle_below=0.0)
    assert calls == list("AB" + "AB" "BA" "AB" "BA")
    assert {k: len(v) for k, v in times.items()} == {"A": 4, "B": 4}


def test_time_interleaved_settles_short_calls_only():
    """A short contender makes an untimed call before each timed one; a long one does not."""
    calls = []
    fns = {"short": lambda: calls.append("s"), "long": lambda: (calls.append("L"), time.sleep(0.02))}
    times = time_interleaved(fns, repeats=2, warmup=1, settle_below=0.01)
    assert calls == list("sL" + "ssL" + "Lss")
    assert {k: len(v) for k, v in times.items()} == {"short": 2, "long": 2}
    assert min(times["long"]) >= 0.02 > max(times["short"])


def test_forward_backward_call_is_compiled_before_its_first_call():
    """The timed loop's warm-up call decides whether a contender gets its untimed settle call:
    a first call that compiled would make a short call look long and be timed cold."""
    cfg = run.bench_config("tiny", 8, {})
    params = run.init_params(cfg, jax.random.key(0))
    inputs, targets = run.random_batch(cfg, 2, 8, jax.random.key(1))
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        call = run.value_and_grad_call(cfg, "manual", params, inputs, targets)
        compiled_ahead = len(compiles)
        loss = call()
        assert len(compiles) == compiled_ahead >= 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    expected = run.loss_fn(params, inputs, targets, cfg, "manual")
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)


def test_summarise_and_ratio_match_numpy():
    x = np.array([3.0, 1.0, 4.0, 1.5, 9.0])
    s = summarise(x)
    assert (s["median"], s["q25"], s["q75"], s["min"], s["max"], s["n"]) == (
        np.median(x), np.percentile(x, 25), np.percentile(x, 75), 1.0, 9.0, 5)
    assert ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0])["median"] == 2.0


@pytest.mark.parametrize("items, expected", [
    (["ln_eps=1e-6"], {"ln_eps": 1e-6}), (["bias=false", "activation=relu"],
                                          {"bias": False, "activation": "relu"})])
def test_set_overrides_parse(items, expected):
    assert run.parse_overrides(items) == expected


@pytest.mark.parametrize("item", ["nonsense=1", "ln_eps"])
def test_set_overrides_reject_unknown_fields(item):
    with pytest.raises(ValueError, match="--set"):
        run.parse_overrides([item])


def test_torch_peer_matches_our_loss_and_gradients():
    torch = reference("torch", reason="the PyTorch peer is an optional extra")
    from benchmarks import torch_peer
    from manual_grad import GPTConfig, init_params, loss_fn

    cfg = GPTConfig.preset("tiny", dropout=0.0)
    params = init_params(cfg, jax.random.key(3))
    # move away from the init (zero biases, unit scales) so every parameter matters
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    inputs = jax.random.randint(jax.random.key(4), (3, 20), 0, cfg.vocab_size)
    targets = jax.random.randint(jax.random.key(5), (3, 20), 0, cfg.vocab_size).at[0, :4].set(-100)
    ours, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, cfg, "manual")
    model = torch_peer.from_params(params, cfg)
    theirs = model(torch.from_numpy(np.array(inputs)).long(), torch.from_numpy(np.array(targets)).long())
    assert abs(float(theirs.detach()) - float(ours)) <= 1e-5 * abs(float(ours))
    theirs.backward()
    np.testing.assert_allclose(model.wte.weight.grad.numpy(), np.asarray(grads["wte"]), atol=2e-6)
    np.testing.assert_allclose(model.blocks[1].attn.c_attn.weight.grad.numpy(),
                               np.asarray(grads["blocks"]["attn"]["w_qkv"][1]).T, atol=2e-6)
    np.testing.assert_allclose(model.blocks[0].mlp.c_fc.bias.grad.numpy(),
                               np.asarray(grads["blocks"]["mlp"]["b_fc"][0]), atol=2e-6)


def _peer_records(monkeypatch, *, torch_eager=True, crash=False):
    """The PyTorch peers' records for one tiny step, the peer made to crash when asked."""
    reference("torch", reason="the PyTorch peer is an optional extra")
    from benchmarks import torch_peer
    from manual_grad import GPTConfig, init_params

    if crash:
        def broken(*args, **kwargs):
            raise RuntimeError("peer exploded")
        monkeypatch.setattr(torch_peer, "from_params", broken)
    plan = run.Plan(True, "cpu", "float32", (8,), {"tiny": 2}, {"tiny": 1}, [], torch_eager, (), False, threads=1)
    cfg = GPTConfig.preset("tiny")
    inputs = jnp.zeros((2, 8), jnp.int32)
    _, records = run._torch_contenders(plan, "tiny", cfg, init_params(cfg, jax.random.key(0)), inputs, inputs,
                                       0.0, lambda *_: None)
    return {"steps": [{"preset": "tiny", "seq_len": 8, "backends": records}]}


def test_a_crashing_peer_is_a_failure_and_an_absent_one_is_not(monkeypatch):
    crashed = _peer_records(monkeypatch, crash=True)
    assert "peer exploded" in crashed["steps"][0]["backends"]["torch_eager"]["unavailable"]
    assert run.peer_failures(crashed) == ["tiny T=8: torch_eager: RuntimeError: peer exploded"]
    absent = _peer_records(monkeypatch, torch_eager=False)
    assert "not_run" in absent["steps"][0]["backends"]["torch_eager"] and run.peer_failures(absent) == []
