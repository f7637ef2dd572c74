"""LoRA: a frozen linear layer plus a trainable low-rank update.

Forward:   y = x W + b + s · (x A) B         A: (in, r), B: (r, out), B starts at 0
Backward:  dx = Δ W^T + s Δ (A B)^T
           dA = s x^T (Δ B^T)                dB = s (x A)^T Δ
           dW = x^T Δ,  db = Σ_tokens Δ       (exact, but never asked for when W is frozen:
                                               under ``jit`` XLA then drops their computation)
Tangent:   dy = dx W + x dW + db + s · ((dx A + x dA) B + (x A) dB)

The scale ``s`` is ``alpha / rank`` (original LoRA paper, Hugging Face PEFT; the default)
or ``alpha`` itself (the paper's convention): see :func:`lora_scale`.

``lora_project_fwd``/``lora_project_bwd`` are the plain functions behind every projection
that can carry adapters (attention q, k, v and output, MLP expand and contract, logits):
the weight's output columns are split into equal named ``parts`` (``("q", "k", "v")`` for the
fused attention input projection) and each part may carry its own adapter
``{"a": (in, r), "b": (r, out / len(parts))}``.
"""
from __future__ import annotations

import jax.numpy as jnp

from manual_grad.config import SCALE_CONVENTIONS, lora_scale
from manual_grad.layers.linear import linear_bwd, linear_fwd, linear_jvp, linear_ref, matmul_tokens
from manual_grad.vjp import manual_vjp

__all__ = ["lora_linear", "lora_linear_fwd", "lora_linear_bwd", "lora_linear_jvp", "lora_linear_ref",
           "lora_project_fwd", "lora_project_bwd", "lora_project_jvp", "lora_project_ref", "lora_scale",
           "SCALE_CONVENTIONS"]

def _part_columns(width, parts, name):
    """Columns of part ``name`` when ``width`` output columns are split evenly into ``parts``."""
    size = width // len(parts)
    start = parts.index(name) * size
    return start, start + size


def lora_project_fwd(x, w, b, adapters, *, parts, scale):
    """``y = x w + b`` plus ``s (x A_p) B_p`` on the columns of each adapted part ``p``.

    Returns ``(y, xa)`` where ``xa[p] = x A_p`` (..., r) is what the backward needs beyond x.
    """
    y, _ = linear_fwd(x, w, b)                                 # (..., in) x (in, out) -> (..., out)
    xa = {}
    for name, adapter in adapters.items():
        xa[name] = x @ adapter["a"]                            # (..., in) x (in, r) -> (..., r)
        start, stop = _part_columns(w.shape[-1], parts, name)
        y = y.at[..., start:stop].add(scale * (xa[name] @ adapter["b"]))
    return y, xa


def lora_project_bwd(x, w, b, adapters, xa, dy, *, parts, scale):
    """Backward of :func:`lora_project_fwd`: ``(dx, dw, db, dadapters)``."""
    dx, dw, db = linear_bwd((x, w, b), dy)
    dadapters = {}
    for name, adapter in adapters.items():
        start, stop = _part_columns(w.shape[-1], parts, name)
        dy_part = dy[..., start:stop]                          # (..., out_p)
        dxa = scale * (dy_part @ adapter["b"].T)               # s Δ B^T: (..., out_p) x (out_p, r) -> (..., r)
        dadapters[name] = {
            "a": matmul_tokens(x, dxa).astype(adapter["a"].dtype),                  # s x^T (Δ B^T)
            "b": (scale * matmul_tokens(xa[name], dy_part)).astype(adapter["b"].dtype),  # s (xA)^T Δ
        }
        dx = dx + dxa @ adapter["a"].T                         # s Δ (A B)^T: (..., r) x (r, in)
    return dx, dw, db, dadapters


def lora_project_jvp(x, w, b, adapters, xa, dx, dw, db, dadapters, *, parts, scale):
    """Tangent of :func:`lora_project_fwd`'s y from the tangents of x, w, b and the adapters."""
    dy = linear_jvp((x, w, b), (dx, dw, db))
    for name, adapter in adapters.items():
        start, stop = _part_columns(w.shape[-1], parts, name)
        da, db_ = dadapters[name]["a"], dadapters[name]["b"]
        dxa = dx @ adapter["a"] + x @ da                       # (..., in) x (in, r) -> (..., r)
        dy = dy.at[..., start:stop].add(scale * (dxa @ adapter["b"] + xa[name] @ db_))
    return dy


def lora_project_ref(x, w, b, adapters, *, parts, scale):
    """Plain-jnp twin of :func:`lora_project_fwd`."""
    y = linear_ref(x, w, b)
    for name, adapter in adapters.items():
        start, stop = _part_columns(w.shape[-1], parts, name)
        y = y.at[..., start:stop].add(scale * ((x @ adapter["a"]) @ adapter["b"]))
    return y


# --- the LoRA linear layer as an op -------------------------------------------------------

def lora_linear_fwd(x, w, bias, lora_a, lora_b, *, scale):
    """``y = x W + bias + scale · (x A) B``. Saves x, the parameters and ``x A`` (..., r)."""
    adapters = {"w": {"a": lora_a, "b": lora_b}}
    y, xa = lora_project_fwd(x, w, bias, adapters, parts=("w",), scale=scale)
    return y, (x, w, bias, adapters, xa)


def lora_linear_bwd(scale, residuals, dy):
    x, w, bias, adapters, xa = residuals
    dx, dw, dbias, dadapters = lora_project_bwd(x, w, bias, adapters, xa, dy, parts=("w",), scale=scale)
    return dx, dw, dbias, dadapters["w"]["a"], dadapters["w"]["b"]


def lora_linear_jvp(residuals, tangents, *, scale):
    x, w, bias, adapters, xa = residuals
    dx, dw, dbias, da, db = tangents
    return lora_project_jvp(x, w, bias, adapters, xa, dx, dw, dbias, {"w": {"a": da, "b": db}},
                            parts=("w",), scale=scale)


lora_linear = manual_vjp(lora_linear_fwd, lora_linear_bwd, jvp=lora_linear_jvp, shapes=dict(
    x="... C_in", w="C_in C_out", bias="optional C_out", lora_a="C_in r", lora_b="r C_out"))


def lora_linear_ref(x, w, bias, lora_a, lora_b, *, scale):
    """Plain-jnp twin of :func:`lora_linear`."""
    return linear_ref(x, w, bias) + scale * ((x @ lora_a) @ lora_b)
