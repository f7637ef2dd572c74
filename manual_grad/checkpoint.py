"""Checkpoints: pytrees of arrays plus JSON metadata in one checksummed file, written atomically.

File layout::

    MANUALGRAD-CKPT 1\\n
    {"sha256": "<hex of the payload>", "size": <payload bytes>}\\n
    <payload: a NumPy .npz archive; member "__meta__" holds the JSON metadata>

Each tree is stored leaf by leaf under ``"<tree>/<key path>"`` (e.g. ``params/blocks/attn/w_qkv``,
``opt_state/1/0/mu/wte``). Nested dicts come back as nested dicts; any other pytree (optax
states are NamedTuples) is restored against the structure of a freshly built template by
:func:`restore_like`, which checks every path and shape.

Writing goes to a temporary file in the same folder, is fsync-ed, then ``os.replace``-d over
the target: a crash leaves the old checkpoint or the new one, never half of one. Loading
verifies the checksum before reading anything.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from manual_grad.parallel import gather_to_host, shard_state

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
           "flatten_tree", "unflatten_dict", "restore_like", "save_state", "load_state"]

MAGIC = b"MANUALGRAD-CKPT 1\n"
META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, fails its checksum, or does not fit what it is loaded into."""


# --- pytrees <-> flat {path: array} ----------------------------------------------------------

def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(f"unsupported pytree key {key!r}")


def flatten_tree(tree) -> dict[str, np.ndarray]:
    """``{"a/b/c": array}`` for every leaf; typed PRNG keys are stored as their key data."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        flat["/".join(_key_name(k) for k in path)] = np.asarray(leaf)
    return flat


def unflatten_dict(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten_tree` for nested dicts of arrays (e.g. parameters)."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value)
    return tree


def restore_like(template, flat: dict[str, np.ndarray], what: str = "tree"):
    """``template``'s structure with the leaves of ``flat`` (matched by path, shape-checked)."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in paths_leaves:
        name = "/".join(_key_name(k) for k in path)
        if name not in flat:
            raise CheckpointError(f"{what}: checkpoint has no entry {name!r}: it comes from another config")
        value = flat[name]
        if tuple(value.shape) != tuple(np.shape(leaf)):
            raise CheckpointError(f"{what}: {name!r} has shape {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(np.shape(leaf))} expected: it comes from another config")
        leaves.append(jnp.asarray(value, dtype=getattr(leaf, "dtype", None)))
    extra = set(flat) - {"/".join(_key_name(k) for k in p) for p, _ in paths_leaves}
    if extra:
        raise CheckpointError(f"{what}: checkpoint has unexpected entries {sorted(extra)[:3]}: "
                              "it comes from another config")
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --- the file ----------------------------------------------------------------------------------

def _storable(array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """NumPy-native dtypes as they are; others (bfloat16, ...) as unsigned views plus the name."""
    if array.dtype.kind in "biufc":
        return array, None
    if array.dtype.kind == "O":
        raise ValueError(f"checkpoint leaves must be numeric arrays, got {array.dtype} (a non-array leaf?)")
    return array.view(f"u{array.dtype.itemsize}"), array.dtype.name


def save_checkpoint(path, meta: dict, **trees) -> str:
    """Writes ``trees`` (name -> pytree of arrays) and ``meta`` (JSON-able) to ``path``
    atomically; returns the payload's sha256."""
    path = Path(path)
    arrays, dtypes = {}, {}
    for tree_name, tree in trees.items():
        for key, value in flatten_tree(tree).items():
            full = f"{tree_name}/{key}" if key else tree_name
            arrays[full], dtype_name = _storable(value)
            if dtype_name:
                dtypes[full] = dtype_name
    meta_bytes = json.dumps({**meta, "_trees": sorted(trees), "_dtypes": dtypes}).encode()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{META: np.frombuffer(meta_bytes, np.uint8)})
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    header = json.dumps({"sha256": digest, "size": len(payload)}).encode() + b"\n"

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + header + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:                                   # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return digest


