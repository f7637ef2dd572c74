"""Experiment 7: the embedding gradient is sparse.

(a) With the hand-written backward, dW_tok rows of tokens absent from the batch and dW_pos rows
    t >= T are exactly 0 (and present rows are not).
(b) Fraction of non-zero dW_tok rows per batch on real text, for a character vocabulary and for
    a whitespace-word vocabulary of the same text, as the batch grows.
(c) The scatter-add backward (``dW_tok.at[ids].add(Δ)``) against the dense one-hot matmul
    ``onehot(ids)^T Δ``, timed (jit, median of repeats) as the vocabulary grows.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad.layers.embedding import embedding
from experiments.common import load_chars, new_figure, parse_args, save_figure, time_call, write_result

NAME = "embedding_sparsity"


def word_ids(path):
    words = re.findall(r"\S+", open(path).read())
    vocab = {w: i for i, w in enumerate(sorted(set(words)))}
    return np.array([vocab[w] for w in words], np.int32), len(vocab)


def exact_zero_rows(ids, V, block, C, key):
    """Checks (a) on one batch ``ids`` (B, T) with T < block."""
    k1, k2, k3 = jax.random.split(key, 3)
    wte, wpe = jax.random.normal(k1, (V, C)), jax.random.normal(k2, (block, C))
    y, vjp = jax.vjp(lambda a, b: embedding(ids, a, b), wte, wpe)
    dwte, dwpe = vjp(jax.random.normal(k3, y.shape))
    present = np.zeros(V, bool)
    present[np.asarray(ids).ravel()] = True
    rows_nonzero = np.any(np.asarray(dwte) != 0, axis=1)
    T = ids.shape[1]
    return {"absent_rows_all_exactly_zero": bool(not rows_nonzero[~present].any()),
            "present_rows_all_nonzero": bool(rows_nonzero[present].all()),
            "pos_rows_ge_T_exactly_zero": bool(np.all(np.asarray(dwpe)[T:] == 0)),
            "pos_rows_lt_T_nonzero": bool(np.all(np.any(np.asarray(dwpe)[:T] != 0, axis=1))),
            "tokens_present": int(present.sum()), "vocab": V, "T": T, "block": block}


def nonzero_fraction(ids, V, batches, T, n, rng):
    """{B: mean over n random batches of (#distinct ids) / V}."""
    out = {}
    for B in batches:
        fractions = []
        for _ in range(n):
            start = rng.integers(0, len(ids) - T, B)
            window = np.stack([ids[s:s + T] for s in start])
            fractions.append(len(np.unique(window)) / V)
        out[B] = float(np.mean(fractions))
    return out


def main(argv=None):
    args = parse_args(__doc__, argv)
    quick = args.quick
    chars, char_vocab = load_chars(args.data)
    words, n_words = word_ids(args.data)
    rng = np.random.default_rng(0)
    T = 16 if quick else 64
    batch = jnp.asarray(np.stack([chars[s:s + T] for s in rng.integers(0, len(chars) - T, 4)]))
    checks = exact_zero_rows(batch, len(char_vocab), 2 * T, 8, jax.random.key(0))

    batches = (1, 4) if quick else (1, 4, 16, 64)
    fractions = {"characters": {"vocab": len(char_vocab),
                                "fraction": nonzero_fraction(chars, len(char_vocab), batches, T, 5 if quick else 50, rng)},
                 "words": {"vocab": n_words,
                           "fraction": nonzero_fraction(words, n_words, batches, T, 5 if quick else 50, rng)}}

    C, N = (16, 64) if quick else (128, 512)
    vocabs = (64, 1024) if quick else (64, 1024, 8192, 50257)
    timing = {}
    for V in vocabs:
        ids = jax.random.randint(jax.random.key(V), (N,), 0, V)
        dx = jax.random.normal(jax.random.key(1), (N, C))
        scatter = jax.jit(lambda ids, dx, V=V: jnp.zeros((V, C)).at[ids].add(dx))
        dense = jax.jit(lambda ids, dx, V=V: jax.nn.one_hot(ids, V, dtype=dx.dtype).T @ dx)
        assert np.allclose(scatter(ids, dx), dense(ids, dx), atol=1e-4)
        timing[V] = {"scatter_add_s": time_call(scatter, ids, dx, repeats=3 if quick else 7),
                     "onehot_matmul_s": time_call(dense, ids, dx, repeats=3 if quick else 7)}
    speedup = {V: t["onehot_matmul_s"] / t["scatter_add_s"] for V, t in timing.items()}
    exact = all(checks[k] for k in ("absent_rows_all_exactly_zero", "present_rows_all_nonzero",
                                    "pos_rows_ge_T_exactly_zero", "pos_rows_lt_T_nonzero"))
    verdict = (f"zero rows exact: {exact}; non-zero row fraction at B={batches[-1]}, T={T}: characters "
               f"{fractions['characters']['fraction'][batches[-1]]:.2f} (V={len(char_vocab)}), words "
               f"{fractions['words']['fraction'][batches[-1]]:.4f} (V={n_words}); scatter-add is "
               f"{speedup[vocabs[-1]]:.1f}x faster than the one-hot matmul at V={vocabs[-1]} "
               f"({N} tokens, C={C})")
    fig, (ax1, ax2) = new_figure(2)
    for name, f in fractions.items():
        ax1.plot(batches, [f["fraction"][b] for b in batches], "o-", label=f"{name} (V={f['vocab']})")
    ax1.set_xscale("log", base=2); ax1.set_yscale("log"); ax1.set_xlabel(f"batch size (T={T})")
    ax1.set_ylabel("fraction of non-zero dW_tok rows"); ax1.legend()
    ax2.plot(vocabs, [timing[V]["scatter_add_s"] * 1e3 for V in vocabs], "o-", label="scatter-add")
    ax2.plot(vocabs, [timing[V]["onehot_matmul_s"] * 1e3 for V in vocabs], "s-", label="one-hot matmul")
    ax2.set_xscale("log"); ax2.set_yscale("log"); ax2.set_xlabel("vocabulary V"); ax2.set_ylabel("ms")
    ax2.legend(); ax2.set_title(f"dW_tok for {N} tokens, C={C}")
    plot = save_figure(fig, args.out, NAME)
    path = write_result(args.out, NAME, {"exact_zero_checks": checks, "nonzero_row_fraction": fractions,
                                         "T": T, "timing": timing, "speedup_dense_over_scatter": speedup,
                                         "timing_setup": {"tokens": N, "C": C}, "verdict": verdict,
                                         "plot": plot}, quick)
    print(verdict)
    print(path)


if __name__ == "__main__":
    main()
