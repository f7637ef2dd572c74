"""Model configuration: :class:`GPTConfig` (frozen, hashable: usable as a static jit argument),
its presets, and :class:`LoRAConfig` for adapters."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["GPTConfig", "LoRAConfig", "LORA_TARGETS", "PRESETS", "SCALE_CONVENTIONS", "BACKWARDS", "lora_scale",
           "check_int", "check_choice"]

# Where LoRA adapters can be attached: attention q, k, v and output projection,
# MLP expand ("fc") and contract ("proj"), and the logits layer.
LORA_TARGETS = ("q", "k", "v", "o", "fc", "proj", "logits")
ACTIVATIONS = ("gelu", "relu")
DTYPES = ("float32", "float64", "bfloat16", "float16")
HALF_DTYPES = ("bfloat16", "float16")
# "lean": attention saves q, k, v, out and the row log-sum-exp and recomputes ρ tile by tile;
# logits + loss run in token chunks and save the log-sum-exp; LayerNorm saves x, μ, 1/σ.
# "paper": the paper's formulas verbatim, saving ρ, the logits and x̂.
BACKWARDS = ("lean", "paper")
# Where the lean attention core and the logits + loss run: "pallas" (manual_grad.kernels: fused
# kernels with hand-written backwards; interpreted on CPU), "cpu" (the fused C++ attention kernel
# of manual_grad.kernels.cpu_attention, built on first use; CPU backend only), "xla" (the layers'
# own lean path), "auto" (Pallas on GPU and TPU; on one CPU device the C++ attention where it
# can be built and the dtype is float32/float64; else XLA).
KERNELS = ("xla", "pallas", "cpu", "auto")
# LoRA's factor s of s · x A B: alpha / rank (original LoRA paper, PEFT) or alpha (the paper's).
SCALE_CONVENTIONS = ("alpha/rank", "alpha")


def _require(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {got!r}")


def check_choice(name: str, value, choices) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    _require(value in choices, name, f"one of {tuple(choices)}", value)


def check_int(name: str, value, minimum: int = 1) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, name,
             "a positive integer" if minimum == 1 else f"an integer >= {minimum}", value)


def lora_scale(alpha: float, rank: int, convention: str = "alpha/rank") -> float:
    """The factor ``s`` of ``s · x A B``: ``alpha / rank`` (default) or ``alpha`` (the paper's)."""
    if convention == "alpha/rank":
        return alpha / rank
    if convention == "alpha":
        return float(alpha)
    raise ValueError(f"convention must be one of {SCALE_CONVENTIONS}, got {convention!r}")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters ``y = x W + s · x A B`` (A: (in, rank), B: (rank, out), B starts at 0).

    ``convention="alpha/rank"`` (default: original LoRA paper, Hugging Face PEFT) gives
    ``s = alpha / rank``; ``"alpha"`` gives ``s = alpha`` (the paper's convention, which
    takes alpha = rank).
    """
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    convention: str = "alpha/rank"

    def __post_init__(self):
        check_int("lora.rank", self.rank)
        object.__setattr__(self, "targets", tuple(self.targets))
        _require(len(self.targets) > 0 and set(self.targets) <= set(LORA_TARGETS)
                 and len(set(self.targets)) == len(self.targets),
                 "lora.targets", f"a non-empty subset of {LORA_TARGETS}", self.targets)
        _require(self.convention in SCALE_CONVENTIONS, "lora.convention",
                 f"one of {SCALE_CONVENTIONS}", self.convention)
        _require(isinstance(self.alpha, (int, float)) and self.alpha > 0, "lora.alpha",
                 "a positive number", self.alpha)

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.convention)


@dataclass(frozen=True)
class GPTConfig:
    """A GPT-2-style decoder. Any field can be set by keyword; see :meth:`preset`."""
    vocab_size: int = 50257
    block_size: int = 1024        # the longest context T_max (rows of wpe)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768             # C; head size D = C / n_head
    mlp_ratio: int = 4            # F = mlp_ratio * C
    activation: str = "gelu"      # "gelu" (tanh form, as GPT-2) | "relu"
    ln_eps: float = 1e-5          # any eps >= 0; 0 is the paper's
    tied_embeddings: bool = True  # logits use wte^T; otherwise a separate lm_head
    lm_head_bias: bool = False    # only with untied logits
    bias: bool = True             # biases in the blocks' linear layers (q, k, v, out, fc, proj)
    causal: bool = True           # causal self-attention mask
    dropout: float = 0.0          # on the embeddings and each residual branch, in training only
    dtype: str = "float32"        # compute dtype: "float32", "float64", "bfloat16", "float16"
    param_dtype: str | None = None  # storage dtype; None: float32 under a half dtype, else dtype
    backward: str = "lean"        # manual backend: "lean" (flash attention, chunked loss) | "paper"
    attn_block_size: int = 128    # tile size of the lean attention (tokens)
    loss_chunk: int = 1024        # tokens per chunk of the lean logits + cross-entropy
    kernels: str = "auto"         # "xla" | "pallas" | "cpu" | "auto" (see KERNELS)
    lora: LoRAConfig | None = None

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            check_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, "
                             f"n_head={self.n_head}")
        _require(self.activation in ACTIVATIONS, "activation", f"one of {ACTIVATIONS}", self.activation)
        _require(isinstance(self.ln_eps, (int, float)) and self.ln_eps >= 0, "ln_eps", "a number >= 0",
                 self.ln_eps)
        _require(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout",
                 "in [0, 1)", self.dropout)
        _require(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        _require(self.param_dtype is None or self.param_dtype in DTYPES, "param_dtype",
                 f"None or one of {DTYPES}", self.param_dtype)
        _require(self.backward in BACKWARDS, "backward", f"one of {BACKWARDS}", self.backward)
        _require(self.kernels in KERNELS, "kernels", f"one of {KERNELS}", self.kernels)
        check_int("attn_block_size", self.attn_block_size)
        check_int("loss_chunk", self.loss_chunk)
        if self.tied_embeddings and self.lm_head_bias:
            raise ValueError("lm_head_bias requires tied_embeddings=False (GPT-2's tied head has no bias)")
        if self.lora is not None:
            _require(isinstance(self.lora, LoRAConfig), "lora", "a LoRAConfig or None", self.lora)
            smallest = min(self.n_embd, self.vocab_size if "logits" in self.lora.targets else self.n_embd)
            _require(self.lora.rank <= smallest, "lora.rank",
                     f"at most {smallest} (the smallest adapted layer dimension)", self.lora.rank)

    @property
    def storage_dtype(self) -> str:
        """The parameters' dtype: ``param_dtype``, or float32 for half compute, else ``dtype``."""
        if self.param_dtype is not None:
            return self.param_dtype
        return "float32" if self.dtype in HALF_DTYPES else self.dtype

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.mlp_ratio * self.n_embd

    def replace(self, **changes) -> "GPTConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        d = dict(d)
        if d.get("lora") is not None:
            d["lora"] = LoRAConfig(**d["lora"])
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"config: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """One of :data:`PRESETS` (``paper``, ``gpt2``, ``gpt2-untied``, ``shakespeare-char``,
        ``tiny``), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # The paper's reference network: V=10, T=4, C=32, 2 heads, 1 block, ReLU, LayerNorm eps=0,
    # untied logits with bias.
    "paper": dict(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=32, activation="relu",
                  ln_eps=0.0, tied_embeddings=False, lm_head_bias=True),
    # GPT-2 small: 124,439,808 parameters, tied logits, GELU (tanh), eps=1e-5.
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # GPT-2 small with untied logits and a logits bias: 163,087,441 parameters.
    "gpt2-untied": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                        tied_embeddings=False, lm_head_bias=True),
    # nanoGPT's shakespeare-char model (65 characters, 6 x 6 x 384, block 256, dropout 0.2).
    "shakespeare-char": dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384,
                             dropout=0.2),
    # A few thousand parameters, for tests and smoke runs.
    "tiny": dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32),
}
