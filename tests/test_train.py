"""The optimizer, the train step, exact resume and LoRA fine-tuning (manual_grad.training)."""
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manual_grad import GPTConfig, LoRAConfig, init_params, loss_fn
from manual_grad.checkpoint import load_checkpoint, verify_checkpoint
from manual_grad.loading import CHECKPOINT, LORA_CHECKPOINT, load_model
from manual_grad.training import OptimizerConfig, decay_mask, make_optimizer, make_schedule, make_train_step, train
from tests.helpers import train_config

WORDS_A = "the cat sat on a mat and the dog ate a big red fox by the old barn".split()
WORDS_B = "quick jumps over lazy wizards vex home pig zebra".split()


def _text(words, n_lines, seed):
    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(words, size=6)) + ".\n" for _ in range(n_lines))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpora")
    a = folder / "a.txt"
    a.write_text("abcdefghijklmnopqrstuvwxyz.\n" + _text(WORDS_A, 300, 0))      # every character B uses
    b = folder / "b.txt"
    b.write_text(_text(WORDS_B, 300, 1))
    return a, b


TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=8, learning_rate=1e-2, min_lr=1e-3,
            warmup_iters=2, eval_interval=10, eval_iters=2, log_interval=1, sample_tokens=0)


FINETUNE = {k: v for k, v in TINY.items() if k not in ("n_layer", "n_head", "n_embd")}   # the base fixes those


def test_schedule_is_nanogpts_get_lr():
    tc = OptimizerConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=80)

    def get_lr(it):   # nanoGPT's train.py
        if it < tc.warmup_iters:
            return tc.learning_rate * (it + 1) / (tc.warmup_iters + 1)
        if it > tc.lr_decay_iters:
            return tc.min_lr
        ratio = (it - tc.warmup_iters) / (tc.lr_decay_iters - tc.warmup_iters)
        return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.learning_rate - tc.min_lr)

    schedule = jax.jit(jax.vmap(make_schedule(tc)))
    steps = np.arange(100)
    np.testing.assert_allclose(schedule(steps), [get_lr(int(s)) for s in steps], rtol=1e-6)


