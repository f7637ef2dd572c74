"""Logits (tied to the token embedding, or untied with optional bias) and softmax
cross-entropy on next-token targets.

Logits:   z = x W_out + b,  with W_out = W_tok^T when tied                     (B, T, V)
Loss:     L = (1/N) Σ_{counted tokens} (logsumexp(z_t) - z_t[target_t]),  N = #counted
          a target of -100 is ignored; with no counted token L = 0 and every gradient is 0.
Backward: Δ_z = (softmax(z) - onehot(target)) ∘ counted / N, then the linear layer's
          dx = Δ_z W_out^T,  dW_out = x^T Δ_z,  db = Σ_tokens Δ_z.
Tangent:  dz = dx W_out + x dW_out + db;   dL = (1/N) Σ_{counted} (softmax(z_t) · dz_t - dz_t[target_t]).
The logits are computed in the compute dtype; log-sum-exp, softmax and the loss in at least
float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from manual_grad.config import BACKWARDS, check_choice
from manual_grad.layers.attention import tile_size
from manual_grad.layers.lora import lora_project_bwd, lora_project_fwd, lora_project_jvp, lora_project_ref
from manual_grad.vjp import forward_mode_error, manual_vjp

__all__ = ["IGNORE_INDEX", "logits", "logits_fwd", "logits_bwd", "logits_jvp", "logits_ref",
           "logits_loss", "logits_loss_fwd", "logits_loss_bwd", "logits_loss_jvp", "logits_loss_ref"]

IGNORE_INDEX = -100


def _out_weight(w, tied):
    """W_out (C, V): the embedding (V, C) transposed when tied, else the head itself."""
    return w.T if tied else w


def _check_adapters(adapters):
    unknown = set(adapters) - {"logits"}
    if unknown:
        raise ValueError(f"adapters: unknown logits adapter(s) {sorted(unknown)}; expected 'logits'")


# --- logits alone (generation, evaluation) ----------------------------------------------

def logits_fwd(x, w, b, adapters, *, tied, lora_scale=1.0):
    """``z = x W_out + b`` (+ LoRA "logits"). ``w`` is (V, C) when tied, (C, V) otherwise.

    Saves x (B, T, C), the parameters and ``x A`` (B, T, r) when adapted.
    """
    _check_adapters(adapters)
    z, xa = lora_project_fwd(x, _out_weight(w, tied), b, adapters, parts=("logits",), scale=lora_scale)
    return z, (x, w, b, adapters, xa)


def logits_bwd(tied, lora_scale, residuals, dz):
    x, w, b, adapters, xa = residuals
    dx, dw, db, dadapters = lora_project_bwd(
        x, _out_weight(w, tied), b, adapters, xa, dz, parts=("logits",), scale=lora_scale)
    return dx, _out_weight(dw, tied), db, dadapters


def _head_shapes(tied, x="... C", **extra):
    """Input specs of the head: W_out is the (V, C) embedding when tied, a (C, V) matrix if not."""
    return dict(x=x, w="V C" if tied else "C V", b="optional V", **extra)


def logits_jvp(residuals, tangents, *, tied, lora_scale=1.0):
    x, w, b, adapters, xa = residuals
    dx, dw, db, dadapters = tangents
    return lora_project_jvp(x, _out_weight(w, tied), b, adapters, xa, dx, _out_weight(dw, tied), db,
                            dadapters, parts=("logits",), scale=lora_scale)              # (B, T, V)


logits = manual_vjp(logits_fwd, logits_bwd, jvp=logits_jvp, shapes=lambda tied, **_: _head_shapes(tied))


def logits_ref(x, w, b, adapters, *, tied, lora_scale=1.0):
    """Plain-jnp twin of :func:`logits`."""
    _check_adapters(adapters)
    return lora_project_ref(x, _out_weight(w, tied), b, adapters, parts=("logits",), scale=lora_scale)


# --- logits + cross-entropy, fused ------------------------------------------------------

def _counted(targets):
    """(mask of counted tokens, N = max(#counted, 1))."""
    counted = targets != IGNORE_INDEX
    return counted, jnp.maximum(counted.sum(), 1)


def _token_nll(z, targets):
    """(lse, nll) per token of logits z (..., V), in at least float32; nll is 0 where ignored."""
    z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    z_max = jax.lax.stop_gradient(z.max(-1, keepdims=True))
    lse = jnp.log(jnp.exp(z - z_max).sum(-1)) + z_max[..., 0]                           # (...,)
    counted = targets != IGNORE_INDEX
    z_target = jnp.take_along_axis(z, jnp.where(counted, targets, 0)[..., None], -1)[..., 0]
    return lse, jnp.where(counted, lse - z_target, 0)


def _dlogits(z, lse, targets, scale):
    """Δ_z = (softmax(z) - onehot(target)) ∘ counted · scale, softmax rebuilt from lse (..., V)."""
    probs = jnp.exp(z.astype(lse.dtype) - lse[..., None])
    onehot = jax.nn.one_hot(targets, z.shape[-1], dtype=lse.dtype)                    # 0 row for -100
    return ((probs - onehot) * ((targets != IGNORE_INDEX) * scale)[..., None]).astype(z.dtype)


def _time_chunks(a, size, fill):
    """(B, T, ...) -> (n_chunks, B, size, ...) along time, padding the last chunk with ``fill``.
    The batch axis stays whole, so a batch sharded over devices stays sharded."""
    n_chunks = -(-a.shape[1] // size)
    pad = [(0, 0), (0, n_chunks * size - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    a = jnp.pad(a, pad, constant_values=fill)
    return jnp.moveaxis(a.reshape(a.shape[0], n_chunks, size, *a.shape[2:]), 1, 0)


def _unchunk(a, T):
    """(n_chunks, B, size, ...) -> (B, T, ...)."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :T]


def _chunk_positions(targets, chunk):
    """Positions per chunk so that a chunk holds at most about ``chunk`` tokens of the whole
    batch, balanced like attention's tiles so that the last chunk is padded by as few
    positions as possible."""
    B, T = targets.shape
    return tile_size(T, max(1, chunk // B))


def _one_pass(targets, backward, chunk):
    """True when the logits are kept, not recomputed: ``backward="paper"``, or one chunk would hold
    the whole batch. The backward needs a (B, T, V) Δ_z then anyway, and the loss's forward
    is the last op before its backward, so keeping z adds nothing to the peak and spares the
    GEMM that would recompute it. (XLA:CPU already merges that recomputation with the
    forward's product when the scan has one step, 3 GEMMs either way; this makes it hold
    whatever the compiler does.)"""
    return backward == "paper" or _chunk_positions(targets, chunk) >= targets.shape[1]


def logits_loss_fwd(x, w, b, targets, adapters, *, tied, lora_scale=1.0, backward="paper", chunk=1024, core=None):
    """Mean cross-entropy of ``z = x W_out + b`` against ``targets`` (-100 = ignored).

    ``backward="paper"`` saves x (B, T, C), the parameters and the logits (B, T, V).
    ``backward="lean"`` saves only the per-token log-sum-exp (B, T): both passes then run
    over about ``chunk`` tokens at a time (all of the batch, chunk / B positions), so no
    (B, T, V) array of logits or of their gradient ever exists. When one chunk would hold
    every token, the logits are kept as with ``"paper"`` (see :func:`_one_pass`). ``core``: an op on
    (x, w, b, targets) with the setting ``tied``, made by ``manual_vjp`` (a fused Pallas
    kernel, :mod:`manual_grad.kernels`), used instead when there is no adapter; the layer
    saves its residuals.
    """
    _check_adapters(adapters)
    check_choice("backward", backward, BACKWARDS)
    if core is not None and not adapters:
        loss, core_residuals = core.fwd(x, w, b, targets, tied=tied)
        return loss, (x, w, b, targets, adapters, None, core_residuals)
    n = _counted(targets)[1]
    if _one_pass(targets, backward, chunk):
        z, (_, _, _, _, xa) = logits_fwd(x, w, b, adapters, tied=tied, lora_scale=lora_scale)
        lse, nll = _token_nll(z, targets)
        return nll.sum() / n, (x, w, b, targets, adapters, xa, (z, lse))

    w_out, size = _out_weight(w, tied), _chunk_positions(targets, chunk)

    def loss_chunk(total, chunk_inputs):
        x_c, t_c = chunk_inputs                                                      # (B, c, C), (B, c)
        z, _ = lora_project_fwd(x_c, w_out, b, adapters, parts=("logits",), scale=lora_scale)  # (B, c, V)
        lse, nll = _token_nll(z, t_c)
        return total + nll.sum(), lse

    total, lse = jax.lax.scan(loss_chunk, jnp.zeros((), jnp.promote_types(x.dtype, jnp.float32)),
                              (_time_chunks(x, size, 0), _time_chunks(targets, size, IGNORE_INDEX)))
    return total / n, (x, w, b, targets, adapters, None, _unchunk(lse, targets.shape[1]))    # lse: (B, T)


def logits_loss_bwd(tied, lora_scale, backward, chunk, core, residuals, dloss):
    x, w, b, targets, adapters, xa, softmax_state = residuals
    if core is not None and not adapters:
        dx, dw, db, _ = core.bwd(tied, softmax_state, dloss)
        return dx, dw, db, None, adapters
    scale = dloss / _counted(targets)[1]
    if _one_pass(targets, backward, chunk):
        z, lse = softmax_state
        dz = _dlogits(z, lse, targets, scale)                                        # Δ_z: (B, T, V)
        dx, dw, db, dadapters = logits_bwd(tied, lora_scale, (x, w, b, adapters, xa), dz)
        return dx, dw, db, None, dadapters

    w_out, size = _out_weight(w, tied), _chunk_positions(targets, chunk)

    def grad_chunk(grads, chunk_inputs):
        x_c, t_c, lse_c = chunk_inputs                                               # (B, c, ...)
        z, xa_c = lora_project_fwd(x_c, w_out, b, adapters, parts=("logits",), scale=lora_scale)
        dz = _dlogits(z, lse_c, t_c, scale)                                          # (B, c, V)
        dx_c, *chunk_grads = lora_project_bwd(x_c, w_out, b, adapters, xa_c, dz,
                                               parts=("logits",), scale=lora_scale)
        return jax.tree.map(jnp.add, grads, tuple(chunk_grads)), dx_c

    zero_grads = jax.tree.map(jnp.zeros_like, (w_out, b, adapters))
    (dw, db, dadapters), dx = jax.lax.scan(
        grad_chunk, zero_grads, (_time_chunks(x, size, 0), _time_chunks(targets, size, IGNORE_INDEX),
                                 _time_chunks(softmax_state, size, 0)))
    return _unchunk(dx, x.shape[1]), _out_weight(dw, tied), db, None, dadapters


def _dloss(z, lse, targets, dz):
    """dL = (1/N) Σ_counted (softmax(z_t) · dz_t - dz_t[target_t]), in at least float32."""
    dz = dz.astype(lse.dtype)
    probs = jnp.exp(z.astype(lse.dtype) - lse[..., None])                            # (B, T, V)
    counted, n = _counted(targets)
    dz_target = jnp.take_along_axis(dz, jnp.where(counted, targets, 0)[..., None], -1)[..., 0]
    return jnp.where(counted, (probs * dz).sum(-1) - dz_target, 0).sum() / n


def logits_loss_jvp(residuals, tangents, *, tied, lora_scale=1.0, core=None, **_):
    """Tangent of the loss. With chunks the logits are rebuilt whole, so forward mode holds a
    (B, T, V) array (reverse mode does not)."""
    x, w, b, targets, adapters, xa, softmax_state = residuals
    dx, dw, db, _, dadapters = tangents
    if core is not None and not adapters:
        if core.jvp is None:
            raise forward_mode_error(f"logits_loss (core {core.__name__})")
        return core.jvp(softmax_state, (dx, dw, db, None), tied=tied)
    if isinstance(softmax_state, tuple):
        z, lse = softmax_state                                                       # kept logits
    else:
        lse = softmax_state
        z, xa = lora_project_fwd(x, _out_weight(w, tied), b, adapters, parts=("logits",), scale=lora_scale)
    dz = logits_jvp((x, w, b, adapters, xa), (dx, dw, db, dadapters), tied=tied, lora_scale=lora_scale)
    return _dloss(z, lse, targets, dz)


logits_loss = manual_vjp(logits_loss_fwd, logits_loss_bwd, jvp=logits_loss_jvp,
                         shapes=lambda tied, **_: _head_shapes(tied, "B T C", targets="int B T"))


def logits_loss_ref(x, w, b, targets, adapters, *, tied, lora_scale=1.0, backward="paper", chunk=1024, core=None):
    """Plain-jnp twin of :func:`logits_loss` (``backward``, ``chunk`` and ``core`` only change the manual op)."""
    z = logits_ref(x, w, b, adapters, tied=tied, lora_scale=lora_scale)
    return _token_nll(z, targets)[1].sum() / _counted(targets)[1]
