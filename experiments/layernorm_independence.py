"""Experiment 6: LayerNorm keeps tokens independent; normalising over tokens does not.

(a) The Jacobian of LayerNorm's output for token t with respect to the input of token s != t,
    computed from the hand-written backward (``jax.jacrev`` of the custom-VJP op), is exactly 0.
(b) The contrast: "token-norm", each feature normalised over the tokens of the sequence
    (batch-norm statistics taken along the sequence), differentiated by JAX. Its cross-token
    Jacobian blocks are not 0, and the gradient reaching a fixed token (fixed input, fixed
    upstream gradient) changes with the other tokens and with the sequence length: we measure
    the variance of that gradient over random contexts for each length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad.layers.layernorm import layernorm, layernorm_ref
from experiments.common import new_figure, parse_args, save_figure, write_result

NAME = "layernorm_independence"
EPS = 1e-5


def token_norm(x, scale, bias, *, eps=EPS):
    """Each feature normalised over the token axis: (T, C) statistics per column."""
    mean = x.mean(-2, keepdims=True)
    var = ((x - mean) ** 2).mean(-2, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def cross_token_jacobian(norm, x, scale, bias):
    """(max |J[t, :, s, :]| over t != s, min over t of max |J[t, :, t, :]|) for y = norm(x), x (T, C)."""
    J = np.asarray(jax.jacrev(lambda x: norm(x, scale, bias, eps=EPS))(x))     # (T, C, T, C)
    T = x.shape[0]
    blocks = np.abs(J).max(axis=(1, 3))                                          # (T, T)
    off = blocks[~np.eye(T, dtype=bool)]
    return float(off.max()) if off.size else 0.0, float(np.diag(blocks).min())


def gradient_spread(norm, lengths, contexts, C, key):
    """For each T: token 0's input and upstream gradient fixed, the other T - 1 tokens (inputs and
    upstream gradients) random; returns {T: (mean over features of the variance of dx_0 across
    contexts, max |dx_0 - dx_0 of the first context|, mean |dx_0|)}."""
    k0, k1 = jax.random.split(key)
    x0, g0 = jax.random.normal(k0, (2, C))
    scale, bias = jnp.ones(C), jnp.zeros(C)
    out = {}
    for T in lengths:
        keys = jax.random.split(jax.random.fold_in(k1, T), contexts)

        def dx0(k):
            kx, kg = jax.random.split(k)
            x = jnp.concatenate([x0[None], jax.random.normal(kx, (T - 1, C))])
            g = jnp.concatenate([g0[None], jax.random.normal(kg, (T - 1, C))])
            return jax.vjp(lambda x: norm(x, scale, bias, eps=EPS), x)[1](g)[0][0]
        grads = np.asarray(jax.vmap(dx0)(keys))                                 # (contexts, C)
        out[T] = (float(grads.var(axis=0).mean()), float(np.abs(grads - grads[:1]).max()),
                  float(np.abs(grads).mean()))
    return out


def main(argv=None):
    args = parse_args(__doc__, argv)
    jax.config.update("jax_enable_x64", True)
    T, C = (4, 6) if args.quick else (16, 32)
    x = jax.random.normal(jax.random.key(0), (T, C))
    scale = 1 + 0.1 * jax.random.normal(jax.random.key(1), (C,))
    bias = 0.1 * jax.random.normal(jax.random.key(2), (C,))
    jacobians = {name: dict(zip(("max_abs_cross_token", "min_of_max_abs_same_token"),
                                cross_token_jacobian(f, x, scale, bias)))
                 for name, f in (("layernorm (manual)", layernorm), ("layernorm (autodiff)", layernorm_ref),
                                 ("token-norm (autodiff)", token_norm))}
    lengths = (2, 4) if args.quick else (2, 4, 8, 16, 32, 64, 128, 256)
    contexts = 4 if args.quick else 256
    spread = {name: gradient_spread(f, lengths, contexts, C, jax.random.key(3))
              for name, f in (("layernorm (manual)", layernorm), ("token-norm", token_norm))}
    ln_spread = max(v[1] for v in spread["layernorm (manual)"].values())
    tn_var = {T: v[0] for T, v in spread["token-norm"].items()}
    verdict = (f"LayerNorm cross-token Jacobian max |J| = {jacobians['layernorm (manual)']['max_abs_cross_token']:g} "
               f"(exactly 0), token 0's gradient identical in every context and length (max difference {ln_spread:g}); "
               f"token-norm couples "
               f"tokens (max |J| = {jacobians['token-norm (autodiff)']['max_abs_cross_token']:.3g}) and its "
               f"gradient variance goes from {tn_var[lengths[0]]:.3g} (T={lengths[0]}) to "
               f"{tn_var[lengths[-1]]:.3g} (T={lengths[-1]})")
    fig, (ax,) = new_figure()
    ax.plot(lengths, [tn_var[t] for t in lengths], "o-", label="token-norm (statistics over tokens)")
    ax.plot(lengths, [max(spread["layernorm (manual)"][t][1] ** 2, 1e-35) for t in lengths], "s-",
            label="LayerNorm (max difference² = 0, drawn at 1e-35)")
    ax.set_xscale("log", base=2); ax.set_yscale("log")
    ax.set_xlabel("sequence length T"); ax.set_ylabel("variance of token 0's dx across contexts")
    ax.legend(); ax.set_title("does a token's gradient depend on the others?")
    plot = save_figure(fig, args.out, NAME)
    path = write_result(args.out, NAME, {"shape": [T, C], "eps": EPS, "jacobian": jacobians, "contexts": contexts,
                                         "token0_grad_variance_maxdiff_meanabs": spread, "verdict": verdict,
                                         "plot": plot}, args.quick)
    print(verdict)
    print(path)


if __name__ == "__main__":
    main()
