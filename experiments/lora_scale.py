"""Experiment 5: the LoRA scale s in y = x W + s · x A B.

(a) The adapters' gradients dA = s x^T (Δ B^T), dB = s (x A)^T Δ scale exactly linearly with s for
    a fixed upstream Δ, whatever the rank; at the start of fine-tuning (B = 0, so the output does
    not depend on s) the whole model's dB is exactly s times its value at s = 1.
(b) A sweep alpha x rank under both conventions (s = alpha, the paper's; s = alpha / rank, LoRA /
    PEFT's), fine-tuning a small model pretrained on the first 80% of tinyshakespeare on held-out
    text (the last 20%, which it never saw), with AdamW; final val loss heat maps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad import GPTConfig, LoRAConfig, attach_lora, init_params, loss_fn
from manual_grad.layers.lora import lora_linear
from experiments.common import (OPTIMIZER, fixed_batches, load_chars, new_figure, parse_args, save_figure,
                                train, write_result)

NAME = "lora_scale"
ALPHAS = (1, 4, 16, 64, 256)
RANKS = (4, 16, 64)
CONVENTIONS = ("alpha", "alpha/rank")
TARGETS = ("q", "k", "v", "o", "fc", "proj")
FT_SEEDS = (1, 2, 3)


def layer_linearity(ranks, scales, n_in=64, n_out=48, tokens=32):
    """max over ranks, s of |dA(s) - s dA(1)| / |s dA(1)| (and for dB), float64, fixed random Δ."""
    errors = {}
    for r in ranks:
        k = jax.random.split(jax.random.key(r), 5)
        x, w = jax.random.normal(k[0], (tokens, n_in)), jax.random.normal(k[1], (n_in, n_out))
        a, b = jax.random.normal(k[2], (n_in, r)), jax.random.normal(k[3], (r, n_out))
        dy = jax.random.normal(k[4], (tokens, n_out))

        def grads(s):
            _, vjp = jax.vjp(lambda a, b: lora_linear(x, w, None, a, b, scale=s), a, b)
            return vjp(dy)

        da1, db1 = grads(1.0)
        for s in scales:
            da, db = grads(s)
            errors[f"rank={r}, s={s}"] = [float(jnp.linalg.norm(da - s * da1) / jnp.linalg.norm(s * da1)),
                                          float(jnp.linalg.norm(db - s * db1) / jnp.linalg.norm(s * db1))]
    return errors


def _factor(adapter_grads, name):
    """All the adapters' ``name`` ("a" or "b") gradients, flattened into one vector."""
    return jnp.concatenate([jnp.ravel(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(adapter_grads)
                            if path[-1].key == name])


def model_linearity(cfg, params, batch, ranks, alpha_values):
    """At B = 0: |dB(s) - s dB(1)| / |s dB(1)| and max |dA| over ranks and scales (convention "alpha")."""
    x, y = batch
    out = {}
    for r in ranks:
        def grads(alpha):
            c = cfg.replace(lora=LoRAConfig(r, float(alpha), TARGETS, "alpha"))
            p = attach_lora(params, c, jax.random.key(5))
            return jax.grad(loss_fn)(p, x, y, c)["lora"]
        g1 = grads(1.0)
        for alpha in alpha_values:
            g = grads(alpha)
            db, db1, da = _factor(g, "b"), _factor(g1, "b"), _factor(g, "a")
            out[f"rank={r}, s={alpha}"] = {"dB_rel_err": float(jnp.linalg.norm(db - alpha * db1)
                                                                / jnp.linalg.norm(alpha * db1)),
                                           "dA_max_abs": float(jnp.max(jnp.abs(da)))}
    return out


def draw_heatmaps(sweep, alphas, ranks, baseline, out):
    """Final val loss per (rank, alpha), one panel per convention; returns the PNG's name."""
    fig, axes = new_figure(2, width=5.2, constrained=True)
    grids = {conv: np.asarray(g, float) for conv, g in sweep.items()}
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin, vmax = float(finite.min()), float(min(finite.max(), baseline + 0.5))
    for ax, (convention, grid) in zip(axes, grids.items()):
        im = ax.imshow(np.where(np.isfinite(grid), grid, vmax), vmin=vmin, vmax=vmax, cmap="viridis_r")
        ax.set_xticks(range(len(alphas)), alphas)
        ax.set_yticks(range(len(ranks)), ranks)
        ax.set_xlabel("alpha")
        ax.set_ylabel("rank")
        ax.set_title(f"final val loss, s = {convention}")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, "nan" if not np.isfinite(v) else f"{v:.3f}", ha="center", va="center", fontsize=8,
                    color="w")
    fig.colorbar(im, ax=axes, shrink=0.9)
    return save_figure(fig, out, NAME)


