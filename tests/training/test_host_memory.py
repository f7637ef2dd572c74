"""keep_host_memory: the memory a training step frees is reused by the next call instead of
being unmapped and faulted back in (counted in minor page faults, not timed)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from manual_grad.training import host_memory

REPO = Path(__file__).resolve().parents[2]

# The gradient of a small GPT at B=8, T=512: about 97 MiB of temporaries (XLA's estimate), over
# glibc's 32 MiB mmap threshold. Prints the policy's state, the temp size and the minor page
# faults of each of CALLS calls.
PROBE = """
import resource, sys
CALLS = int(sys.argv[1])
from manual_grad.training.host_memory import keep_host_memory
kept = keep_host_memory()
import jax
from manual_grad import GPTConfig, init_params, loss_fn
cfg = GPTConfig(vocab_size=65, block_size=512, n_layer=2, n_head=4, n_embd=128, dropout=0.0)
params = init_params(cfg, jax.random.key(0))
tokens = jax.random.randint(jax.random.key(1), (8, 512), 0, 65)
grad = jax.jit(jax.grad(loss_fn), static_argnums=(3,))
temp = grad.lower(params, tokens, tokens, cfg).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(CALLS):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    g = jax.block_until_ready(grad(params, tokens, tokens, cfg))
    del g
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, temp, *faults)
"""


def _probe(keep: bool, calls: int) -> tuple[bool, int, list[int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), host_memory.OPT_OUT: "1" if keep else "0",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(calls)], env=env, capture_output=True,
                         text=True, check=True, timeout=600).stdout.split()
    kept, temp, *faults = out[-(calls + 2):]
    return kept == "True", int(temp), [int(f) for f in faults]


def _thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(host_memory._glibc() is None, reason="the policy is glibc's mallopt")
def test_step_temporaries_are_reused_not_faulted_in_again():
    """With the policy most calls fault nothing; without it every call faults its temporaries in.

    The heap still grows a few times before it reaches a fixed point: a longer-lived small
    allocation lands in the freed block, the next call's temporaries no longer fit and the heap
    grows by their size. Measured on the 2-core VM: 2 such calls in 25-30 (at calls 11-29), then
    none up to call 150, the resident size flat at about four times the temporaries. So the
    test counts: at most a third of the calls after the first may fault their temporaries in.
    """
    kept, temp, faults = _probe(keep=True, calls=30)
    pages = temp // 4096
    assert kept and pages > 8192          # over the mmap threshold: the case the policy is for
    grown = [i for i, f in enumerate(faults) if i > 0 and f >= pages // 20]
    assert len(grown) <= 10, f"calls {grown} faulted their temporaries in: {faults} ({pages} pages)"
    if not _thp_always():      # control: without the policy each call faults its temporaries again
        kept, _, faults = _probe(keep=False, calls=8)
        assert not kept and min(faults[-5:]) > pages // 2, faults


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setenv(host_memory.OPT_OUT, "0")
    assert host_memory.keep_host_memory() is False
    assert host_memory._applied is False
