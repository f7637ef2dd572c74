"""The run's configuration: one tree, every setting declared once.

``TrainConfig`` holds the run-level settings (data, output, loop, devices, fine-tuning
source) and three parts declared by their own dataclasses:

- ``model``: overrides of :class:`~manual_grad.config.GPTConfig` fields, on top of
  :data:`TRAIN_MODEL` for a fresh run or of the base model's config for a fine-tune
  (``vocab_size`` always comes from the tokenizer);
- ``optim``: :class:`OptimizerConfig` (AdamW, warmup + cosine schedule, clipping);
- ``lora``: a :class:`~manual_grad.config.LoRAConfig` for a fine-tune (default adapters when
  ``init_from``/``from_hf`` is set), None otherwise.

Each field's ``metadata`` (help text, metavar, choices, the commands it belongs to, the least
allowed integer) is what :mod:`manual_grad.cli` turns into a flag and what ``__post_init__``
checks, so adding a field adds its flag.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from manual_grad import data as data_lib
from manual_grad.config import GPTConfig, LoRAConfig, check_int
from manual_grad.model import BACKENDS
from manual_grad.parallel import MODES, parse_mesh_spec

__all__ = ["TrainConfig", "OptimizerConfig", "TRAIN_MODEL", "FINETUNE_FIXED", "option"]

# The model a fresh run trains unless overridden (nanoGPT-sized for a laptop).
TRAIN_MODEL = dict(block_size=64, n_layer=4, n_head=4, n_embd=128)
# GPTConfig fields a fine-tune cannot change: they fix the base's parameters and their meaning.
FINETUNE_FIXED = ("vocab_size", "n_layer", "n_head", "n_embd", "mlp_ratio", "activation", "ln_eps",
                  "tied_embeddings", "lm_head_bias", "bias", "causal", "param_dtype", "lora")
BOTH, TRAIN, FINETUNE = ("train", "finetune"), ("train",), ("finetune",)


def option(default, help: str = "", *, metavar: str | None = None, choices=None, minimum: int | None = None,
           commands=BOTH):
    """A dataclass field with what its command-line flag needs (``minimum``: the least int allowed)."""
    meta = dict(help=help, metavar=metavar, choices=choices, minimum=minimum, commands=commands)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _check_fields(obj) -> None:
    """The ``minimum`` and ``choices`` of every field of ``obj``, from its metadata."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if f.metadata.get("minimum") is not None:
            check_int(f.name, value, f.metadata["minimum"])
        if f.metadata.get("choices") is not None and value not in f.metadata["choices"]:
            raise ValueError(f"{f.name} must be one of {tuple(f.metadata['choices'])}, got {value!r}")


