"""The command line: ``python -m manual_grad {train,sample,finetune}`` (console script ``manual-grad``).

Flags follow nanoGPT's config names with dashes (``--n-layer``, ``--block-size``, ...). Bad
input ends with a one-line ``manual-grad: error: ...`` on stderr and exit status 2, never a
traceback; an existing checkpoint that cannot be read is never overwritten.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from manual_grad.config import LORA_TARGETS
from manual_grad.data import TOKENIZERS
from manual_grad.layers.lora import SCALE_CONVENTIONS
from manual_grad.model import BACKENDS

__all__ = ["main", "build_parser"]

PROG = "manual-grad"


class UsageError(Exception):
    """Bad command-line usage (reported on one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and never exits by itself."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in LORA_TARGETS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(LORA_TARGETS)}, "
                                         f"got {text!r}")
    return names


def _defaults() -> dict:
    from manual_grad.train import TrainConfig          # imports jax: only when a parser is built
    return TrainConfig().to_dict()


def _add(p, flag: str, help: str = "", **kwargs) -> None:
    """``p.add_argument(flag)`` whose help names the TrainConfig default (the flag's value is
    None unless given, so --resume can tell given flags from defaults)."""
    default = _defaults().get(flag.lstrip("-").replace("-", "_"))
    if default is not None and kwargs.get("action") != "store_true" and "(default" not in help:
        shown = ",".join(default) if isinstance(default, (tuple, list)) else default
        help = f"{help} (default {shown!r})" if isinstance(shown, str) else f"{help} (default {shown})"
    p.add_argument(flag, help=help.strip(), **kwargs)


def _add_data_flags(p, *, finetune: bool) -> None:
    _add(p, "--data", "UTF-8 text file to train on" + (
        "" if finetune else "; without it, the Python standard library's own sources"), metavar="FILE")
    _add(p, "--max-chars", "cap on the embedded stdlib corpus, in characters", type=_positive_int, metavar="N")
    _add(p, "--val-fraction", "held-out share of the text", type=float, metavar="F")


def _add_train_flags(p) -> None:
    _add(p, "--out-dir", "run folder: checkpoint, metrics.json/csv, loss.png", metavar="DIR")
    _add(p, "--backend", "manual: hand-written VJPs; autodiff: jax.grad of the plain-jnp twins",
         choices=sorted(BACKENDS))
    _add(p, "--batch-size", type=_positive_int, metavar="B")
    _add(p, "--block-size", "context length" + (" (default: the base model's)" if p.prog.endswith("finetune")
                                                 else ""), type=_positive_int, metavar="T")
    _add(p, "--max-iters", "optimizer steps", type=_count, metavar="N")
    _add(p, "--learning-rate", "peak learning rate", type=float, metavar="LR")
    _add(p, "--min-lr", "learning rate at the end of the cosine decay", type=float, metavar="LR")
    _add(p, "--warmup-iters", "linear warmup steps", type=_count, metavar="N")
    _add(p, "--lr-decay-iters", "cosine decay length (default: max-iters)", type=_positive_int, metavar="N")
    _add(p, "--weight-decay", "AdamW decay of the weight matrices", type=float, metavar="W")
    _add(p, "--beta1", type=float, metavar="B1")
    _add(p, "--beta2", type=float, metavar="B2")
    _add(p, "--grad-clip", "global-norm clipping; 0 turns it off", type=float, metavar="G")
    _add(p, "--mesh", "device mesh: data=N (data parallel), data=-1 (all devices), data=N,model=M "
         "(tensor parallel); default one device", metavar="SPEC")
    _add(p, "--shard", "state on the mesh: replicated (data parallel) or fsdp (parameters and "
         "optimizer state split over the data axis)", choices=("replicated", "fsdp"))
    p.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="multi-host: address of process 0 (env JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=_positive_int, metavar="N",
                   help="multi-host: processes, one per host (env JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=_count, metavar="I",
                   help="multi-host: this process's rank (env JAX_PROCESS_ID)")
    _add(p, "--dropout", "dropout rate in training", type=float, metavar="P")
    _add(p, "--dtype", "compute dtype (bfloat16/float16: mixed precision, float32 parameters)",
         choices=("float32", "bfloat16", "float16"))
    _add(p, "--eval-interval", "steps between evaluations", type=_positive_int, metavar="N")
    _add(p, "--eval-iters", "batches per evaluation and split", type=_positive_int, metavar="N")
    _add(p, "--log-interval", "steps between progress updates", type=_positive_int, metavar="N")
    _add(p, "--seed", "seeds initialisation, batches and dropout", type=_count)
    _add(p, "--resume", "continue the run saved in --out-dir exactly; flags not given come from it",
         action="store_true")
    _add(p, "--sample-tokens", "tokens sampled and printed at the end; 0: none", type=_count, metavar="N")