def _read_payload(path) -> tuple[bytes, str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({e.strerror})") from None
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a manual_grad checkpoint")
    header_end = raw.find(b"\n", len(MAGIC))
    try:
        header = json.loads(raw[len(MAGIC):header_end])
        digest, size = header["sha256"], header["size"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {str(path)!r} has a damaged header") from None
    payload = raw[header_end + 1:]
    if len(payload) != size or hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged (checksum mismatch)")
    return payload, digest


def verify_checkpoint(path) -> str:
    """The checkpoint's sha256 if it is complete and intact; CheckpointError otherwise."""
    return _read_payload(path)[1]


class Checkpoint:
    """A loaded checkpoint: ``meta`` (dict), ``sha256``, and ``flat(tree)`` / ``tree(name)``."""

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray], sha256: str):
        self.meta, self.sha256, self._arrays = meta, sha256, arrays

    def has(self, tree: str) -> bool:
        return tree in self.meta.get("_trees", [])

    def flat(self, tree: str) -> dict[str, np.ndarray]:
        """``{path: array}`` of one stored tree (paths relative to the tree)."""
        if not self.has(tree):
            raise CheckpointError(f"checkpoint has no {tree!r}")
        prefix = tree + "/"
        return {k[len(prefix):]: v for k, v in self._arrays.items() if k.startswith(prefix)}

    def tree(self, tree: str) -> dict:
        """A stored nested dict (e.g. parameters), as jnp arrays."""
        return unflatten_dict(self.flat(tree))

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            raise CheckpointError(f"checkpoint has no {name!r}")
        return self._arrays[name]

    def restore(self, tree: str, like, shardings=None):
        """The stored ``tree`` in the structure of ``like`` (arrays or ``jax.ShapeDtypeStruct`` s,
        e.g. ``jax.eval_shape`` of the init), each array placed on ``shardings`` (a matching
        pytree, e.g. :func:`manual_grad.parallel.state_shardings` on any mesh; default: the
        default device). CheckpointError names the array whose path or shape differs."""
        with jax.default_device(jax.local_devices(backend="cpu")[0]):   # host memory, not device 0
            restored = restore_like(like, self.flat(tree), what=tree)
        if shardings is None:
            return jax.device_put(restored, jax.local_devices()[0])
        return shard_state(restored, shardings)


def load_checkpoint(path) -> Checkpoint:
    """Reads and verifies ``path``; CheckpointError if it is missing, damaged or not ours."""
    payload, digest = _read_payload(path)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        meta: dict[str, Any] = json.loads(arrays.pop(META).tobytes())
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be decoded ({e})") from None
    for name, dtype_name in meta.get("_dtypes", {}).items():
        arrays[name] = arrays[name].view(jnp.dtype(dtype_name))
    return Checkpoint(meta, arrays, digest)


# --- train state on any mesh ---------------------------------------------------------------------

def save_state(path, meta: dict | None = None, **trees) -> None:
    """Writes ``trees`` (name -> pytree, sharded or not) as whole arrays with ``meta``, so
    :func:`load_state` / :meth:`Checkpoint.restore` can place them on any mesh.

    Every process must call it (the arrays are gathered collectively); process 0 alone writes,
    atomically (temporary file, fsync, ``os.replace``); the others wait until it is written.
    """
    host = {name: gather_to_host(tree) for name, tree in trees.items()}
    if jax.process_index() == 0:
        save_checkpoint(path, dict(meta or {}), **host)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"manual_grad.checkpoint.save_state:{os.fspath(path)}")


def load_state(path, like, shardings=None, *, tree: str = "state"):
    """``load_checkpoint(path).restore(tree, like, shardings)``: a :func:`save_state` tree back
    on any mesh. Every process reads the file (a shared file system, or a copy per host)."""
    return load_checkpoint(path).restore(tree, like, shardings)
