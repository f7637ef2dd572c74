"""Experiment 1: the paper's parameter counts, from the library's own counting.

``count_params(cfg)`` counts the shapes of the parameters ``init_params`` would make (nothing
is allocated), so the figures below are what the model really has, next to what the paper states.
"""
from __future__ import annotations

from manual_grad import GPTConfig, LoRAConfig, count_params
from experiments.common import parse_args, write_result

NAME = "param_counts"
ALL_TARGETS = ("q", "k", "v", "o", "fc", "proj", "logits")

# The paper's statements (PAPER.md): exact figures and rounded ones.
STATED = {
    "one_block": 7_087_872,
    "1_block_untied_bias": 85_120_849,
    "12_blocks_untied_bias": 163_087_441,
    "12_blocks_tied": 124_439_808,
    "lora_r16_logits": 816_400,
    "lora_r16_all": 3_470_608,
}
ROUNDED = {   # statement -> (quantity, stated value, tolerance of the rounding)
    "about 124M parameters (tied)": ("12_blocks_tied_millions", 124, 0.5),
    "~24% saved by tying": ("tying_saving_percent", 24, 0.5),
    "~98% fewer trainable parameters with LoRA": ("lora_reduction_percent", 98, 0.5),
    "~3.5M LoRA parameters": ("lora_r16_all_millions", 3.5, 0.05),
}


def measure(base: GPTConfig) -> dict:
    """The six counts and the ratios behind the paper's rounded statements."""
    untied = base.replace(tied_embeddings=False, lm_head_bias=True)
    counts = {
        "one_block": count_params(base.replace(n_layer=2)) - count_params(base.replace(n_layer=1)),
        "1_block_untied_bias": count_params(untied.replace(n_layer=1)),
        "12_blocks_untied_bias": count_params(untied.replace(n_layer=12)),
        "12_blocks_tied": count_params(base.replace(n_layer=12)),
        "lora_r16_logits": count_params(untied.replace(n_layer=12, lora=LoRAConfig(16, 16.0, ("logits",))),
                                        which="lora"),
        "lora_r16_all": count_params(untied.replace(n_layer=12, lora=LoRAConfig(16, 16.0, ALL_TARGETS)),
                                     which="lora"),
    }
    d = base.n_embd
    derived = {
        "one_block_formula_12d2_13d": 12 * d * d + 13 * d,
        "12_blocks_tied_millions": counts["12_blocks_tied"] / 1e6,
        "tying_saving_percent": 100 * (1 - counts["12_blocks_tied"] / counts["12_blocks_untied_bias"]),
        "lora_reduction_percent": 100 * (1 - counts["lora_r16_all"] / counts["12_blocks_untied_bias"]),
        "lora_reduction_percent_vs_tied": 100 * (1 - counts["lora_r16_all"] / counts["12_blocks_tied"]),
        "lora_r16_all_millions": counts["lora_r16_all"] / 1e6,
    }
    return counts, derived


def main(argv=None):
    args = parse_args(__doc__, argv)
    base = GPTConfig.preset("gpt2")            # d=768, V=50257, context 1024, tied, no logits bias
    counts, derived = measure(base)
    rows = [{"quantity": k, "stated": STATED[k], "measured": counts[k], "holds": counts[k] == STATED[k]}
            for k in STATED]
    rows.append({"quantity": "one block = 12 d^2 + 13 d", "stated": derived["one_block_formula_12d2_13d"],
                 "measured": counts["one_block"],
                 "holds": counts["one_block"] == derived["one_block_formula_12d2_13d"]})
    for statement, (key, value, tol) in ROUNDED.items():
        rows.append({"quantity": statement, "stated": value, "measured": round(derived[key], 3),
                     "holds": abs(derived[key] - value) <= tol})
    verdict = "holds" if all(r["holds"] for r in rows) else "fails for: " + ", ".join(
        r["quantity"] for r in rows if not r["holds"])
    path = write_result(args.out, NAME, {"config": base.to_dict(), "counts": counts, "derived": derived,
                                         "rows": rows, "verdict": verdict}, args.quick)
    for r in rows:
        print(f"{r['quantity']:45s} stated {r['stated']:>14} measured {r['measured']:>14} "
              f"{'ok' if r['holds'] else 'DIFFERS'}")
    print(path)


if __name__ == "__main__":
    main()