def _add_lora_flags(p) -> None:
    _add(p, "--lora-rank", "adapter rank", type=_positive_int, metavar="R")
    _add(p, "--lora-alpha", "adapter alpha", type=float, metavar="A")
    _add(p, "--lora-targets", f"comma-separated layers to adapt, from {','.join(LORA_TARGETS)}",
         type=_targets, metavar="LIST")
    _add(p, "--lora-convention", "scale s = alpha/rank (PEFT) or alpha (the paper's)", choices=SCALE_CONVENTIONS)
    _add(p, "--merge", "also write the merged model (base + s A B) as OUT_DIR/ckpt.mgc", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Train, sample and LoRA fine-tune GPTs whose gradients are written by hand.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    train = sub.add_parser("train", help="train a GPT from scratch (or --resume a run)",
                           description="Train a GPT with hand-written gradients; progress on stderr, "
                                       "checkpoint, metrics.json/csv and loss.png in --out-dir, a sample at the end.")
    _add_data_flags(train, finetune=False)
    _add(train, "--tokenizer", "characters, UTF-8 bytes, or GPT-2 BPE (needs --bpe-dir)", choices=TOKENIZERS)
    _add(train, "--bpe-dir", "folder with GPT-2's vocab.json and merges.txt", metavar="DIR")
    _add(train, "--n-layer", "transformer blocks", type=_positive_int, metavar="L")
    _add(train, "--n-head", "attention heads", type=_positive_int, metavar="H")
    _add(train, "--n-embd", "embedding width", type=_positive_int, metavar="C")
    _add_train_flags(train)

    sample = sub.add_parser("sample", help="generate text from a trained run (KV-cache decoding)",
                            description="Generate text from the checkpoint in --out-dir (or a GPT-2 folder).")
    source = sample.add_mutually_exclusive_group()
    source.add_argument("--out-dir", metavar="DIR", help="run folder to load (default out)")
    source.add_argument("--from-hf", metavar="DIR", help="Hugging Face GPT-2 folder (weights, vocab.json, merges.txt)")
    sample.add_argument("--prompt", default="\n", help="text to continue (default a newline)")
    sample.add_argument("--max-new-tokens", type=_count, default=500, metavar="N")
    sample.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    sample.add_argument("--top-k", type=_positive_int, default=200, metavar="K", help="default 200")
    sample.add_argument("--num-samples", type=_positive_int, default=1, metavar="N")
    sample.add_argument("--seed", type=_count, default=1337)

    finetune = sub.add_parser("finetune", help="LoRA fine-tune a trained checkpoint on new text",
                              description="Train LoRA adapters on a frozen base (--init-from a run folder, or "
                                          "--from-hf a GPT-2 folder); adapters go to OUT_DIR/lora.mgc.")
    base = finetune.add_mutually_exclusive_group(required=True)
    base.add_argument("--init-from", metavar="DIR", help="run folder of the base model")
    base.add_argument("--from-hf", metavar="DIR", help="Hugging Face GPT-2 folder")
    _add_data_flags(finetune, finetune=True)
    _add_train_flags(finetune)
    _add_lora_flags(finetune)
    return parser


FLAG_TO_FIELD = {"out_dir", "data", "max_chars", "val_fraction", "tokenizer", "bpe_dir", "n_layer", "n_head",
                 "n_embd", "block_size", "dropout", "backend", "batch_size", "max_iters", "learning_rate",
                 "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip",
                 "eval_interval", "eval_iters", "log_interval", "seed", "resume", "sample_tokens", "init_from",
                 "from_hf", "lora_rank", "lora_alpha", "lora_targets", "lora_convention", "merge",
                 "mesh", "shard", "dtype"}


def _train_config(args):
    """TrainConfig from the given flags; with --resume, unset flags come from the checkpoint."""
    from manual_grad.checkpoint import load_checkpoint
    from manual_grad.train import CHECKPOINT, LORA_CHECKPOINT, TrainConfig

    given = {k: v for k, v in vars(args).items() if k in FLAG_TO_FIELD and v is not None and v is not False}
    fields = {}
    if getattr(args, "resume", False):
        finetune = args.command == "finetune"
        out_dir = Path(given.get("out_dir", TrainConfig.out_dir))
        saved = load_checkpoint(out_dir / (LORA_CHECKPOINT if finetune else CHECKPOINT)).meta.get("train_config", {})
        fields = {k: v for k, v in saved.items() if k != "resume"}
        if "max_iters" in given and "lr_decay_iters" not in given and saved.get("lr_decay_iters") == saved.get("max_iters"):
            fields.pop("lr_decay_iters", None)     # the decay followed max_iters: let it follow the new one
    fields.update(given)
    if args.command == "finetune":
        fields.setdefault("block_size", None)          # the base model's
    return TrainConfig.from_dict(fields)


def _run_train(args) -> int:
    from manual_grad import parallel
    from manual_grad.train import train
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    train(_train_config(args))
    return 0


def _run_sample(args) -> int:
    import jax
    import numpy as np

    from manual_grad.generate import generate
    from manual_grad.train import load_hf, load_model

    if args.temperature < 0:
        raise UsageError(f"{PROG} sample: argument --temperature: expected a number >= 0, got {args.temperature}")
    if args.from_hf:
        params, cfg, tokenizer = load_hf(args.from_hf)
    else:
        params, cfg, tokenizer = load_model(args.out_dir or "out")
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        raise UsageError(f"{PROG} sample: argument --prompt: must encode to at least one token")
    prompts = np.tile(prompt[None], (args.num_samples, 1))
    tokens = generate(params, cfg, prompts, args.max_new_tokens, key=jax.random.key(args.seed),
                      temperature=args.temperature, top_k=args.top_k)
    for i, row in enumerate(np.asarray(tokens)):
        if i:
            sys.stdout.write("---------------\n")
        sys.stdout.write(tokenizer.decode(row) + "\n")
    sys.stdout.flush()
    return 0


COMMANDS = {"train": _run_train, "finetune": _run_train, "sample": _run_sample}


def main(argv=None) -> int:
    """Entry point; returns the exit status (0, or 2 on bad input, 130 on Ctrl-C)."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except SystemExit as e:          # --help
        return int(e.code or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
