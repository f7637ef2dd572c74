"""The time axis split over a mesh's ``seq`` axis (context parallelism), for the model.

With ``loss_fn(..., mesh=mesh)`` on a mesh with ``seq`` > 1 (manual backend), the batch's
time axis is split over ``seq``: each of its n devices holds T/n positions of every sequence
of its ``data`` shard. The whole model runs inside one ``shard_map``, manual over ``data`` and
``seq`` (a ``model`` axis stays with XLA's partitioner): token-wise layers (embedding,
LayerNorm, MLP, projections) run on their shard as they are, attention runs as ring attention
(:mod:`manual_grad.layers.ring_attention`), and the loss is summed per shard and divided by
the number of counted tokens over all shards. The parameters enter replicated over data and
seq, so their gradients are summed over both by the ``shard_map`` transpose.

Under the causal mask the positions are stored in the ring's load-balanced order
(:func:`~manual_grad.layers.ring_attention.ring_order`): token ids, targets and position
embeddings are permuted into it once, at the start, and logits are put back in order at the
end. Token-wise layers and the mean loss do not care about the order. The autodiff backend
(the reference) ignores the ``seq`` axis. Dropout draws its bits per shard (the key folded
with the shard's index), so a step with dropout differs from the one-device step (the same
in distribution).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from manual_grad.layers.loss import IGNORE_INDEX
from manual_grad.layers.ring_attention import ring_core, ring_order
from manual_grad.parallel import DATA_AXIS, SEQ_AXIS

__all__ = ["SeqSplit", "seq_split"]


class SeqSplit(NamedTuple):
    """How a (B, T) batch lies on a mesh with a ``seq`` axis."""
    mesh: Mesh
    order: np.ndarray              # (T,): the position stored at each index of the split time axis
    batch_axis: str | None         # ``data`` when the mesh has it
    core: Callable                 # self-attention's core: the ring over ``seq``

    @property
    def _manual(self):
        return tuple(a for a in (self.batch_axis, SEQ_AXIS) if a is not None)

    def _run(self, body: Callable, params, ids, extra, dropout_key, out_spec):
        """``body(params, ids, extra, key)`` on every shard: ids (and ``extra``, the targets or
        None) permuted into the ring's order and split over (data, seq), ``params["wpe"]``
        (T, C) likewise split over seq, the rest of ``params`` whole on data and seq (a
        ``model`` axis stays with XLA's partitioner). The dropout key differs per shard."""
        params = {**params, "wpe": params["wpe"][self.order]}            # (T, C): position of each index
        specs = jax.tree.map(lambda _: P(), params)
        specs["wpe"] = P(SEQ_AXIS, None)
        tokens = P(self.batch_axis, SEQ_AXIS)
        ids, extra = (None if a is None else a[:, self.order] for a in (ids, extra))

        def shard(params, ids, extra, key):
            if key is not None:
                for a in self._manual:
                    key = jax.random.fold_in(key, jax.lax.axis_index(a))
            return body(params, ids, extra, key)

        return jax.shard_map(shard, mesh=self.mesh, in_specs=(specs, tokens, tokens, P()), out_specs=out_spec,
                             axis_names=frozenset(self._manual), check_vma=False)(params, ids, extra, dropout_key)

    def loss(self, body: Callable, params, inputs, targets, dropout_key):
        """The mean loss over the counted targets of all shards. ``body(params, inputs, targets,
        key)`` is the model's loss on one shard (the mean over its counted tokens); the sums
        (mean x count) and the counts are added with ``psum`` over data and seq."""
        def shard(params, inputs, targets, key):
            mean = body(params, inputs, targets, key)
            counted = jnp.sum(targets != IGNORE_INDEX)
            total = jax.lax.psum(mean * counted.astype(mean.dtype), self._manual)
            return total / jnp.maximum(jax.lax.psum(counted, self._manual), 1).astype(mean.dtype)
        return self._run(shard, params, inputs, targets, dropout_key, P())

    def forward(self, body: Callable, params, inputs, dropout_key):
        """``body(params, inputs, key) -> (B, T, V)`` per shard; the logits in position order."""
        logits = self._run(lambda p, i, _, key: body(p, i, key), params, inputs, None, dropout_key,
                           P(self.batch_axis, SEQ_AXIS, None))
        return logits[:, np.argsort(self.order)]


def seq_split(mesh: Mesh | None, shape: tuple[int, int], *, causal: bool, backend: str,
              tile: int) -> SeqSplit | None:
    """The split of a (B, T) batch on ``mesh``; None without a ``seq`` axis of size > 1, and
    for the autodiff backend (the reference: it runs unsplit, through XLA's partitioner).
    Raises ValueError when B does not divide by the ``data`` axis or T by the ring (2
    chunks per device under the causal mask)."""
    if mesh is None or int(mesh.shape.get(SEQ_AXIS, 1)) == 1 or backend != "manual":
        return None
    B, T = shape
    n_data, n = int(mesh.shape.get(DATA_AXIS, 1)), int(mesh.shape[SEQ_AXIS])
    if B % n_data:
        raise ValueError(f"inputs: batch size B={B} is not divisible by the '{DATA_AXIS}' axis size {n_data}")
    batch_axis = DATA_AXIS if DATA_AXIS in mesh.shape else None
    return SeqSplit(mesh, ring_order(T, n, causal), batch_axis, ring_core(SEQ_AXIS, n, tile))
