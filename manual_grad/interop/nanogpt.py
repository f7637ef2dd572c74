"""nanoGPT weights in: a PyTorch ``state_dict`` of nanoGPT's ``model.py`` (or its ``ckpt.pt``)
-> ``(params, cfg)``.

nanoGPT names its tensors as GPT-2 does (``transformer.h.{i}.attn.c_attn.weight`` ...; see
:mod:`manual_grad.interop.hf` for the full map) but its linear layers are ``nn.Linear``, which
stores ``(out, in)``: every block weight and ``lm_head`` are transposed to our ``(in, out)``.
``torch.compile`` prefixes the keys with ``_orig_mod.``, which is stripped. With
``bias=False`` nanoGPT has no biases at all, LayerNorm included: our LayerNorm biases are then
zeros, and the linear biases are absent (``cfg.bias=False``) or zeros if a given ``GPTConfig``
asks for them.

nanoGPT's MLP uses ``nn.GELU()``, the exact (erf) GELU; ours is GPT-2's tanh form. The two
differ by at most 4.8e-4 at any input, so imported logits differ slightly (about 1e-4
relative) from nanoGPT's own.
"""
from __future__ import annotations

import os
from typing import Any

from manual_grad.config import GPTConfig
from manual_grad.interop.hf import (BUFFER_SUFFIXES, check_vocab, drop_tied_head, gpt2_entries,
                                    params_from_tensors)

__all__ = ["load_nanogpt_state_dict", "load_nanogpt_checkpoint", "config_from_model_args"]

_COMPILE_PREFIX = "_orig_mod."
_MODEL_ARGS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")


def config_from_model_args(model_args: dict, *, dtype: str = "float32") -> GPTConfig:
    """A :class:`GPTConfig` from nanoGPT's ``model_args`` (``n_layer, n_head, n_embd,
    block_size, bias, vocab_size, dropout``): GELU, LayerNorm eps 1e-5, tied logits."""
    missing = [name for name in _MODEL_ARGS if name not in model_args]
    if missing:
        raise ValueError(f"model_args: missing {missing}")
    return GPTConfig(**{name: model_args[name] for name in _MODEL_ARGS},
                     bias=bool(model_args.get("bias", True)),
                     dropout=float(model_args.get("dropout", 0.0)), dtype=dtype)


def load_nanogpt_state_dict(state_dict: dict[str, Any], cfg_or_model_args: GPTConfig | dict, *,
                            dtype: str | None = None) -> tuple[dict, GPTConfig]:
    """``(params, cfg)`` from a nanoGPT ``state_dict`` (name -> torch tensor or numpy array).

    ``cfg_or_model_args``: nanoGPT's ``model_args`` dict (as saved in its ``ckpt.pt``) or a
    :class:`GPTConfig` (without LoRA: attach adapters after loading). ``dtype``: ``cfg.dtype``
    (the compute dtype; parameters are stored in ``cfg.storage_dtype``); defaults to the
    GPTConfig's, or float32 for ``model_args``.

    Shapes are checked against the config; a missing key, a wrong shape, a wrong vocabulary
    size, biases only partly present or an unknown key raise a ``ValueError`` naming it.
    """
    if isinstance(cfg_or_model_args, GPTConfig):
        cfg = cfg_or_model_args.replace(dtype=dtype or cfg_or_model_args.dtype)
        if cfg.lora is not None:
            raise ValueError("cfg_or_model_args: load the base weights with lora=None, then attach_lora")
    elif isinstance(cfg_or_model_args, dict):
        cfg = config_from_model_args(cfg_or_model_args, dtype=dtype or "float32")
    else:
        raise ValueError("cfg_or_model_args must be a GPTConfig or nanoGPT's model_args dict, "
                         f"got {type(cfg_or_model_args).__name__}")
    if not isinstance(state_dict, dict):
        raise ValueError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")

    tensors = {k.removeprefix(_COMPILE_PREFIX): v for k, v in state_dict.items()
               if not k.endswith(BUFFER_SUFFIXES)}
    has_bias = any(k.endswith(".bias") for k in tensors)
    if not has_bias and isinstance(cfg_or_model_args, dict) and cfg.bias:
        raise ValueError("state_dict has no biases but model_args says bias=True")
    check_vocab(tensors, cfg.vocab_size, "state_dict")
    if cfg.tied_embeddings:
        drop_tied_head(tensors, "state_dict")
    entries = gpt2_entries(cfg, linear_transposed=True)
    params = params_from_tensors(tensors, cfg, entries, source="state_dict",
                                 zero_missing_biases=not has_bias)
    return params, cfg


def load_nanogpt_checkpoint(path: str | os.PathLike, *, dtype: str = "float32") -> tuple[dict, GPTConfig]:
    """``(params, cfg)`` from nanoGPT's ``ckpt.pt`` (a dict with ``"model"``, the state dict,
    and ``"model_args"``), read with ``torch.load(weights_only=True)``."""
    import torch
    ckpt = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"path: {os.fspath(path)!r} is not a nanoGPT checkpoint "
                         "(a dict with 'model' and 'model_args')")
    return load_nanogpt_state_dict(ckpt["model"], ckpt["model_args"], dtype=dtype)
