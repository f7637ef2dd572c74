"""Experiment 2: the key bias b_k under softmax attention and under other attention kinds.

(a) db_k on random inputs, measured with each kind's own hand-written backward
    (:mod:`manual_grad.layers.attention_variants`, which leaves db_k = Σ_tokens dk as computed),
    next to the library's softmax attention (which writes the exact 0) and JAX's autodiff.
(b) Two models trained from the same seed on the same batches, one with b_k = 0 ("no b_k": with
    the manual backward its gradient is exactly 0, so Adam leaves it at 0 and weight decay keeps
    0 at 0) and one with b_k drawn N(0, 1); a third run is the second one differentiated by
    autodiff, whose db_k is rounding noise instead of an exact 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad import GPTConfig, init_params
from manual_grad.layers.attention import attention, attention_ref
from manual_grad.layers.attention_variants import KINDS, attention_variant, attention_variant_ref
from experiments.common import (fixed_batches, load_chars, new_figure, parse_args, save_figure,
                                split_ids, train, write_result)

NAME = "key_bias"


def _random_layer(key, dtype, B, T, C):
    k = jax.random.split(key, 7)
    n = lambda i, *s, std=1.0: (std * jax.random.normal(k[i], s, jnp.float64)).astype(dtype)
    return (n(0, B, T, C), n(1, C, 3 * C, std=C ** -0.5), n(2, 3 * C), n(3, C, C, std=C ** -0.5), n(4, C)), \
        n(5, B, T, C)


def _vjp_bias(f):
    """jit: (layer inputs, output cotangent) -> db_qkv under the op ``f``."""
    return jax.jit(lambda args, ct: jax.vjp(f, *args)[1](ct)[2])


def _db_qkv_fns(n_head, causal):
    fns = {}
    for kind in KINDS:
        for label, op in (("manual", attention_variant), ("autodiff", attention_variant_ref)):
            fns[f"{kind} ({label})"] = _vjp_bias(
                lambda *a, op=op, kind=kind: op(*a, n_head=n_head, kind=kind, causal=causal))
    for label, op in (("manual", attention), ("autodiff", attention_ref)):
        fns[f"library attention ({label})"] = _vjp_bias(
            lambda *a, op=op: op(*a[:4], a[4], {}, n_head=n_head, causal=causal))
    return fns


def key_bias_gradients(dtype, seeds, B=4, T=16, C=32, n_head=4, causal=True):
    """{method: median over seeds of |db_k| / |db_q|} in ``dtype``."""
    ratios = {}

    def record(name, db_qkv):
        db = np.asarray(db_qkv, np.float64)
        ratios.setdefault(name, []).append(float(np.linalg.norm(db[C:2 * C]) / np.linalg.norm(db[:C])))

    fns = _db_qkv_fns(n_head, causal)
    for seed in seeds:
        args, ct = _random_layer(jax.random.key(seed), dtype, B, T, C)
        for label, db_qkv in fns.items():
            record(label, db_qkv(args, ct))
    return {k: float(np.median(v)) for k, v in ratios.items()}


def train_pair(args, quick):
    ids, vocab = load_chars(args.data)
    train_ids, val_ids = split_ids(ids)
    size = dict(n_layer=1, n_head=2, n_embd=16, block_size=16) if quick else \
        dict(n_layer=2, n_head=4, n_embd=64, block_size=64)
    steps, batch, lr, wd = (20, 4, 1e-3, 0.1) if quick else (300, 16, 1e-3, 0.1)
    cfg = GPTConfig(vocab_size=len(vocab), dtype="float64", **size)
    C = cfg.n_embd
    val = fixed_batches(val_ids, 2 if quick else 8, batch, cfg.block_size)
    base = init_params(cfg, jax.random.key(0))
    b_k = jax.random.normal(jax.random.key(7), (cfg.n_layer, C), jnp.float64)
    with_bk = jax.tree.map(lambda x: x, base)
    with_bk["blocks"]["attn"]["b_qkv"] = base["blocks"]["attn"]["b_qkv"].at[:, C:2 * C].set(b_k)
    track = {"b_k_norm": lambda p: float(jnp.linalg.norm(p["blocks"]["attn"]["b_qkv"][:, C:2 * C]))}
    runs = {}
    for name, params, backend in (("no b_k (manual)", base, "manual"), ("with b_k (manual)", with_bk, "manual"),
                                  ("with b_k (autodiff)", with_bk, "autodiff")):
        curves, final = train(params, cfg, train_ids, val, steps=steps, batch=batch, lr=lr, weight_decay=wd,
                              seed=0, backend=backend, eval_every=max(steps // 20, 1), track=track)
        b0 = params["blocks"]["attn"]["b_qkv"][:, C:2 * C]
        b_final = final["blocks"]["attn"]["b_qkv"][:, C:2 * C]
        predicted = b0 * (1 - lr * wd) ** steps        # decoupled weight decay alone, no Adam step
        curves["b_k_final_minus_pure_decay_max_abs"] = float(jnp.max(jnp.abs(b_final - predicted)))
        runs[name] = curves
    return cfg, dict(steps=steps, batch=batch, lr=lr, weight_decay=wd), runs


def main(argv=None):
    args = parse_args(__doc__, argv)
    jax.config.update("jax_enable_x64", True)
    seeds = range(1) if args.quick else range(5)
    gradients = {dtype: key_bias_gradients(dtype, seeds) for dtype in (("float64",) if args.quick
                                                                        else ("float64", "float32"))}
    cfg, settings, runs = train_pair(args, args.quick)
    a, b, c = (np.asarray(runs[k]["val_loss"]) for k in runs)
    ta, tb = np.asarray(runs["no b_k (manual)"]["train_loss"]), np.asarray(runs["with b_k (manual)"]["train_loss"])
    comparison = {
        "val_loss_max_abs_diff_manual": float(np.max(np.abs(a - b))),
        "train_loss_max_abs_diff_manual": float(np.max(np.abs(ta - tb))),
        "val_loss_max_abs_diff_autodiff_vs_manual": float(np.max(np.abs(c - b))),
        "final_val_loss": {k: runs[k]["val_loss"][-1] for k in runs},
    }
    g64 = gradients["float64"]
    zero_kinds = [k for k in KINDS if g64[f"{k} (manual)"] < 1e-12]
    nonzero_kinds = [k for k in KINDS if g64[f"{k} (manual)"] > 1e-3]
    verdict = (f"db_k is 0 (to rounding, |db_k|/|db_q| < 1e-12 in float64) for {zero_kinds}; "
               f"clearly non-zero (> 1e-3) for {nonzero_kinds}. Trained with and without b_k: val losses "
               f"differ by at most {comparison['val_loss_max_abs_diff_manual']:.2g} (float64).")
    fig, (ax1, ax2) = new_figure(2)
    labels = [k for k in KINDS]
    ax1.bar(range(len(labels)), [max(g64[f"{k} (manual)"], 1e-18) for k in labels])
    ax1.set_yscale("log"); ax1.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax1.set_ylabel("|db_k| / |db_q| (float64)"); ax1.set_title("key-bias gradient by attention kind")
    for name, curves in runs.items():
        ax2.plot(curves["step"], curves["val_loss"], label=name, ls={"no b_k (manual)": "-"}.get(name, "--"))
    ax2.set_xlabel("step"); ax2.set_ylabel("val loss"); ax2.legend(); ax2.set_title("training with / without b_k")
    plot = save_figure(fig, args.out, NAME)
    path = write_result(args.out, NAME, {
        "gradient_ratio_db_k_over_db_q": gradients, "gradient_setup": "B=4, T=16, C=32, 4 heads, causal, "
        "inputs N(0,1), weights N(0,1/C), biases N(0,1), median over seeds", "seeds": list(seeds),
        "training": {"config": cfg.to_dict(), **settings, "runs": runs, "comparison": comparison},
        "verdict": verdict, "plot": plot}, args.quick)
    print(verdict)
    print(path)


if __name__ == "__main__":
    main()
