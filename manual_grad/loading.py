"""Loading a trained model: a run folder or checkpoint file (a full model, or LoRA adapters on
their recorded base), or a Hugging Face GPT-2 folder. Sampling and fine-tuning use this; it
needs nothing of the trainer."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from manual_grad import data as data_lib
from manual_grad.checkpoint import CheckpointError, load_checkpoint, restore_like, verify_checkpoint
from manual_grad.config import GPTConfig
from manual_grad.model import init_params

__all__ = ["CHECKPOINT", "LORA_CHECKPOINT", "load_model", "load_hf", "load_base", "checkpoint_path"]

CHECKPOINT = "ckpt.mgc"          # a full model (a training run, or a merged fine-tune)
LORA_CHECKPOINT = "lora.mgc"     # LoRA adapters (+ their optimizer state) on a recorded base


def checkpoint_path(path, name=CHECKPOINT) -> Path:
    """``path / name`` for a folder, ``path`` itself for a file."""
    path = Path(path)
    return path / name if path.is_dir() else path


def _params_like(ckpt, cfg: GPTConfig, *, lora_only: bool):
    """The checkpoint's params, checked path by path against the shapes ``cfg`` implies."""
    template = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    template = template["lora"] if lora_only else template
    return restore_like(template, ckpt.flat("params"), what="params")


def load_model(path: str | os.PathLike) -> tuple[dict, GPTConfig, Any]:
    """``(params, cfg, tokenizer)`` of a run folder or checkpoint file: a full model, or a LoRA
    fine-tune (its adapters attached to its recorded, checksum-verified base). A folder holding
    both a merged ``ckpt.mgc`` and ``lora.mgc`` gives the merged model."""
    path = Path(path)
    if path.is_dir():
        path = path / (LORA_CHECKPOINT if (path / LORA_CHECKPOINT).is_file()
                       and not (path / CHECKPOINT).is_file() else CHECKPOINT)
    ckpt = load_checkpoint(path)
    try:
        cfg = GPTConfig.from_dict(ckpt.meta["model_config"])
        if ckpt.meta.get("kind") == "lora":
            base, _, tokenizer = load_base(ckpt.meta["base"])
            return {**base, "lora": _params_like(ckpt, cfg, lora_only=True)}, cfg, tokenizer
        tokenizer = data_lib.tokenizer_from_dict(ckpt.meta["tokenizer"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks model metadata ({e})") from None
    return _params_like(ckpt, cfg, lora_only=False), cfg, tokenizer


def load_hf(path: str | os.PathLike) -> tuple[dict, GPTConfig, Any]:
    """``(params, cfg, tokenizer)`` of a Hugging Face GPT-2 folder (needs the interop extra)."""
    from manual_grad.interop import load_gpt2
    params, cfg = load_gpt2(path)
    return params, cfg, data_lib.BPETokenizer.from_dir(path)


def load_base(record: dict):
    """The frozen base of a fine-tune: ``(params, cfg, tokenizer)``, checked against ``record``
    (``{"from_hf": dir}`` or ``{"init_from": path, "sha256": digest}``)."""
    if record.get("from_hf"):
        return load_hf(record["from_hf"])
    path = checkpoint_path(record["init_from"])
    digest = verify_checkpoint(path)
    if record.get("sha256") and digest != record["sha256"]:
        raise CheckpointError(f"base checkpoint {str(path)!r} changed since the adapters were trained "
                              "(sha256 differs): the adapters belong to another model")
    params, cfg, tokenizer = load_model(path)
    if "lora" in params:
        raise CheckpointError(f"base {str(path)!r} is itself a LoRA fine-tune: merge it first (--merge)")
    return params, cfg, tokenizer