def test_weight_decay_only_on_matrices():
    params = jax.eval_shape(lambda: init_params(
        GPTConfig.preset("tiny", tied_embeddings=False, lm_head_bias=True, lora=LoRAConfig(2, targets=("q", "fc"))),
        jax.random.key(0)))
    mask = decay_mask(params)
    decayed = {"/".join(str(k.key) for k in path) for path, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}
    assert decayed == {"wte", "wpe", "blocks/attn/w_qkv", "blocks/attn/w_o", "blocks/mlp/w_fc", "blocks/mlp/w_proj",
                       "lm_head/w", "lora/blocks/attn/q/a", "lora/blocks/attn/q/b", "lora/blocks/mlp/fc/a",
                       "lora/blocks/mlp/fc/b"}

    # with zero gradients AdamW's update is the decay alone: w <- w (1 - lr wd), biases stay
    tc = OptimizerConfig(learning_rate=0.5, warmup_iters=0, weight_decay=0.1, lr_decay_iters=10)
    tree = {"blocks": {"w_o": jnp.ones((2, 3, 3)), "b_o": jnp.ones((2, 3))}, "wte": jnp.ones((4, 3)),
            "ln_f": {"scale": jnp.ones(3)}}
    opt = make_optimizer(tc)

    @jax.jit
    def one_step(tree):
        updates, _ = opt.update(jax.tree.map(jnp.zeros_like, tree), opt.init(tree), tree)
        return jax.tree.map(jnp.add, tree, updates)
    after = one_step(tree)
    np.testing.assert_allclose(after["blocks"]["w_o"], 1 - 0.5 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(after["wte"], 1 - 0.5 * 0.1, rtol=1e-6)
    assert np.array_equal(after["blocks"]["b_o"], tree["blocks"]["b_o"])
    assert np.array_equal(after["ln_f"]["scale"], tree["ln_f"]["scale"])


@pytest.mark.slow
def test_manual_and_autodiff_steps_agree():
    cfg = GPTConfig.preset("tiny", n_layer=2, n_embd=32, block_size=16)
    tc = OptimizerConfig(learning_rate=1e-2, warmup_iters=0, lr_decay_iters=500)
    opt = make_optimizer(tc)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    state = {"params": params, "opt_state": jax.jit(opt.init)(params), "step": jnp.int32(0)}
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, cfg.vocab_size)
    batch = (tokens[:, :-1], tokens[:, 1:])
    results = {b: make_train_step(cfg, opt, b)(state, batch, jax.random.key(2)) for b in ("manual", "autodiff")}
    (s_m, m_m), (s_a, m_a) = results["manual"], results["autodiff"]
    np.testing.assert_allclose(m_m["loss"], m_a["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_m["grad_norm"], m_a["grad_norm"], rtol=1e-5)
    # Adam's first step is about lr * sign(g); the key bias's gradient is exactly 0 in the manual
    # backward and rounding noise in autodiff, which Adam turns into ~1e-6 moves: hence atol.
    for a, b in zip(jax.tree.leaves(s_m["params"]), jax.tree.leaves(s_a["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert int(s_m["step"]) == 1


def test_train_step_traces_once_across_steps_and_a_checkpoint_round_trip(tmp_path):
    """The state a step returns, and the state a checkpoint restores, have the signature of the
    first state: the jitted step never retraces (chex.assert_max_traces fails on a second trace)."""
    chex = pytest.importorskip("chex")

    from manual_grad.checkpoint import save_state
    from manual_grad.training import init_state, train_step
    cfg = GPTConfig.preset("tiny", n_layer=1, n_embd=16, n_head=2, block_size=8, dropout=0.1)
    opt = make_optimizer(OptimizerConfig(lr_decay_iters=10))
    def one_step(state, batch, key):
        return train_step(state, batch, key, cfg=cfg, optimizer=opt, backend="manual")
    step = jax.jit(chex.assert_max_traces(one_step, n=1))
    state = init_state(jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)), opt)
    tokens = jax.random.randint(jax.random.key(1), (3, 4, 9), 0, cfg.vocab_size)
    for i in range(3):
        state, _ = step(state, (tokens[i, :, :-1], tokens[i, :, 1:]), jax.random.fold_in(jax.random.key(2), i))
    save_state(tmp_path / "state.mgc", state=state)
    restored = load_checkpoint(tmp_path / "state.mgc").restore("state", state)
    restored, _ = step(restored, (tokens[0, :, :-1], tokens[0, :, 1:]), jax.random.key(3))
    assert int(restored["step"]) == 4


@pytest.fixture(scope="module")
def straight(corpora, tmp_path_factory):
    """20 steps in one go, with dropout so the per-step keys matter too."""
    out = tmp_path_factory.mktemp("straight")
    return train(train_config(out_dir=str(out), data=str(corpora[0]), max_iters=20, dropout=0.1, **TINY),
                 log=io.StringIO())


def test_resume_is_exact(corpora, straight, tmp_path):
    common = dict(out_dir=str(tmp_path), data=str(corpora[0]), lr_decay_iters=20, dropout=0.1, **TINY)
    train(train_config(max_iters=10, **common), log=io.StringIO())
    resumed = train(train_config(max_iters=20, resume=True, **common), log=io.StringIO())
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        assert np.array_equal(a, b)                                                   # bitwise
    assert resumed.history["train"] == straight.history["train"]                      # every step's loss
    assert resumed.final_val_loss == straight.final_val_loss
    assert load_checkpoint(tmp_path / CHECKPOINT).meta["data_position"] == {"seed": 1337, "step": 20}


def test_training_lowers_the_loss_and_writes_outputs(straight):
    evals = straight.history["eval"]
    assert [e["step"] for e in evals] == [0, 10, 20]
    assert evals[-1]["val"] < evals[0]["val"] - 0.5
    for name in (CHECKPOINT, "metrics.json", "metrics.csv", "loss.png"):
        assert (straight.out_dir / name).stat().st_size > 0
    params, cfg, tokenizer = load_model(straight.out_dir)
    assert cfg == straight.cfg and tokenizer.vocab_size == cfg.vocab_size
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(straight.params)):
        assert np.array_equal(a, b)


def test_lora_finetune_lowers_new_text_loss_and_merges(corpora, straight, tmp_path):
    base_ckpt = straight.out_dir / CHECKPOINT
    base_digest = verify_checkpoint(base_ckpt)
    log = io.StringIO()
    rank, targets = 4, ("q", "v", "fc")
    result = train(train_config(out_dir=str(tmp_path), data=str(corpora[1]), init_from=str(straight.out_dir),
                                max_iters=30, lora_rank=rank, lora_alpha=8.0, lora_targets=targets, merge=True,
                                **{**FINETUNE, "eval_interval": 30}), log=log)
    evals = result.history["eval"]
    assert evals[-1]["val"] < evals[0]["val"] - 0.3                      # the new text's val loss went down

    C, F, L = straight.cfg.n_embd, straight.cfg.mlp_width, straight.cfg.n_layer
    trainable = L * rank * ((C + C) + (C + C) + (C + F))                 # q, v: C -> C; fc: C -> F
    assert f"{trainable:,} trainable parameters" in log.getvalue()
    assert verify_checkpoint(base_ckpt) == base_digest                    # the base is untouched

    adapters = load_checkpoint(tmp_path / LORA_CHECKPOINT)
    assert sum(v.size for v in adapters.flat("params").values()) == trainable
    opt_shapes = {v.shape for v in adapters.flat("opt_state").values() if v.ndim}
    assert opt_shapes <= {v.shape for v in adapters.flat("params").values()}   # no optimizer state for the base

    merged, merged_cfg, _ = load_model(tmp_path / CHECKPOINT)
    with_adapters, lora_cfg, _ = load_model(tmp_path / LORA_CHECKPOINT)
    assert merged_cfg.lora is None and lora_cfg.lora is not None and "lora" not in merged
    tokens = jnp.asarray(result.tokenizer.encode(corpora[1].read_text()[:17 * 4]).reshape(4, 17))
    loss_merged = loss_fn(merged, tokens[:, :-1], tokens[:, 1:], merged_cfg)
    loss_lora = loss_fn(with_adapters, tokens[:, :-1], tokens[:, 1:], lora_cfg)
    np.testing.assert_allclose(loss_merged, loss_lora, rtol=1e-5)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_progress_line_fits_the_terminal_and_says_lr_rate_elapsed_eta(tty, monkeypatch):
    from manual_grad.training import Progress
    monkeypatch.setenv("COLUMNS", "50")
    stream = _Terminal() if tty else io.StringIO()
    progress = Progress(200, stream)
    progress.status("compiling the train step")
    progress.update(10, 2.5, 3e-4, tokens=0, seconds=0.0, steps=0)             # the first step: not timed
    progress.update(20, 2.25, 6e-4, tokens=4000, seconds=2.0, steps=10)        # 2,000 tok/s, 0.2 s a step
    progress.message("step 20: train loss 2.2500, val loss 2.3000")
    text = stream.getvalue()
    if tty:                                     # redrawn in place: every redraw within 49 columns
        redraws = [part.split("\033[K")[0] for part in text.split("\r")[1:]]
        assert all(len(r) <= 49 for r in redraws[:-1]) and redraws[0].startswith("compiling the train step")
        assert text.endswith("\rstep 20: train loss 2.2500, val loss 2.3000\033[K\n")   # a message stays whole
        return
    lines = text.splitlines()                  # not a terminal: one whole line per update
    assert lines[0] == "compiling the train step ..." and len(lines) == 4
    assert "lr 3.00e-04 | - tok/s" in lines[1] and lines[1].endswith("ETA -")
    assert "loss 2.2500 | lr 6.00e-04 | 2,000 tok/s |" in lines[2]
    assert lines[2].endswith("ETA 0:36") and " elapsed, " in lines[2]          # 180 steps left x 0.2 s


def test_memory_check_compares_what_the_step_allocates_with_what_is_available(monkeypatch):
    """temp + output (the arguments are in memory already) against the available memory."""
    from manual_grad.training import memory
    GiB = 2**30

    class Stats:
        temp_size_in_bytes, argument_size_in_bytes, output_size_in_bytes, alias_size_in_bytes = 6 * GiB, 2 * GiB, 2 * GiB, 0

    class Compiled:
        def memory_analysis(self):
            return Stats

    monkeypatch.setattr(memory, "device_memory", lambda device=None: (16 * GiB, 8 * GiB, "this machine's memory"))
    assert memory.check_fits(Compiled())["total"] == 10 * GiB                 # 8 GiB to allocate, 8 available
    monkeypatch.setattr(memory, "device_memory", lambda device=None: (16 * GiB, 7.9 * GiB, "this machine's memory"))
    with pytest.raises(ValueError, match=r"needs about 10\.0 GiB .* this machine's memory is 16\.0 GiB "
                                         r"\(7\.9 GiB available\): lower --block-size"):
        memory.check_fits(Compiled())
    monkeypatch.undo()
    total, available, _ = memory.device_memory()                               # this machine, as read
    assert 0 < available <= total
