"""Linear (kernelised) attention with the feature map φ(x) = elu(x) + 1, normalised or not,
causal or not: its backward in the paper's index-free style.

One head, Q = φ(q), K = φ(k) (T, D), V = v (T, Dv), M the causal mask (all ones when not causal):
Forward:   A = (Q K^T) ∘ M                                                   (T, T)
           normalised:   out = (A V) ⊘ (A 1)        unnormalised:   out = A V  (T, Dv)
Backward:  den = A 1 (T, 1) (den = 1 when unnormalised)
           Δ_num = Δ ⊘ den;   Δ_den = -rowsum(Δ ∘ out) ⊘ den   (Δ_den = 0 when unnormalised)
           dA = (Δ_num V^T + Δ_den 1^T) ∘ M
           dQ = dA K;   dK = dA^T Q;   dV = A^T Δ_num;   dq = dQ ∘ φ'(q),  dk = dK ∘ φ'(k)
           φ'(x) = 1 where x > 0, exp(x) elsewhere.
The T x T matrix A never needs to exist: with the prefix sums (row t sums over s <= t)
           S_t = Σ_{s<=t} K_s^T V_s (D, Dv),   z_t = Σ_{s<=t} K_s (D)
and the suffix sums (over s >= t)
           R_t = Σ_{s>=t} Q_s^T Δ_num,s (D, Dv),   r_t = Σ_{s>=t} Δ_den,s Q_s (D)
the same formulas read, token by token,
           out_t = Q_t S_t ⊘ (Q_t · z_t)
           dQ_t = Δ_num,t S_t^T + Δ_den,t z_t;   dK_t = V_t R_t^T + r_t;   dV_t = K_t R_t
which is O(T D Dv) work instead of O(T² D). Without the causal mask S, z, R, r are the
full sums. The key bias gets no special treatment: φ(k + b_k) is not a row shift of the
scores, so db_k = Σ_tokens dk is not 0 in general.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from manual_grad.vjp import manual_vjp

__all__ = ["linear_attend", "linear_attend_fwd", "linear_attend_bwd", "linear_attend_ref",
           "elu_plus_one", "elu_plus_one_grad"]


def elu_plus_one(x):
    """φ(x) = elu(x) + 1 > 0."""
    return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))


def elu_plus_one_grad(x):
    """φ'(x) = 1 where x > 0, exp(x) elsewhere."""
    return jnp.where(x > 0, 1.0, jnp.exp(jnp.minimum(x, 0.0))).astype(x.dtype)


def _prefix(x, causal):
    """Σ_{s<=t} x_s along the token axis (-3 for outer products, see callers), or the full sum."""
    return jnp.cumsum(x, axis=-3) if causal else jnp.broadcast_to(x.sum(-3, keepdims=True), x.shape)


def _suffix(x, causal):
    """Σ_{s>=t} x_s along the token axis, or the full sum."""
    return jnp.flip(jnp.cumsum(jnp.flip(x, -3), axis=-3), -3) if causal else _prefix(x, False)


def _kv_state(K, v, causal):
    """(S_t (B, H, T, D, Dv), z_t (B, H, T, D)): prefix sums of K_s^T V_s and of K_s."""
    S = _prefix(K[..., :, None] * v[..., None, :], causal)                     # (B, H, T, D, Dv)
    z = _prefix(K[..., None], causal)[..., 0]                                  # (B, H, T, D)
    return S, z


def linear_attend_fwd(q, k, v, *, causal=True, normalise=True):
    """``out_t = φ(q_t) S_t ⊘ (φ(q_t) · z_t)`` (or ``φ(q_t) S_t``): (B, H, T, D) -> (B, H, T, Dv).

    Saves q, k, v, out (B, H, T, ·) and den (B, H, T, 1); the prefix sums S (T·D·Dv per head)
    are recomputed in the backward rather than stored.
    """
    Q, K = elu_plus_one(q), elu_plus_one(k)
    S, z = _kv_state(K, v, causal)
    num = jnp.einsum("...td,...tde->...te", Q, S)                              # Q_t S_t: (B, H, T, Dv)
    den = (Q * z).sum(-1, keepdims=True) if normalise else jnp.ones_like(num[..., :1])
    out = num / den
    return out, (q, k, v, out, den)


def linear_attend_bwd(causal, normalise, residuals, dout):
    q, k, v, out, den = residuals
    Q, K = elu_plus_one(q), elu_plus_one(k)
    S, z = _kv_state(K, v, causal)
    dnum = dout / den                                                          # Δ_num: (B, H, T, Dv)
    dQ = jnp.einsum("...tde,...te->...td", S, dnum)                            # Δ_num,t S_t^T: (T, D)
    R = _suffix(Q[..., :, None] * dnum[..., None, :], causal)                  # R_t: (B, H, T, D, Dv)
    dK = jnp.einsum("...tde,...te->...td", R, v)                               # V_t R_t^T: (T, D)
    dv = jnp.einsum("...tde,...td->...te", R, K)                               # K_t R_t: (T, Dv)
    if normalise:
        dden = -(dout * out).sum(-1, keepdims=True) / den                      # Δ_den: (B, H, T, 1)
        dQ = dQ + dden * z                                                     # + Δ_den,t z_t
        dK = dK + _suffix((dden * Q)[..., None], causal)[..., 0]               # + r_t
    return dQ * elu_plus_one_grad(q), dK * elu_plus_one_grad(k), dv


linear_attend = manual_vjp(linear_attend_fwd, linear_attend_bwd,
                           shapes=dict(q="... T D", k="... T D", v="... T Dv"))


def linear_attend_ref(q, k, v, *, causal=True, normalise=True):
    """Plain-jnp twin in the quadratic form ``A = (φ(q) φ(k)^T) ∘ M``, ``out = A V ⊘ A 1``."""
    Q, K = jax.nn.elu(q) + 1.0, jax.nn.elu(k) + 1.0
    A = Q @ K.swapaxes(-1, -2)                                                 # (B, H, T, T)
    if causal:
        T = q.shape[-2]
        A = jnp.where(jnp.tril(jnp.ones((T, T), bool)), A, 0.0)
    out = A @ v
    return out / A.sum(-1, keepdims=True) if normalise else out
