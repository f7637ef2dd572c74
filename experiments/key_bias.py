"""Experiment 2: the key bias b_k under softmax attention and under other attention kinds.

(a) db_k on random inputs, measured with each kind's own hand-written backward
    (:mod:`manual_grad.layers.attention_variants`, which leaves db_k = Σ_tokens dk as computed),
    next to the library's softmax attention (which writes the exact 0) and JAX's autodiff.

(A former part (b) trained models with and without b_k; with the library's backward, which writes
db_k = 0 exactly, the two runs could not differ, so it measured the hard-coded zero and is gone.
The zero itself is tested on the backward's own dk in tests/layers/test_attention.py.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad.layers.attention import attention, attention_ref
from manual_grad.layers.attention_variants import KINDS, attention_variant, attention_variant_ref
from experiments.common import new_figure, parse_args, save_figure, write_result

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


def main(argv=None):
    args = parse_args(__doc__, argv)
    jax.config.update("jax_enable_x64", True)
    seeds = range(1) if args.quick else range(5)
    gradients = {dtype: key_bias_gradients(dtype, seeds) for dtype in (("float64",) if args.quick
                                                                        else ("float64", "float32"))}
    g64 = gradients["float64"]
    zero_kinds = [k for k in KINDS if g64[f"{k} (manual)"] < 1e-12]
    nonzero_kinds = [k for k in KINDS if g64[f"{k} (manual)"] > 1e-3]
    verdict = (f"db_k is 0 (to rounding, |db_k|/|db_q| < 1e-12 in float64) for {zero_kinds}; "
               f"clearly non-zero (> 1e-3) for {nonzero_kinds}.")
    fig, (ax1,) = new_figure()
    labels = [k for k in KINDS]
    ax1.bar(range(len(labels)), [max(g64[f"{k} (manual)"], 1e-18) for k in labels])
    ax1.set_yscale("log"); ax1.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax1.set_ylabel("|db_k| / |db_q| (float64)"); ax1.set_title("key-bias gradient by attention kind")
    plot = save_figure(fig, args.out, NAME)
    path = write_result(args.out, NAME, {
        "gradient_ratio_db_k_over_db_q": gradients, "gradient_setup": "B=4, T=16, C=32, 4 heads, causal, "
        "inputs N(0,1), weights N(0,1/C), biases N(0,1), median over seeds", "seeds": list(seeds),
        "verdict": verdict, "plot": plot}, args.quick)
    print(verdict)
    print(path)


if __name__ == "__main__":
    main()
