"""Many devices and many hosts with JAX's own runtime: a device mesh, sharding rules for the
train state, a jitted step with input/output shardings, multi-host start-up, and whole arrays
gathered to the host (what :func:`manual_grad.checkpoint.save_state` stores, so a checkpoint
loads on any mesh shape).

Nothing here is a home-made scheme: the state and the batch are ``jax.Array`` s placed with
:class:`jax.sharding.NamedSharding` on a :class:`jax.sharding.Mesh`, the step is an ordinary
``jax.jit`` with ``in_shardings``/``out_shardings``, and XLA's SPMD partitioner inserts the
collectives (all-reduce of the gradients for data parallelism; all-gather of parameters and
reduce-scatter of gradients for FSDP). The hand-written custom VJPs are ordinary jitted code
once traced, so they partition like any other op; no ``shard_map`` is needed.

Modes (the ``mode`` argument of :func:`state_shardings`):

- ``"replicated"`` (data parallel, DDP): every device holds the whole state; the batch is
  split over the ``data`` axis; gradients are all-reduced.
- ``"fsdp"`` (fully sharded, ZeRO-3 style): every array of the state (parameters and optimizer
  moments alike) is split over the ``data`` axis along its largest dimension divisible by the
  axis size, so each of N devices holds ~1/N of it.

A ``model`` axis in the mesh (``"data=4,model=2"``) adds Megatron-style tensor parallelism of
the transformer blocks (see :data:`TENSOR_PARALLEL_RULES`), on top of either mode. A ``seq``
axis (``"data=2,seq=4"``) splits the time axis: ``loss_fn(..., mesh=mesh)`` then runs attention
as ring attention (:mod:`manual_grad.seq_parallel`); the state is replicated over ``seq``.

The step can be any function ``(state, batch, key) -> (state, metrics)`` over any state pytree,
e.g. :func:`manual_grad.training.step.train_step`.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA_AXIS", "MODEL_AXIS", "SEQ_AXIS", "AXES", "MODES", "TENSOR_PARALLEL_RULES", "parse_mesh_spec",
           "make_mesh", "partition_spec", "state_shardings", "batch_sharding", "replicated",
           "shard_state", "shard_batch", "jit_sharded_step", "initialize_distributed",
           "gather_to_host"]

DATA_AXIS = "data"     # the batch (and, in FSDP mode, the state) is split over this axis
MODEL_AXIS = "model"   # optional: tensor parallelism of attention heads and MLP
SEQ_AXIS = "seq"       # optional: the time axis split over a ring (context parallelism)
AXES = (DATA_AXIS, SEQ_AXIS, MODEL_AXIS)   # the mesh's axis order: model innermost
MODES = ("replicated", "fsdp")

# Megatron-style tensor parallelism over the ``model`` axis, by parameter name (the last key of
# a leaf's path) -> the axis of that array split over ``model``, counted from the end so the
# rule holds for the stacked (L, ...) block parameters. Column-parallel layers split their
# output features, row-parallel layers their input features, so each attention/MLP pair needs
# one all-reduce of activations. ``w_qkv``'s columns are [q | k | v]: splitting them in M
# contiguous parts is exact but aligns with heads only when M divides 3, so XLA may move some
# activations between the qkv projection and attention; w_fc/w_proj split cleanly.
TENSOR_PARALLEL_RULES: dict[str, int] = {
    "w_qkv": -1, "b_qkv": -1,      # (L, C, 3C), (L, 3C): column parallel
    "w_o": -2,                     # (L, C, C): row parallel
    "w_fc": -1, "b_fc": -1,        # (L, C, F), (L, F): column parallel
    "w_proj": -2,                  # (L, F, C): row parallel
}

# Arrays with fewer elements than this stay replicated in FSDP mode: splitting a LayerNorm
# scale saves nothing and costs a collective.
FSDP_MIN_SIZE = 1024

Pytree = Any


# --- the mesh ------------------------------------------------------------------------------

def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=8"`` -> ``{"data": 8}``; ``"data=2,seq=2,model=2"`` -> ``{"data": 2, "seq": 2, "model": 2}``.

    One axis may be ``-1``: it takes all the devices the others leave. Axis names are
    :data:`DATA_AXIS`, :data:`SEQ_AXIS` and :data:`MODEL_AXIS`; ``data`` is required.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh must be a string like 'data=8' or 'data=4,model=2', got {spec!r}")
    axes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, size = part.strip().partition("=")
        name = name.strip()
        if not sep or name not in AXES or name in axes:
            raise ValueError(f"mesh: bad axis {part.strip()!r} in {spec!r}; expected distinct "
                             f"'{DATA_AXIS}=N' and optionally '{SEQ_AXIS}=S', '{MODEL_AXIS}=M'")
        try:
            axes[name] = int(size)
        except ValueError:
            raise ValueError(f"mesh: axis {name!r} needs an integer size, got {size.strip()!r}") from None
        if axes[name] == 0 or axes[name] < -1:
            raise ValueError(f"mesh: axis {name!r} must have a size >= 1 or -1, got {axes[name]}")
    if DATA_AXIS not in axes:
        raise ValueError(f"mesh: {spec!r} has no '{DATA_AXIS}' axis")
    if list(axes.values()).count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {spec!r}")
    return axes


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A :class:`Mesh` over ``devices`` (default: all devices of all processes) for a spec as
    :func:`parse_mesh_spec` reads it (or its dict), with axes in the order data, seq, model
    (neighbours on the ring and in a tensor-parallel group are adjacent devices). Axes are
    ``AxisType.Auto``: shardings are given at the jit boundary and XLA's partitioner
    propagates them through the model (the ring runs inside ``shard_map``)."""
    if not isinstance(spec, str):
        spec = ",".join(f"{name}={size}" for name, size in dict(spec).items())
    axes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    known = math.prod(s for s in axes.values() if s != -1)
    axes = {k: (len(devices) // known if s == -1 else s) for k, s in axes.items()}
    size = math.prod(axes.values())
    if size == 0 or size > len(devices):
        raise ValueError(f"mesh: {spec} needs {max(size, known)} devices, {len(devices)} available")
    names = tuple(n for n in AXES if n in axes)
    shape = tuple(axes[n] for n in names)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                         devices=devices[:size])


def _axis_size(mesh: Mesh, name: str) -> int:
    return int(mesh.shape[name]) if name in mesh.shape else 1


# --- sharding rules ------------------------------------------------------------------------

def partition_spec(shape: Sequence[int], mesh: Mesh, mode: str = "replicated", *,
                   name: str | None = None, min_size: int = FSDP_MIN_SIZE) -> P:
    """The :class:`PartitionSpec` of one state array of ``shape``.

    - tensor parallel (mesh has a ``model`` axis and ``name`` is in
      :data:`TENSOR_PARALLEL_RULES`): that rule's dimension is split over ``model``;
    - ``mode="fsdp"``: the largest remaining dimension divisible by the ``data`` axis size
      (ties: the later one) is split over ``data``, if the array has >= ``min_size`` elements;
    - anything else is replicated.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    spec: list[str | None] = [None] * len(shape)
    n_model = _axis_size(mesh, MODEL_AXIS)
    if n_model > 1 and name in TENSOR_PARALLEL_RULES and len(shape) >= -TENSOR_PARALLEL_RULES[name]:
        dim = len(shape) + TENSOR_PARALLEL_RULES[name]
        if shape[dim] % n_model == 0:
            spec[dim] = MODEL_AXIS
    n_data = _axis_size(mesh, DATA_AXIS)
    if mode == "fsdp" and n_data > 1 and math.prod(shape) >= min_size:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % n_data == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], d))] = DATA_AXIS
    return P(*spec)


def _leaf_name(path) -> str | None:
    """The last dict key of a pytree path (``w_qkv`` for ``['params']['blocks']['attn']['w_qkv']``)."""
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
    return None


def state_shardings(state: Pytree, mesh: Mesh, mode: str = "replicated", *,
                    min_size: int = FSDP_MIN_SIZE) -> Pytree:
    """A pytree of :class:`NamedSharding` matching ``state`` (arrays or shape structs).

    Rules are per array, by shape (and by name for tensor parallelism), so optimizer moments
    get the sharding of the parameter they shadow and scalars (step, Adam's count) stay
    replicated, whatever the optimizer.
    """
    def sharding(path, leaf):
        spec = partition_spec(np.shape(leaf), mesh, mode, name=_leaf_name(path), min_size=min_size)
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(sharding, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays (B, ...) split over ``data`` along B, replicated over ``model`` and ``seq``
    (token ids are small: ``loss_fn`` puts the time axis in the ring's order and splits it)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (keys, metrics)."""
    return NamedSharding(mesh, P())


def shard_state(state: Pytree, shardings: Pytree) -> Pytree:
    """Places a host or single-device ``state`` on the mesh. Every process must pass the same
    values (e.g. initialised from the same seed)."""
    def put(x, sharding):
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, state, shardings)


def shard_batch(batch: Pytree, mesh: Mesh, *, process_local: bool = True) -> Pytree:
    """Host batch arrays (B, ...) -> global arrays split over ``data`` along B.

    With one process, ``batch`` is the whole batch. With several: ``process_local=True`` (each
    process passes its own rows, (B / process_count, ...), e.g. from its own data loader; the
    global batch is their concatenation in process order) or ``process_local=False`` (every
    process passes the same whole batch, e.g. one drawn from a shared seed, and keeps the rows
    its devices hold). The global B must divide by the ``data`` axis size.
    """
    sharding = batch_sharding(mesh)
    n_data = _axis_size(mesh, DATA_AXIS)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("batch: every array needs a leading batch axis, got a scalar")
        global_rows = x.shape[0] * (jax.process_count() if process_local else 1)
        if global_rows % n_data:
            raise ValueError(f"batch: global batch size {global_rows} is not divisible by the "
                             f"'{DATA_AXIS}' axis size {n_data}")
        if process_local:
            return jax.make_array_from_process_local_data(sharding, x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, batch)


def jit_sharded_step(step: Callable, shardings: Pytree, mesh: Mesh, *, donate: bool = True,
                     frozen: Pytree | None = None, frozen_shardings: Pytree | None = None) -> Callable:
    """``jax.jit(step)`` with the state in and out on ``shardings``, the batch split over
    ``data`` and the key and metrics replicated: ``(state, batch, key) -> (state, metrics)``.

    ``step(state, batch, key) -> (state, metrics)`` may itself be jitted already (jit of jit
    inlines). ``donate`` lets XLA reuse the old state's buffers for the new one (the caller must
    not touch the state it passed in afterwards).

    ``frozen``: a pytree the step reads but does not train (the base of a LoRA fine-tune). It
    is then passed to the compiled function as an argument, not baked in as a constant:
    ``step(frozen, state, batch, key)``, with ``frozen`` placed on ``frozen_shardings``
    (default: :func:`state_shardings` of it in ``"replicated"`` mode). A function that closes
    over arrays would bake them into the program as constants. The returned step has
    ``.lower(state, batch, key)`` like a jitted function.
    """
    rep, batch = replicated(mesh), batch_sharding(mesh)
    if frozen is None:
        return jax.jit(step, in_shardings=(shardings, batch, rep), out_shardings=(shardings, rep),
                       donate_argnums=(0,) if donate else ())
    if frozen_shardings is None:
        frozen_shardings = state_shardings(frozen, mesh, "replicated")
    frozen = shard_state(frozen, frozen_shardings)
    jitted = jax.jit(step, in_shardings=(frozen_shardings, shardings, batch, rep),
                     out_shardings=(shardings, rep), donate_argnums=(1,) if donate else ())

    def sharded_step(state, batch, key):
        return jitted(frozen, state, batch, key)
    sharded_step.lower = lambda state, batch, key: jitted.lower(frozen, state, batch, key)
    return sharded_step


# --- several hosts -------------------------------------------------------------------------

def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
    """Starts JAX's multi-host runtime (``jax.distributed.initialize``): one process per host,
    every process runs the same program and sees all devices of all hosts in ``jax.devices()``.

    Each argument falls back to an environment variable: ``JAX_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. With none of them
    set, this is a single-process run and nothing is started (returns False), unless ``auto``
    asks JAX to detect a cluster (SLURM, Open MPI, Kubernetes, Cloud TPU). Returns True when the
    runtime was started. Call it before anything touches a device.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    rank = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if address is None and count is None and rank is None:
        if auto:
            jax.distributed.initialize()
            return True
        return False
    if address is None or count is None or rank is None:
        missing = [n for n, v in (("coordinator_address", address), ("num_processes", count),
                                  ("process_id", rank)) if v is None]
        raise ValueError(f"distributed: {', '.join(missing)} not given (flag or JAX_* environment "
                         f"variable); all three are needed for a multi-host run")
    if count < 1 or not 0 <= rank < count:
        raise ValueError(f"distributed: need num_processes >= 1 and 0 <= process_id < num_processes, "
                         f"got num_processes={count}, process_id={rank}")
    jax.distributed.initialize(address, count, rank)
    return True


# --- whole arrays on the host ---------------------------------------------------------------

def gather_to_host(tree: Pytree) -> Pytree:
    """Every array of ``tree`` whole, as host numpy, on every process (a collective when
    arrays span several processes: all processes must call it). What a checkpoint stores:
    whole arrays, no trace of the mesh they lived on."""
    def gather(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(gather, tree)