def _check_range(name: str, value, low: float, high: float = float("inf"), *, open_low=False, open_high=True):
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (isinstance(value, (int, float)) and above and below):
        bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping; linear warmup then cosine decay to ``min_lr``."""
    learning_rate: float = option(1e-3, "peak learning rate", metavar="LR")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay", metavar="LR")
    warmup_iters: int = option(50, "linear warmup steps", metavar="N", minimum=0)
    lr_decay_iters: int | None = option(None, "cosine decay length (default: max-iters)", metavar="N", minimum=1)
    weight_decay: float = option(0.1, "AdamW decay of the weight matrices", metavar="W")
    beta1: float = option(0.9, metavar="B1")
    beta2: float = option(0.99, metavar="B2")
    grad_clip: float = option(1.0, "global-norm clipping; 0 turns it off", metavar="G")

    def __post_init__(self):
        _check_fields(self)
        _check_range("learning_rate", self.learning_rate, 0, open_low=True)
        for name in ("min_lr", "weight_decay", "grad_clip"):
            _check_range(name, getattr(self, name), 0)
        for name in ("beta1", "beta2"):
            _check_range(name, getattr(self, name), 0, 1)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; run-level names follow nanoGPT's train.py."""
    # data and output
    out_dir: str = option("out", "run folder: checkpoint, metrics.json/csv, loss.png", metavar="DIR")
    data: str | None = option(None, "UTF-8 text file to train on; without it, the Python standard "
                              "library's own sources", metavar="FILE")
    max_chars: int = option(data_lib.DEFAULT_MAX_CHARS, "cap on the embedded stdlib corpus, in characters",
                            metavar="N", minimum=1)
    tokenizer: str = option("char", "characters, UTF-8 bytes, or GPT-2 BPE (needs --bpe-dir)",
                            choices=data_lib.TOKENIZERS, commands=TRAIN)
    bpe_dir: str | None = option(None, "folder with GPT-2's vocab.json and merges.txt", metavar="DIR",
                                 commands=TRAIN)
    val_fraction: float = option(0.1, "held-out share of the text", metavar="F")
    # the model, the optimizer and the adapters
    model: Mapping[str, Any] = option({}, "GPTConfig overrides (see TRAIN_MODEL, --set FIELD=VALUE)")
    optim: OptimizerConfig = option(OptimizerConfig(), "the optimizer's settings")
    lora: LoRAConfig | None = option(None, "adapters of a fine-tune (default LoRAConfig())", commands=FINETUNE)
    backend: str = option("manual", "manual: hand-written VJPs; autodiff: jax.grad of the plain-jnp twins",
                          choices=tuple(BACKENDS))
    # the loop
    batch_size: int = option(12, metavar="B", minimum=1)
    max_iters: int = option(500, "optimizer steps", metavar="N", minimum=0)
    eval_interval: int = option(100, "steps between evaluations", metavar="N", minimum=1)
    eval_iters: int = option(20, "batches per evaluation and split", metavar="N", minimum=1)
    log_interval: int = option(10, "steps between progress updates", metavar="N", minimum=1)
    seed: int = option(1337, "seeds initialisation, batches and dropout", minimum=0)
    resume: bool = option(False, "continue the run saved in --out-dir exactly; flags not given come from it")
    overwrite: bool = option(False, "start afresh over the valid checkpoint in --out-dir (replaced at the first "
                             "save); without it (or --resume) a fresh run refuses to replace one")
    sample_tokens: int = option(300, "tokens sampled and printed at the end; 0: none", metavar="N", minimum=0)
    sample_prompt: str | None = option(None, "prompt of that sample (default: 'def ' on the stdlib corpus, "
                                       "a newline on a file)", metavar="TEXT")
    # fine-tuning a trained model with LoRA (init_from: a run folder; from_hf: a GPT-2 folder)
    init_from: str | None = option(None, "run folder of the base model", metavar="DIR", commands=FINETUNE)
    from_hf: str | None = option(None, "Hugging Face GPT-2 folder", metavar="DIR", commands=FINETUNE)
    merge: bool = option(False, "also write the merged model (base + s A B) as OUT_DIR/ckpt.mgc",
                         commands=FINETUNE)
    # several devices (manual_grad.parallel): None = one device
    mesh: str | None = option(None, "device mesh: data=N (data parallel), data=-1 (all devices), "
                              "data=N,model=M (tensor parallel), data=N,seq=S (time axis split over a "
                              "ring: ring attention); default one device", metavar="SPEC")
    shard: str = option("replicated", "state on the mesh: replicated (data parallel) or fsdp (parameters "
                        "and optimizer state split over the data axis)", choices=MODES)

    def __post_init__(self):
        object.__setattr__(self, "model", dict(self.model))
        _check_fields(self)
        _check_range("val_fraction", self.val_fraction, 0, 1, open_low=True)
        if self.mesh is not None:
            parse_mesh_spec(self.mesh)
        if self.optim.lr_decay_iters is None:
            object.__setattr__(self, "optim", dataclasses.replace(self.optim, lr_decay_iters=self.max_iters))
        if self.tokenizer == "gpt2" and self.bpe_dir is None and self.from_hf is None:
            raise ValueError("tokenizer 'gpt2' needs bpe_dir (a folder with vocab.json and merges.txt)")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite are exclusive: continue the saved run or replace it")
        if self.init_from is not None and self.from_hf is not None:
            raise ValueError("init_from and from_hf are exclusive: fine-tune one base")
        if self.finetune and self.lora is None:
            object.__setattr__(self, "lora", LoRAConfig())
        if not self.finetune and (self.merge or self.lora is not None):
            raise ValueError("merge and lora apply to a LoRA fine-tune (init_from or from_hf)")
        self._check_model()

    def _check_model(self) -> None:
        """The overrides name GPTConfig fields and GPTConfig accepts their values."""
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        fixed = FINETUNE_FIXED if self.finetune else ("vocab_size", "lora")
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise ValueError(f"model: unknown GPTConfig field(s) {unknown}")
        if set(self.model) & set(fixed):
            raise ValueError(f"model: {sorted(set(self.model) & set(fixed))} cannot be set "
                             + ("in a fine-tune (the base fixes them)" if self.finetune else "(the tokenizer and "
                                "--lora-* set them)"))
        GPTConfig(**{**TRAIN_MODEL, **self.model})

    @property
    def finetune(self) -> bool:
        return self.init_from is not None or self.from_hf is not None

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig of a fresh run with ``vocab_size`` tokens."""
        return GPTConfig(**{**TRAIN_MODEL, **self.model, "vocab_size": vocab_size})

    def finetune_config(self, base: GPTConfig) -> GPTConfig:
        """The GPTConfig of a fine-tune of ``base``: dropout 0 unless set, the overrides, the adapters.
        ``model["block_size"]`` crops the batches, never the base's position table."""
        changes = {k: v for k, v in self.model.items() if k != "block_size"}
        return base.replace(**{"dropout": 0.0, **changes, "lora": self.lora})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if isinstance(d.get("optim"), Mapping):
            d["optim"] = OptimizerConfig(**d["optim"])
        if isinstance(d.get("lora"), Mapping):
            d["lora"] = LoRAConfig(**d["lora"])
        return cls(**d)