def main(argv=None):
    args = parse_args(__doc__, argv)
    jax.config.update("jax_enable_x64", True)
    layer = layer_linearity(RANKS, (0.5, 2.0, 3.0, 16.0, 256.0))
    jax.config.update("jax_enable_x64", False)

    quick = args.quick
    ids, vocab = load_chars(args.data)
    cut = int(0.8 * len(ids))
    pre_ids, held = ids[:cut], ids[cut:]
    ft_cut = int(0.75 * len(held))
    ft_train, ft_val = held[:ft_cut], held[ft_cut:]
    size = dict(n_layer=1, n_head=2, n_embd=16, block_size=16) if quick else \
        dict(n_layer=2, n_head=4, n_embd=64, block_size=64)
    pre_steps, ft_steps, batch = (20, 5, 4) if quick else (600, 120, 16)
    alphas, ranks = ((1, 256), (4, 16)) if quick else (ALPHAS, RANKS)
    cfg = GPTConfig(vocab_size=len(vocab), **size)

    val = fixed_batches(ft_val, 2 if quick else 8, batch, cfg.block_size)
    pre_curves, base = train(init_params(cfg, jax.random.key(0)), cfg, pre_ids,
                             fixed_batches(pre_ids[-20000:], 2 if quick else 8, batch, cfg.block_size),
                             steps=pre_steps, batch=batch, lr=1e-3, weight_decay=0.1, seed=0,
                             eval_every=max(pre_steps // 10, 1))
    model = model_linearity(cfg, base, val[0], (ranks[0], ranks[-1]), (2.0, 16.0))
    baseline = float(np.mean([loss_fn(base, x, y, cfg) for x, y in val]))

    # A run depends on (rank, s, seed) only (same adapter init and batches per seed), so the two
    # conventions share the runs where their scales coincide. The seed sets the adapters' initial A
    # and the batch order; each cell is the mean over the seeds, with their standard deviation.
    seeds = FT_SEEDS[:2] if quick else FT_SEEDS
    runs = {}
    sweep, spread = {}, {}
    for convention in CONVENTIONS:
        grid, grid_std = np.full((len(ranks), len(alphas)), np.nan), np.full((len(ranks), len(alphas)), np.nan)
        for i, r in enumerate(ranks):
            for j, alpha in enumerate(alphas):
                lora = LoRAConfig(r, float(alpha), TARGETS, convention)
                if (r, lora.scale) not in runs:
                    c = cfg.replace(lora=lora)
                    runs[(r, lora.scale)] = []
                    for seed in seeds:
                        p = attach_lora(base, c, jax.random.key(seed))
                        trainable = jax.tree.map(lambda _: False, p) | {"lora": jax.tree.map(lambda _: True, p["lora"])}
                        curves, _ = train(p, c, ft_train, val, steps=ft_steps, batch=batch, lr=1e-3,
                                          weight_decay=0.0, seed=seed, trainable=trainable, eval_every=ft_steps)
                        runs[(r, lora.scale)].append(curves["val_loss"][-1])
                grid[i, j] = np.mean(runs[(r, lora.scale)])
                grid_std[i, j] = np.std(runs[(r, lora.scale)], ddof=1)
        sweep[convention], spread[convention] = grid, grid_std

    plot = draw_heatmaps(sweep, alphas, ranks, baseline, args.out)
    worst_layer = max(max(v) for v in layer.values())
    worst_model = max(v["dB_rel_err"] for v in model.values())
    best = {conv: {"val_loss": float(np.nanmin(g)), "rank": ranks[int(np.nanargmin(g)) // len(alphas)],
                   "alpha": alphas[int(np.nanargmin(g)) % len(alphas)]} for conv, g in sweep.items()}
    verdict = (f"dA, dB scale linearly with s for every rank: max rel. error {worst_layer:.1e} (layer, float64), "
               f"{worst_model:.1e} (whole model at B=0, float32). Fine-tuning: baseline val loss {baseline:.4f}; "
               f"best {best}")
    path = write_result(args.out, NAME, {
        "layer_linearity_rel_err_dA_dB": layer, "model_linearity_at_init": model,
        "config": cfg.to_dict(), "targets": TARGETS, "alphas": alphas, "ranks": ranks,
        "pretrain": {"steps": pre_steps, "final_val_loss": pre_curves["val_loss"][-1], "text": "first 80%",
                     "optimizer": f"{OPTIMIZER}, lr=1e-3, weight decay 0.1"},
        "finetune": {"steps": ft_steps, "batch": batch, "optimizer": f"{OPTIMIZER}, lr=1e-3, weight decay 0, adapters only",
                     "text": "last 20% (75% train / 25% val)"},
        "seeds": list(seeds), "distinct_runs": len(runs) * len(seeds), "baseline_val_loss_no_finetune": baseline,
        "final_val_loss": sweep, "final_val_loss_std": spread,
        "final_val_loss_by_seed": {f"rank={r}, s={s}": v for (r, s), v in runs.items()}, "best": best,
        "verdict": verdict, "plot": plot}, quick)
    print(verdict)
    print(path)


if __name__ == "__main__":
    main()
