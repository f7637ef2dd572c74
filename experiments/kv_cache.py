"""Experiment 9: does a key/value cache make each new token O(T)?

The paper: with a cache, a new token computes its own q, k, v and attends over the T cached
positions, O(T) per token (O(T·C) for attention plus O(C²) for the projections and the MLP);
without one, every token recomputes the whole context, O(T²) attention plus O(T·C²) projections.

Measured: the time of producing the next token's logits at context length T, with the library's
decoding step (:func:`manual_grad.generate`'s ``_run``) (a) cached: one new token at position T - 1
over a cache of T positions, (b) recomputed: the whole context of T tokens through the model, as
``generate`` does once the context is cropped. Median of repeated calls, jitted, float32, batch 1.
Slopes are least-squares fits of log(time) against log(T) over the larger half of the T's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad import GPTConfig, init_params
from manual_grad.generate import _empty_cache, _run
from experiments.common import new_figure, parse_args, plot_lines, save_figure, time_call, write_result

NAME = "kv_cache"


def decode_times(cfg, params, lengths, repeats):
    """{"cached": {T: s}, "recomputed": {T: s}}: the next token's logits at context length T."""
    cached = jax.jit(lambda p, token, cache, pos: _run(p, cfg, token, pos, cache)[0])
    recomputed = jax.jit(lambda p, context: _run(p, cfg, context, 0, _empty_cache(cfg, 1, context.shape[1],
                                                                                   jnp.float32))[0])
    out = {"cached": {}, "recomputed": {}}
    for T in lengths:
        context = jax.random.randint(jax.random.key(T), (1, T), 0, cfg.vocab_size)
        _, cache = _run(params, cfg, context[:, :-1], 0, _empty_cache(cfg, 1, T, jnp.float32))  # T - 1 cached
        out["cached"][T] = time_call(cached, params, context[:, -1:], cache, T - 1, repeats=repeats)
        out["recomputed"][T] = time_call(recomputed, params, context, repeats=repeats)
    return out


def slope(lengths, seconds):
    """Exponent a of time ~ T^a: least squares on log-log over the larger half of the lengths."""
    half = lengths[len(lengths) // 2:]
    return float(np.polyfit(np.log(half), np.log([seconds[T] for T in half]), 1)[0])


def main(argv=None):
    args = parse_args(__doc__, argv)
    quick = args.quick
    lengths = (8, 16, 32) if quick else (32, 64, 128, 256, 512, 1024, 2048)
    cfg = GPTConfig(vocab_size=65, block_size=max(lengths), n_layer=1 if quick else 2, n_head=2 if quick else 4,
                    n_embd=16 if quick else 64)
    params = init_params(cfg, jax.random.key(0))
    times = decode_times(cfg, params, lengths, repeats=3 if quick else 15)
    slopes = {kind: slope(lengths, t) for kind, t in times.items()}
    speedup = {T: times["recomputed"][T] / times["cached"][T] for T in lengths}
    verdict = (f"per-token time ~ T^{slopes['cached']:.2f} with the cache and T^{slopes['recomputed']:.2f} "
               f"recomputing the context (fits over T >= {lengths[len(lengths) // 2]}); the cache is "
               f"{speedup[lengths[-1]]:.0f}x faster at T = {lengths[-1]}")
    fig, (ax,) = new_figure()
    plot_lines(ax, {f"{kind} (slope {slopes[kind]:.2f})": (lengths, [t[T] * 1e3 for T in lengths])
                    for kind, t in times.items()}, xlabel="context length T", ylabel="next token, ms",
               title=f"decode step, {cfg.n_layer} blocks, C={cfg.n_embd}, batch 1", logx=2, logy=True, style="o-")
    plot = save_figure(fig, args.out, NAME)
    path = write_result(args.out, NAME, {"config": cfg.to_dict(), "lengths": list(lengths), "seconds": times,
                                         "slopes": slopes, "speedup_cached": speedup, "verdict": verdict,
                                         "plot": plot}, quick)
    print(verdict)
    print(path)


if __name__ == "__main__":
    main()
