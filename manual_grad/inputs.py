"""Checks of a model call's inputs, before any compute: token ids (shape, dtype and, when
concrete, range) and that ``params`` and ``cfg`` belong together. Under ``jit`` the values are
unknown; :mod:`manual_grad.debug` checks those with checkify."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad.config import GPTConfig
from manual_grad.layers.loss import IGNORE_INDEX

__all__ = ["check_ids", "check_call"]


def check_ids(name: str, ids, cfg: GPTConfig, *, allow_ignore: bool = False):
    """Shape, dtype and (when concrete) range checks, before any compute."""
    if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
        raise ValueError(f"{name} must be an integer array of shape (B, T), got {type(ids).__name__}")
    if ids.ndim != 2:
        raise ValueError(f"{name} must have rank 2 (B, T), got shape {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
    B, T = ids.shape
    if B < 1 or T < 1:
        raise ValueError(f"{name} must have B >= 1 and T >= 1, got shape {(B, T)}")
    if T > cfg.block_size:
        raise ValueError(f"{name} has T={T} > block_size={cfg.block_size}")
    if isinstance(ids, jax.core.Tracer):
        return   # values unknown under jit: use debug checks (checkify) for those
    values = np.asarray(ids)
    bad = (values < 0) | (values >= cfg.vocab_size)
    if allow_ignore:
        bad &= values != IGNORE_INDEX
    if bad.any():
        allowed = f"[0, {cfg.vocab_size})" + (f" or {IGNORE_INDEX}" if allow_ignore else "")
        raise ValueError(f"{name} has ids outside {allowed}: e.g. {values[bad].ravel()[:5].tolist()}")


def check_call(params, inputs, cfg, backend: str, backends) -> None:
    """The config, the backend (one of ``backends``), params made for ``cfg``, and the input ids."""
    if not isinstance(cfg, GPTConfig):
        raise ValueError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
    if backend not in backends:
        raise ValueError(f"backend must be one of {sorted(backends)}, got {backend!r}")
    if not isinstance(params, dict) or "wte" not in params or "blocks" not in params:
        raise ValueError("params must be the dict made by init_params (missing 'wte' or 'blocks')")
    if params["wte"].shape != (cfg.vocab_size, cfg.n_embd):
        raise ValueError(f"params['wte'] has shape {params['wte'].shape}, cfg expects "
                         f"{(cfg.vocab_size, cfg.n_embd)}: params and cfg do not match")
    check_ids("inputs", inputs, cfg)
