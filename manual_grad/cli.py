"""The command line: ``python -m manual_grad {train,sample,finetune,export}`` (console script ``manual-grad``).

The flags of ``train`` and ``finetune`` are generated from the fields of
:class:`~manual_grad.training.config.TrainConfig`, its :class:`OptimizerConfig` and
:class:`~manual_grad.config.LoRAConfig` (``--lora-rank`` ...), with nanoGPT's names in dashes
(``--batch-size``, ``--max-iters``); nanoGPT's model flags (``--n-layer``, ``--block-size`` ...)
and ``--set FIELD=VALUE`` (repeatable) reach any :class:`~manual_grad.config.GPTConfig` field,
e.g. ``--set backward=paper --set attn_block_size=256``. Bad input ends with a one-line
``manual-grad ...: error: ...`` on stderr and exit status 2, never a traceback (an ``OSError``
on a path names its flag); a checkpoint is never replaced by a fresh run without
``--overwrite``, and one that cannot be read never is. Ctrl-C during training saves the step
reached and exits with status 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from manual_grad import __version__
from manual_grad.config import ACTIVATIONS, BACKWARDS, DTYPES, LORA_TARGETS, SCALE_CONVENTIONS, GPTConfig, LoRAConfig, check_int

__all__ = ["main", "build_parser", "parse_set"]

PROG = "manual-grad"
# nanoGPT's model flags: GPTConfig fields with a flag of their own (any field: --set).
MODEL_FLAGS = {"n_layer": ("transformer blocks", "L"), "n_head": ("attention heads", "H"),
               "n_embd": ("embedding width", "C"), "block_size": ("context length", "T"),
               "dropout": ("dropout rate in training", "P"),
               "dtype": ("compute dtype (bfloat16/float16: mixed precision, float32 parameters)", None)}
MODEL_CHOICES = {"dtype": DTYPES, "activation": ACTIVATIONS, "backward": BACKWARDS}
LORA_FLAGS = {"rank": ("adapter rank", "R"), "alpha": ("adapter alpha", "A"),
              "targets": (f"comma-separated layers to adapt, from {','.join(LORA_TARGETS)}", "LIST"),
              "convention": ("scale s = alpha/rank (PEFT) or alpha (the paper's)", None)}
LORA_CHOICES = {"convention": SCALE_CONVENTIONS}


class UsageError(Exception):
    """Bad command-line usage; its message is the whole line (``manual-grad train: error: ...``)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and never exits by itself."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
            check_int("value", value, minimum)
        except ValueError:
            expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return value
    parse.__name__ = "int"
    return parse


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in LORA_TARGETS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(LORA_TARGETS)}, "
                                         f"got {text!r}")
    return names


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser_of(annotation, minimum: int | None = None):
    """The argparse ``type`` of a field's annotation (``X | None`` reads as X; ``None`` for booleans)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return None
    if annotation is int:
        return _int_at_least(1 if minimum is None else minimum)
    if typing.get_origin(annotation) is tuple:
        return _targets
    return annotation if annotation in (float, str) else str


def parse_set(text: str) -> tuple[str, object]:
    """``"FIELD=VALUE"`` -> ``(field, value)`` for a GPTConfig field, VALUE read by its type
    (``none`` is None where the field allows it)."""
    name, sep, value = text.partition("=")
    name = name.strip()
    hints = typing.get_type_hints(GPTConfig)
    if not sep or name not in hints or name in ("vocab_size", "lora"):
        settable = sorted(set(hints) - {"vocab_size", "lora"})
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with FIELD one of {','.join(settable)}, got {text!r}")
    annotation = hints[name]
    if value.strip().lower() == "none" and type(None) in typing.get_args(annotation):
        return name, None
    parse = _parser_of(annotation, minimum=-sys.maxsize) or _bool
    try:
        return name, parse(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected {annotation}, got {value!r}") from None


def _help(text: str, default) -> str:
    if default is None or isinstance(default, bool) or "(default" in text:
        return text
    shown = ",".join(default) if isinstance(default, (tuple, list)) else default
    return f"{text} (default {shown!r})".strip() if isinstance(shown, str) else f"{text} (default {shown})".strip()


def _add_field(p, dest: str, flag: str, annotation, default, help: str, metavar=None, choices=None, minimum=None):
    """One flag for one dataclass field; its value is None unless given (so --resume can tell)."""
    parse = _parser_of(annotation, minimum)
    if parse is None:
        p.add_argument(flag, dest=dest, action="store_true", default=None, help=help)
        return
    p.add_argument(flag, dest=dest, type=parse, choices=choices, metavar=metavar, help=_help(help, default))


def _add_config_flags(p, command: str) -> None:
    """The flags of ``train``/``finetune``: every TrainConfig field of this command, its
    OptimizerConfig and (finetune) LoRAConfig, nanoGPT's model flags and ``--set``."""
    from manual_grad.training.config import TRAIN_MODEL, TrainConfig   # imports jax: only when needed
    hints, defaults = typing.get_type_hints(TrainConfig), TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if command not in meta["commands"] or f.name in ("model", "optim", "lora"):
            continue
        if command == "finetune" and f.name in ("init_from", "from_hf"):
            continue                                   # an exclusive, required pair: see build_parser
        _add_field(p, f.name, "--" + f.name.replace("_", "-"), hints[f.name], getattr(defaults, f.name),
                   meta["help"], meta["metavar"], meta["choices"], meta["minimum"])
    optim_hints = typing.get_type_hints(type(defaults.optim))
    for f in dataclasses.fields(defaults.optim):
        _add_field(p, f"optim.{f.name}", "--" + f.name.replace("_", "-"), optim_hints[f.name],
                   getattr(defaults.optim, f.name), f.metadata["help"], f.metadata["metavar"], minimum=f.metadata["minimum"])
    model_hints, model_defaults = typing.get_type_hints(GPTConfig), {**GPTConfig().to_dict(), **TRAIN_MODEL}
    for name, (text, metavar) in MODEL_FLAGS.items():
        if command == "finetune" and name not in ("block_size", "dropout", "dtype"):
            continue
        default = "the base model's" if command == "finetune" else model_defaults[name]
        _add_field(p, f"model.{name}", "--" + name.replace("_", "-"), model_hints[name], None,
                   _help(text, default) if command == "train" else f"{text} (default: {default})",
                   metavar, MODEL_CHOICES.get(name))
    p.add_argument("--set", dest="set", type=parse_set, action="append", default=[], metavar="FIELD=VALUE",
                   help="any GPTConfig field, e.g. --set backward=paper --set attn_block_size=256 (repeatable)")
    if command == "finetune":
        lora_hints, lora_defaults = typing.get_type_hints(LoRAConfig), LoRAConfig()
        for f in dataclasses.fields(LoRAConfig):
            text, metavar = LORA_FLAGS.get(f.name, ("", None))
            _add_field(p, f"lora.{f.name}", f"--lora-{f.name}", lora_hints[f.name], getattr(lora_defaults, f.name),
                       text, metavar, LORA_CHOICES.get(f.name))
    p.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="multi-host: address of process 0 (env JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=_int_at_least(1), metavar="N",
                   help="multi-host: processes, one per host (env JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=_int_at_least(0), metavar="I",
                   help="multi-host: this process's rank (env JAX_PROCESS_ID)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Train, sample and LoRA fine-tune GPTs whose gradients are written by hand.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    train = sub.add_parser("train", help="train a GPT from scratch (or --resume a run)",
                           description="Train a GPT with hand-written gradients; progress on stderr, "
                                       "checkpoint, metrics.json/csv and loss.png in --out-dir, a sample at the end.")
    _add_config_flags(train, "train")

    sample = sub.add_parser("sample", help="generate text from a trained run (KV-cache decoding)",
                            description="Generate text from the checkpoint in --out-dir (or a GPT-2 folder).")
    source = sample.add_mutually_exclusive_group()
    source.add_argument("--out-dir", metavar="DIR", help="run folder to load (default out)")
    source.add_argument("--from-hf", metavar="DIR", help="Hugging Face GPT-2 folder (weights, vocab.json, merges.txt)")
    sample.add_argument("--prompt", default="\n", help="text to continue (default a newline)")
    sample.add_argument("--max-new-tokens", type=_int_at_least(0), default=500, metavar="N")
    sample.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    sample.add_argument("--top-k", type=_int_at_least(1), default=200, metavar="K", help="default 200")
    sample.add_argument("--num-samples", type=_int_at_least(1), default=1, metavar="N")
    sample.add_argument("--seed", type=_int_at_least(0), default=1337)

    finetune = sub.add_parser("finetune", help="LoRA fine-tune a trained checkpoint on new text",
                              description="Train LoRA adapters on a frozen base (--init-from a run folder, or "
                                          "--from-hf a GPT-2 folder); adapters go to OUT_DIR/lora.mgc.")
    base = finetune.add_mutually_exclusive_group(required=True)
    base.add_argument("--init-from", metavar="DIR", help="run folder of the base model")
    base.add_argument("--from-hf", metavar="DIR", help="Hugging Face GPT-2 folder")
    _add_config_flags(finetune, "finetune")

    export = sub.add_parser("export", help="write a run as a Hugging Face GPT-2 folder",
                            description="Write the model in --out-dir (LoRA adapters merged) as config.json + "
                                        "model.safetensors (+ vocab.json and merges.txt for a GPT-2 BPE run), "
                                        "loadable with transformers.GPT2LMHeadModel.from_pretrained(DIR).")
    export.add_argument("--out-dir", default="out", metavar="RUN", help="run folder to export (default out)")
    export.add_argument("--to", required=True, metavar="DIR", help="folder to write (created)")
    export.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in DIR")
    return parser


