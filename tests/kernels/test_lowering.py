"""The whole train step with ``kernels="pallas"`` lowers for CUDA GPUs (Triton) and TPUs (Mosaic)
on this CPU-only machine. Lowering runs every Pallas lowering rule of every kernel; compiling
the Triton IR to PTX and running Mosaic's layout passes needs the device, and is not done here."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from manual_grad import GPTConfig, init_params, loss_fn

KERNELS = ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv",
           "linear_cross_entropy_fwd", "linear_cross_entropy_dx", "linear_cross_entropy_dw")
CUSTOM_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_train_step_with_pallas_kernels_lowers(platform, dtype):
    cfg = GPTConfig.preset("tiny", kernels="pallas", dtype=dtype, block_size=256, vocab_size=300)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    step = jax.jit(jax.value_and_grad(lambda p, x, y: loss_fn(p, x, y, cfg)))
    exported = export.export(step, platforms=[platform],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(CUSTOM_CALL[platform])])
    module = exported(params, ids, ids).mlir_module()
    calls = re.findall(r"custom_call @([\w$.]+)", module)
    # one call per kernel: the blocks' scan holds the three attention kernels once
    assert calls == [CUSTOM_CALL[platform]] * len(KERNELS)
    assert all(name in module for name in KERNELS)
