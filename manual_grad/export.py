"""A finished run as a Hugging Face GPT-2 folder: ``manual-grad export --out-dir RUN --to DIR``.

The folder holds ``config.json`` and ``model.safetensors`` (written with the ``safetensors``
package, numpy only: no torch needed) and, for a run with the GPT-2 BPE tokenizer,
``vocab.json`` and ``merges.txt``; ``transformers.GPT2LMHeadModel.from_pretrained(DIR)``
computes the same logits. A LoRA fine-tune is merged first (``W + s A B``). A character- or
byte-level run exports its weights with ``vocab_size`` from the run; its token ids are the
tokenizer's (``CharTokenizer.chars[i]`` is id i, bytes are their value), for which Hugging
Face has no tokenizer class, so no tokenizer file is written.

What GPT-2 cannot represent is refused with a ``ValueError`` naming it (an lm_head bias,
linear layers without bias, a non-causal model, an activation other than GELU tanh / ReLU),
by :func:`manual_grad.interop.hf.config_to_hf`.
"""
from __future__ import annotations

import os
from pathlib import Path

from manual_grad.interop.hf import save_gpt2
from manual_grad.loading import load_model
from manual_grad.model import merge_lora
from manual_grad.paths import PathError, check_out_dir, path_errors

__all__ = ["export_hf", "EXPORTED_FILES"]

EXPORTED_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")


def export_hf(run_dir: str | os.PathLike, to: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes the model of ``run_dir`` (a run folder or checkpoint file) as a GPT-2 folder ``to``;
    returns its path. An earlier export in ``to`` is replaced only with ``overwrite``."""
    params, cfg, tokenizer = load_model(run_dir)
    if "lora" in params:
        params, cfg = merge_lora(params, cfg)
    folder = check_out_dir("--to", to)
    present = [name for name in EXPORTED_FILES if (folder / name).exists()]
    if present and not overwrite:
        raise PathError(f"--to {os.fspath(folder)!r} already holds {', '.join(present)}: "
                        "replace them with --overwrite or choose another folder")
    with path_errors("--to", folder):
        save_gpt2(params, cfg, folder)
        for name in ("vocab.json", "merges.txt"):
            if (folder / name).exists():
                (folder / name).unlink()
        if tokenizer.kind == "gpt2":
            tokenizer.save(folder)
    return folder