_NOT_CONFIG = ("command", "set", "coordinator_address", "num_processes", "process_id")


def _given(args) -> dict:
    """The flags given, as a nested TrainConfig dict (``optim``/``lora``/``model`` parts)."""
    tree: dict = {"optim": {}, "lora": {}, "model": dict(args.set)}
    for dest, value in vars(args).items():
        if value is None or value is False or dest in _NOT_CONFIG:
            continue
        part, _, name = dest.rpartition(".")
        (tree[part] if part else tree)[name] = value
    return tree


def _train_config(args):
    """TrainConfig from the given flags; with --resume, unset flags come from the checkpoint."""
    from manual_grad.checkpoint import load_checkpoint
    from manual_grad.loading import CHECKPOINT, LORA_CHECKPOINT
    from manual_grad.training.config import TrainConfig

    given = _given(args)
    fields = {"optim": {}, "lora": {}, "model": {}}
    if given.get("resume") and given.get("overwrite"):
        raise UsageError(f"{PROG} {args.command}: error: --resume and --overwrite are exclusive: "
                         "continue the saved run or replace it")
    if getattr(args, "resume", False):
        out_dir = Path(given.get("out_dir", TrainConfig.out_dir))
        name = LORA_CHECKPOINT if args.command == "finetune" else CHECKPOINT
        saved = load_checkpoint(out_dir / name).meta.get("train_config", {})
        fields = {k: v for k, v in saved.items() if k not in ("resume", "overwrite")}
        fields = {**fields, **{k: dict(fields.get(k) or {}) for k in ("optim", "lora", "model")}}
        optim = fields["optim"]
        if ("max_iters" in given and "lr_decay_iters" not in given["optim"]
                and optim.get("lr_decay_iters") == saved.get("max_iters")):
            optim.pop("lr_decay_iters", None)     # the decay followed max_iters: let it follow the new one
    for part in ("optim", "lora", "model"):
        fields[part].update(given.pop(part))
    fields.update(given)
    if args.command != "finetune" or not fields["lora"]:
        fields["lora"] = None
    return TrainConfig.from_dict(fields)


