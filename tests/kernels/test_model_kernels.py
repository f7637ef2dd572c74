"""The model with ``kernels="pallas"`` (interpreted on CPU) against autodiff, and the setting itself."""
import jax
import jax.numpy as jnp
import pytest

from manual_grad import GPTConfig, LoRAConfig, init_params, loss_fn
from manual_grad.kernels import flash_attention, linear_cross_entropy, resolve, select
from tests.kernels.test_lowering import KERNELS
from tests.test_model import ALL_TARGETS, GRID, assert_grads_match

# Configurations of the core grid (tests/test_model.py) in float32, with the Pallas cores.
CONFIGS = {
    "paper": (GPTConfig.preset("paper", kernels="pallas"), 2, 4),
    # tied, GELU, odd T = 29: two attention tiles and two token tiles, the last ones padded
    "tiny": (GPTConfig.preset("tiny", kernels="pallas"), 1, 29),
}


def grid_config(case):
    return GPTConfig(vocab_size=11, block_size=8, n_layer=case["n_layer"], n_head=case["n_head"],
                     n_embd=16, activation=case["activation"], ln_eps=case["eps"],
                     tied_embeddings=case["tied"], lm_head_bias=case["bias"] and not case["tied"],
                     bias=case["bias"], kernels="pallas",
                     lora=LoRAConfig(rank=2, alpha=4, targets=ALL_TARGETS) if case["lora"] else None)


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_fn_with_pallas_kernels_matches_autodiff(small_tiles, name):
    cfg, B, T = CONFIGS[name]
    assert_grads_match(cfg, B, T, ignore=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in GRID if c["backward"] == "lean"],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_core_grid_with_pallas_kernels_matches_autodiff(small_tiles, case):
    cfg = grid_config(case)
    assert_grads_match(cfg, case["batch"], cfg.block_size if case["full_length"] else 1, ignore=0.2)


def test_kernels_setting_is_validated_and_resolved():
    with pytest.raises(ValueError, match="kernels"):
        GPTConfig(kernels="triton")
    assert GPTConfig().kernels == "auto"
    assert [resolve("auto", b) for b in ("gpu", "cuda", "tpu")] == ["pallas"] * 3
    assert resolve("auto", "cpu") in ("cpu", "xla")           # never the Pallas interpreter on CPU
    assert resolve("pallas", "cpu") == "pallas" and resolve("xla", "gpu") == "xla"
    assert select("xla") == {"attention": None, "loss": None}
    assert select("pallas", "float64") == {"attention": None, "loss": None}    # kernels accumulate in f32
    assert select("pallas") == {"attention": flash_attention, "loss": linear_cross_entropy}


def test_auto_on_cpu_runs_no_pallas_kernel():
    """On this CPU machine ``kernels="auto"`` lowers without any Pallas kernel (the interpreter
    is for tests); ``"pallas"`` lowers all six."""
    ids = jnp.zeros((2, 8), jnp.int32)

    def lowered(kernels):
        cfg = GPTConfig.preset("tiny", kernels=kernels)
        params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
        step = jax.jit(jax.value_and_grad(lambda p, x, y: loss_fn(p, x, y, cfg)))
        return step.lower(params, ids, ids).as_text(debug_info=True)    # names kernels in locations

    auto, pallas = lowered("auto"), lowered("pallas")
    assert not any(name in auto for name in KERNELS)
    assert all(name in pallas for name in KERNELS)
