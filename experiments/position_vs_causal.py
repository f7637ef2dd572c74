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

from manual_grad import GPTConfig, forward, init_params
from experiments.common import (fixed_batches, load_chars, new_figure, parse_args, plot_lines, save_figure,
                                split_ids, train, write_result)

NAME = "position_vs_causal"


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
    params = init_params(cfg, jax.random.key(0))
    frozen_wpe = jax.tree.map(lambda _: True, params) | {"wpe": False}
    runs = {}
    for name, run_cfg, p, trainable in (
            ("learned positions, causal", cfg, params, None),
            ("no positions (NoPE), causal", cfg, nope(params), frozen_wpe),
            ("no positions, non-causal (control)", cfg.replace(causal=False), nope(params), frozen_wpe)):
        curves, final = train(p, run_cfg, train_ids, val, steps=steps, batch=batch, lr=1e-3, weight_decay=0.1,
                              seed=0, trainable=trainable, eval_every=max(steps // 20, 1))
        curves["wpe_max_abs_after"] = float(jnp.max(jnp.abs(final["wpe"])))
        runs[name] = curves
    final = {k: v["val_loss"][-1] for k, v in runs.items()}
    gap = final["no positions (NoPE), causal"] - final["learned positions, causal"]
    verdict = (f"non-causal NoPE is permutation-equivariant (rel. error {equivariance['noncausal_nope']:.1e}), "
               f"causal NoPE is not ({equivariance['causal_nope']:.2g}); final val loss learned "
               f"{final['learned positions, causal']:.4f} vs NoPE {final['no positions (NoPE), causal']:.4f} "
               f"(gap {gap:+.4f}), control {final['no positions, non-causal (control)']:.4f}")
    fig, (ax,) = new_figure()
    plot_lines(ax, {name: (c["step"], c["val_loss"]) for name, c in runs.items()}, xlabel="step",
               ylabel="val loss (nats/char)", title="position embeddings vs causal mask")
    plot = save_figure(fig, args.out, NAME)
    path = write_result(args.out, NAME, {"config": cfg.to_dict(), "steps": steps, "batch": batch,
                                         "optimizer": "adamw lr=1e-3 wd=0.1", "equivariance_rel_error": equivariance,
                                         "runs": runs, "final_val_loss": final, "nope_minus_learned": gap,
                                         "verdict": verdict, "plot": plot}, quick)
    print(verdict)
    print(path)


if __name__ == "__main__":
    main()
