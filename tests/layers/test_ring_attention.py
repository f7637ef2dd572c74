"""Ring attention (manual_grad.layers.ring_attention) in-process, on the one device a test
process has: the layout's properties and the op on a ring of one. Rings of 2 to 8 devices
run in tests/test_parallel.py (subprocesses with virtual devices)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from manual_grad.layers.attention import attend_ref
from manual_grad.layers.ring_attention import ring_attend, ring_attend_ref, ring_order
from tests.helpers import rel_err


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_ring_order_is_a_permutation_in_equal_blocks(n, causal):
    T = 6 * n
    order = ring_order(T, n, causal)
    assert sorted(order.tolist()) == list(range(T))
    if not causal:
        assert order.tolist() == list(range(T))
        return
    c = T // (2 * n)
    for i, block in enumerate(order.reshape(n, 2 * c)):   # device i: chunks i and 2n-1-i, in order
        assert block.tolist() == list(range(i * c, (i + 1) * c)) + list(range((2 * n - 1 - i) * c, (2 * n - i) * c))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_causal_layout_balances_the_visible_scores(n):
    """Under the causal mask query p sees p + 1 keys: the balanced layout gives every device
    the same number of visible scores; contiguous blocks of m would give the last device
    1 + 2 (n - 1) m / (m + 1) times the first's (-> 2n - 1)."""
    m = 16
    work = [(p + 1).sum() for p in ring_order(m * n, n, True).reshape(n, -1)]
    assert len(set(work)) == 1
    contiguous = [(p + 1).sum() for p in np.arange(m * n).reshape(n, -1)]
    assert abs(contiguous[-1] / contiguous[0] - (1 + 2 * (n - 1) * m / (m + 1))) < 1e-12


@pytest.mark.parametrize("T, n, causal", [(20, 4, True), (7, 2, False)])
def test_ring_order_rejects_an_indivisible_length(T, n, causal):
    with pytest.raises(ValueError, match=f"T={T}"):
        ring_order(T, n, causal)


@pytest.mark.parametrize("causal, T", [(True, 10), pytest.param(False, 7, marks=pytest.mark.slow)])
def test_ring_of_one_matches_twin_and_plain_attention(x64, causal, T):
    """On a ring of one device the op is flash attention over key tiles: output and the
    gradients of sum(out * g) equal the twin's and plain attention's (float64, <= 1e-12)."""
    mesh = jax.make_mesh((1,), ("seq",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    spec = P(None, None, "seq", None)
    q, k, v, g = (jax.random.normal(key, (2, 3, T, 4), jnp.float64) for key in jax.random.split(jax.random.key(0), 4))

    def grads(op):
        attend = jax.shard_map(lambda q, k, v: op(q, k, v, causal=causal, axis="seq", n=1, tile=3), mesh=mesh,
                               in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * g), (0, 1, 2)))(q, k, v)

    plain = jax.value_and_grad(lambda q, k, v: jnp.sum(attend_ref(q, k, v, causal=causal) * g), (0, 1, 2))(q, k, v)
    ring = grads(ring_attend)
    for other in (grads(ring_attend_ref), plain):
        for a, b in zip(jax.tree.leaves(ring), jax.tree.leaves(other)):
            assert rel_err(a, b) <= 1e-12


def test_causal_ring_needs_two_chunks():
    q = jnp.zeros((1, 1, 3, 4))
    with pytest.raises(ValueError, match="even number of local rows"):
        ring_attend.fwd(q, q, q, causal=True, axis="seq", n=1)