def _run_train(args) -> int:
    from manual_grad import parallel
    from manual_grad.training import train
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    tc = _train_config(args)
    if tc.model.get("dtype") == "float64":
        import jax
        jax.config.update("jax_enable_x64", True)
    train(tc)
    return 0


def _run_sample(args) -> int:
    import jax
    import numpy as np

    from manual_grad.generate import generate
    from manual_grad.loading import load_hf, load_model

    if args.temperature < 0:
        raise UsageError(f"{PROG} sample: error: argument --temperature: expected a number >= 0, got {args.temperature}")
    if args.from_hf:
        params, cfg, tokenizer = load_hf(args.from_hf)
    else:
        params, cfg, tokenizer = load_model(args.out_dir or "out")
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        raise UsageError(f"{PROG} sample: error: argument --prompt: must encode to at least one token")
    prompts = np.tile(prompt[None], (args.num_samples, 1))
    tokens = generate(params, cfg, prompts, args.max_new_tokens, key=jax.random.key(args.seed),
                      temperature=args.temperature, top_k=args.top_k)
    for i, row in enumerate(np.asarray(tokens)):
        if i:
            sys.stdout.write("---------------\n")
        sys.stdout.write(tokenizer.decode(row) + "\n")
    sys.stdout.flush()
    return 0


def _run_export(args) -> int:
    from manual_grad.export import export_hf
    folder = export_hf(args.out_dir, args.to, overwrite=args.overwrite)
    print(f"wrote {', '.join(sorted(p.name for p in folder.iterdir()))} to {folder}")
    return 0


COMMANDS = {"train": _run_train, "finetune": _run_train, "sample": _run_sample, "export": _run_export}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 on bad input, 130 on Ctrl-C)."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except SystemExit as e:          # --help, --version
        return int(e.code or 0)
    except KeyboardInterrupt as e:   # the trainer's message says what was saved and how to resume
        print(f"{PROG}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        if isinstance(e, OSError) and e.filename is not None:      # a path no check caught
            text = f"{e.filename}: {e.strerror or type(e).__name__}"
        else:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 2
