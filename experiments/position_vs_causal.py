"""Experiment 4 (open question 1): are explicit position embeddings needed under a causal mask?

(a) Without position embeddings, non-causal self-attention is permutation-equivariant:
    permuting the input tokens permutes the logits (measured to rounding, float64); with the
    causal mask it is not.
(b) Same model, same budget, same batches on tinyshakespeare: learned positions + causal;
    no positions (NoPE: wpe zeroed and frozen) + causal; NoPE + non-causal as the control
    (a permutation-equivariant model sees each position's own token and the unordered bag
    of the window's tokens, which includes the targets).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad import GPTConfig, forward, init_params
from experiments.common import (OPTIMIZER, fixed_batches, load_chars, new_figure, parse_args, plot_lines,
                                save_figure, split_ids, train, write_result)

NAME = "position_vs_causal"
SEEDS = (0, 1, 2)
LEARNED, NOPE, CONTROL = "learned positions, causal", "no positions (NoPE), causal", "no positions, non-causal (control)"


def nope(params):
    """The same parameters with the position table zeroed."""
    return {**params, "wpe": jnp.zeros_like(params["wpe"])}


def equivariance_error(cfg, params, key, B=2):
    """max |logits(x[perm]) - logits(x)[perm]| / max |logits| for a random permutation."""
    k1, k2 = jax.random.split(key)
    x = jax.random.randint(k1, (B, cfg.block_size), 0, cfg.vocab_size)
    perm = jax.random.permutation(k2, cfg.block_size)
    logits = forward(params, x, cfg)
    permuted = forward(params, x[:, perm], cfg)
    return float(jnp.max(jnp.abs(permuted - logits[:, perm])) / jnp.max(jnp.abs(logits)))


def main(argv=None):
    args = parse_args(__doc__, argv)
    ids, vocab = load_chars(args.data)
    train_ids, val_ids = split_ids(ids)
    quick = args.quick
    size = dict(n_layer=1, n_head=2, n_embd=16, block_size=16) if quick else \
        dict(n_layer=2, n_head=4, n_embd=64, block_size=64)
    steps, batch = (20, 4) if quick else (600, 16)
    cfg = GPTConfig(vocab_size=len(vocab), **size)

    jax.config.update("jax_enable_x64", True)
    cfg64 = cfg.replace(dtype="float64")
    p64 = init_params(cfg64, jax.random.key(0))
    equivariance = {
        "noncausal_nope": equivariance_error(cfg64.replace(causal=False), nope(p64), jax.random.key(1)),
        "causal_nope": equivariance_error(cfg64, nope(p64), jax.random.key(1)),
        "noncausal_learned_positions": equivariance_error(cfg64.replace(causal=False), p64, jax.random.key(1)),
    }
    jax.config.update("jax_enable_x64", False)

    val = fixed_batches(val_ids, 2 if quick else 8, batch, cfg.block_size)
    seeds = (0, 1) if quick else SEEDS
    runs, final_by_seed = {}, {}
    for seed in seeds:                       # the seed sets the initial parameters and the batch order
        params = init_params(cfg, jax.random.key(seed))
        frozen_wpe = jax.tree.map(lambda _: True, params) | {"wpe": False}
        for name, run_cfg, p, trainable in (
                (LEARNED, cfg, params, None),
                (NOPE, cfg, nope(params), frozen_wpe),
                (CONTROL, cfg.replace(causal=False), nope(params), frozen_wpe)):
            curves, final = train(p, run_cfg, train_ids, val, steps=steps, batch=batch, lr=1e-3, weight_decay=0.1,
                                  seed=seed, trainable=trainable, eval_every=max(steps // 20, 1))
            curves["wpe_max_abs_after"] = float(jnp.max(jnp.abs(final["wpe"])))
            final_by_seed.setdefault(name, []).append(curves["val_loss"][-1])
            if seed == seeds[0]:
                runs[name] = curves
    gaps = np.subtract(final_by_seed[NOPE], final_by_seed[LEARNED])
    final = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))} for k, v in final_by_seed.items()}
    gap = {"per_seed": gaps.tolist(), "mean": float(gaps.mean()), "std": float(gaps.std(ddof=1))}
    verdict = (f"non-causal NoPE is permutation-equivariant (rel. error {equivariance['noncausal_nope']:.1e}), "
               f"causal NoPE is not ({equivariance['causal_nope']:.2g}); final val loss over {len(seeds)} seeds: "
               f"learned {final[LEARNED]['mean']:.4f} ± {final[LEARNED]['std']:.4f}, NoPE {final[NOPE]['mean']:.4f} "
               f"± {final[NOPE]['std']:.4f} (gap {gap['mean']:+.4f} ± {gap['std']:.4f}), control "
               f"{final[CONTROL]['mean']:.4f}")
    fig, (ax,) = new_figure()
    plot_lines(ax, {name: (c["step"], c["val_loss"]) for name, c in runs.items()}, xlabel="step",
               ylabel="val loss (nats/char)", title=f"position embeddings vs causal mask (seed {seeds[0]})")
    plot = save_figure(fig, args.out, NAME)
    path = write_result(args.out, NAME, {"config": cfg.to_dict(), "steps": steps, "batch": batch,
                                         "optimizer": f"{OPTIMIZER}, lr=1e-3, weight decay 0.1",
                                         "equivariance_rel_error": equivariance, "seeds": list(seeds),
                                         "runs_first_seed": runs, "final_val_loss_by_seed": final_by_seed,
                                         "final_val_loss": final, "nope_minus_learned": gap,
                                         "verdict": verdict, "plot": plot}, quick)
    print(verdict)
    print(path)


if __name__ == "__main__":
    main()
