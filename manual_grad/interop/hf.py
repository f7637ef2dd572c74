"""Hugging Face GPT-2 checkpoints in and out: ``config.json`` plus ``model.safetensors`` (or
``pytorch_model.bin``) from a local folder <-> ``(params, cfg)``.

Name map (``{i}`` = block index; our blocks are stacked on a leading axis L)::

    transformer.wte.weight              (V, C)   -> wte
    transformer.wpe.weight              (T, C)   -> wpe
    transformer.h.{i}.ln_1.weight/bias  (C,)     -> blocks.ln1.scale/bias[i]
    transformer.h.{i}.attn.c_attn.weight (C, 3C) -> blocks.attn.w_qkv[i]   columns [q | k | v]
    transformer.h.{i}.attn.c_attn.bias  (3C,)    -> blocks.attn.b_qkv[i]
    transformer.h.{i}.attn.c_proj.*     (C, C)   -> blocks.attn.w_o / b_o[i]
    transformer.h.{i}.ln_2.*            (C,)     -> blocks.ln2.scale/bias[i]
    transformer.h.{i}.mlp.c_fc.*        (C, F)   -> blocks.mlp.w_fc / b_fc[i]
    transformer.h.{i}.mlp.c_proj.*      (F, C)   -> blocks.mlp.w_proj / b_proj[i]
    transformer.ln_f.weight/bias        (C,)     -> ln_f.scale/bias
    lm_head.weight                      (V, C)   -> lm_head.w (C, V) = its transpose; absent
                                                    (or equal to wte) when the logits are tied

GPT-2's ``Conv1D`` stores its weight ``(in, out)``, which is our layout, so the block
weights map without transposing; only ``lm_head`` (an ``nn.Linear``, ``(out, in)``) is
transposed. The causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` are not
parameters and are skipped. Keys may also come without the ``transformer.`` prefix (a
``GPT2Model`` checkpoint, as in the original ``gpt2`` repository).

Activations: ``gelu_new`` / ``gelu_pytorch_tanh`` (GELU, tanh form) -> ``"gelu"``;
``relu`` -> ``"relu"``; anything else is refused.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from manual_grad.config import GPTConfig

__all__ = ["load_gpt2", "save_gpt2", "gpt2_from_state_dict", "gpt2_to_state_dict",
           "config_from_hf", "config_to_hf", "Entry", "gpt2_entries", "params_from_tensors",
           "check_vocab", "drop_tied_head", "to_numpy", "BUFFER_SUFFIXES"]

Params = dict[str, Any]

# HF activation name -> ours, and back.
_ACT_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu_new", "relu": "relu"}
# Causal-mask buffers saved by some versions of GPT-2 / nanoGPT code: not parameters.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_PREFIX = "transformer."
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


# --- the name map, shared with the nanoGPT loader ----------------------------------------------

class Entry(NamedTuple):
    """One checkpoint tensor: where it goes in our tree, its name (``{i}`` for a block), its
    shape in our layout (per block), and whether the checkpoint stores it transposed
    (``nn.Linear``'s ``(out, in)``)."""
    path: tuple[str, ...]
    name: str
    shape: tuple[int, ...]
    transposed: bool = False

    @property
    def in_block(self) -> bool:
        return self.path[0] == "blocks"

    @property
    def is_bias(self) -> bool:
        return self.path[-1] in ("bias", "b_qkv", "b_o", "b_fc", "b_proj")

    def key(self, i: int | None = None) -> str:
        return self.name.format(i=i)

    def stored_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transposed else self.shape


def gpt2_entries(cfg: GPTConfig, *, linear_transposed: bool) -> list[Entry]:
    """The tensors of a GPT-2-shaped checkpoint for ``cfg``. ``linear_transposed``: the block
    weights are ``nn.Linear`` ``(out, in)`` (nanoGPT) rather than ``Conv1D`` ``(in, out)`` (HF)."""
    V, T, C, F = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.mlp_width
    h = "transformer.h.{i}."
    t = linear_transposed

    def ln(ours, theirs):
        return [Entry(("blocks", ours, "scale"), h + theirs + ".weight", (C,)),
                Entry(("blocks", ours, "bias"), h + theirs + ".bias", (C,))]

    def linear(group, w, b, theirs, n_in, n_out):
        out = [Entry(("blocks", group, w), h + theirs + ".weight", (n_in, n_out), t)]
        if cfg.bias:
            out.append(Entry(("blocks", group, b), h + theirs + ".bias", (n_out,)))
        return out

    entries = [Entry(("wte",), "transformer.wte.weight", (V, C)),
               Entry(("wpe",), "transformer.wpe.weight", (T, C)),
               *ln("ln1", "ln_1"),
               *linear("attn", "w_qkv", "b_qkv", "attn.c_attn", C, 3 * C),
               *linear("attn", "w_o", "b_o", "attn.c_proj", C, C),
               *ln("ln2", "ln_2"),
               *linear("mlp", "w_fc", "b_fc", "mlp.c_fc", C, F),
               *linear("mlp", "w_proj", "b_proj", "mlp.c_proj", F, C),
               Entry(("ln_f", "scale"), "transformer.ln_f.weight", (C,)),
               Entry(("ln_f", "bias"), "transformer.ln_f.bias", (C,))]
    if not cfg.tied_embeddings:
        entries.append(Entry(("lm_head", "w"), "lm_head.weight", (C, V), True))
    return entries


def to_numpy(tensor) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (bfloat16 goes through float32)."""
    if hasattr(tensor, "detach"):   # torch.Tensor, imported lazily by whoever made it
        tensor = tensor.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(tensor)


def _dtype(dtype: str):
    if dtype not in ("float32", "float64", "bfloat16", "float16"):
        raise ValueError(f"dtype must be one of float32, float64, bfloat16, float16, got {dtype!r}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs 64-bit JAX: run under `with jax.enable_x64(True):` "
                         "or set jax.config.update('jax_enable_x64', True)")
    return jnp.dtype(dtype)


def params_from_tensors(tensors: dict[str, Any], cfg: GPTConfig, entries: list[Entry], *,
                        source: str, zero_missing_biases: bool = False) -> Params:
    """Gathers ``entries`` from ``tensors`` (checkpoint name -> array) into our tree, stacking
    the blocks on axis L and casting to the parameters' dtype ``cfg.storage_dtype``.

    Every tensor's shape is checked; a missing key, a wrong shape or a key left over raises a
    ``ValueError`` naming the key. ``zero_missing_biases``: absent biases become zeros.
    """
    dtype = _dtype(cfg.storage_dtype)
    tensors = dict(tensors)
    params: Params = {}

    def take(entry: Entry, key: str) -> np.ndarray:
        if key not in tensors:
            if zero_missing_biases and entry.is_bias:
                return np.zeros(entry.shape, np.float32)
            raise ValueError(f"{source}: missing key {key!r} (expected shape {entry.stored_shape()})")
        array = to_numpy(tensors.pop(key))
        if array.shape != entry.stored_shape():
            raise ValueError(f"{source}: key {key!r} has shape {tuple(array.shape)}, the config "
                             f"expects {entry.stored_shape()}")
        return array.T if entry.transposed else array

    for entry in entries:
        if entry.in_block:
            value = np.stack([take(entry, entry.key(i)) for i in range(cfg.n_layer)])
        else:
            value = take(entry, entry.key())
        node = params
        for part in entry.path[:-1]:
            node = node.setdefault(part, {})
        node[entry.path[-1]] = jnp.asarray(value.astype(dtype))
    if tensors:
        raise ValueError(f"{source}: unexpected key(s) {sorted(tensors)[:8]} "
                         f"({len(tensors)} in all) that a GPT-2 with this config does not have")
    return params


def check_vocab(tensors: dict[str, Any], vocab_size: int, source: str) -> None:
    """A clear message for the commonest mismatch: the embedding's rows vs the config's vocab."""
    wte = tensors.get("transformer.wte.weight")
    if wte is not None and wte.shape[0] != vocab_size:
        raise ValueError(f"{source}: vocab size mismatch: 'transformer.wte.weight' has "
                         f"{wte.shape[0]} rows but the config says vocab_size={vocab_size}")


def drop_tied_head(tensors: dict[str, Any], source: str) -> None:
    """Removes ``lm_head.weight`` of a tied model, after checking it equals the embedding."""
    head = tensors.pop("lm_head.weight", None)
    wte = tensors.get("transformer.wte.weight")
    if head is not None and wte is not None and not np.array_equal(to_numpy(head), to_numpy(wte)):
        raise ValueError(f"{source}: the logits are tied but 'lm_head.weight' differs from "
                         "'transformer.wte.weight' (untie them in the config)")


# --- config.json <-> GPTConfig ---------------------------------------------------------------

def config_from_hf(hf: dict, *, dtype: str = "float32", dropout: float = 0.0) -> GPTConfig:
    """A :class:`GPTConfig` from a GPT-2 ``config.json`` dict; refuses what our model cannot
    represent (another model type, activation, attention scaling or cross-attention)."""
    def field(*names, default=None):
        for name in names:
            if hf.get(name) is not None:
                return hf[name]
        if default is None:
            raise ValueError(f"config.json: missing field {names[0]!r}")
        return default

    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"config.json: model_type must be 'gpt2', got {model_type!r}")
    act = field("activation_function", default="gelu_new")
    if act not in _ACT_FROM_HF:
        raise ValueError(f"config.json: activation_function {act!r} is not supported; expected one "
                         f"of {sorted(_ACT_FROM_HF)} (gelu_new is GPT-2's tanh-form GELU)")
    for name, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                            ("add_cross_attention", False)):
        if bool(hf.get(name, supported)) != supported:
            raise ValueError(f"config.json: {name}={hf[name]!r} is not supported (must be {supported})")
    C = field("n_embd", "hidden_size")
    F = hf.get("n_inner") or 4 * C
    if F % C:
        raise ValueError(f"config.json: n_inner={F} must be a multiple of n_embd={C}")
    return GPTConfig(
        vocab_size=field("vocab_size"), block_size=field("n_positions", "n_ctx"),
        n_layer=field("n_layer", "num_hidden_layers"), n_head=field("n_head", "num_attention_heads"),
        n_embd=C, mlp_ratio=F // C, activation=_ACT_FROM_HF[act],
        ln_eps=float(field("layer_norm_epsilon", default=1e-5)),
        tied_embeddings=bool(hf.get("tie_word_embeddings", True)), dropout=dropout, dtype=dtype)


def config_to_hf(cfg: GPTConfig) -> dict:
    """A GPT-2 ``config.json`` dict (``transformers.GPT2Config``) for ``cfg``; refuses what GPT-2
    cannot represent."""
    problems = [msg for bad, msg in (
        (cfg.lora is not None, "LoRA adapters are not merged (call merge_lora first)"),
        (not cfg.bias, "cfg.bias=False (GPT-2's linear layers always have biases)"),
        (cfg.lm_head_bias, "cfg.lm_head_bias=True (GPT-2's lm_head has no bias)"),
        (not cfg.causal, "cfg.causal=False (GPT-2 is causal)"),
        (cfg.activation not in _ACT_TO_HF, f"activation {cfg.activation!r}"),
    ) if bad]
    if problems:
        raise ValueError("cfg cannot be saved as GPT-2: " + "; ".join(problems))
    hf = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": None if cfg.mlp_ratio == 4 else cfg.mlp_width,
        "activation_function": _ACT_TO_HF[cfg.activation],
        # our dropout acts on the embeddings and the residual branches, not on attention weights
        "embd_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout, "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.ln_eps, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False,
        "tie_word_embeddings": cfg.tied_embeddings, "use_cache": True, "dtype": cfg.storage_dtype,
    }
    # GPT-2's tokenizer: <|endoftext|> = 50256; none for a smaller vocabulary
    end_of_text = 50256 if cfg.vocab_size > 50256 else None
    return hf | {"bos_token_id": end_of_text, "eos_token_id": end_of_text}


# --- state dicts ---------------------------------------------------------------------------

def _canonical_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drops mask buffers and adds the ``transformer.`` prefix where a GPT2Model left it out."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(BUFFER_SUFFIXES):
            continue
        name = key if key.startswith(_PREFIX) or key.startswith("lm_head.") else _PREFIX + key
        if name in out:
            raise ValueError(f"state_dict: key {key!r} appears both with and without the "
                             f"{_PREFIX!r} prefix")
        out[name] = value
    return out


def gpt2_from_state_dict(state_dict: dict[str, Any], hf_config: dict, *, dtype: str = "float32",
                         dropout: float = 0.0, source: str = "state_dict") -> tuple[Params, GPTConfig]:
    """``(params, cfg)`` from a GPT-2 state dict (name -> numpy array or torch tensor) and its
    config dict (``config.json``, or ``model.config.to_dict()``). Shapes are checked against
    the config; mismatches raise a ``ValueError`` naming the key."""
    cfg = config_from_hf(hf_config, dtype=dtype, dropout=dropout)
    tensors = _canonical_names(state_dict)
    check_vocab(tensors, cfg.vocab_size, source)
    if cfg.tied_embeddings:
        drop_tied_head(tensors, source)
    entries = gpt2_entries(cfg, linear_transposed=False)
    return params_from_tensors(tensors, cfg, entries, source=source), cfg


def _flat_leaves(params: Params) -> dict[tuple[str, ...], Any]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def gpt2_to_state_dict(params: Params, cfg: GPTConfig, *, linear_transposed: bool = False,
                       ) -> dict[str, np.ndarray]:
    """Our tree -> checkpoint name -> numpy array (contiguous, in the parameters' dtype).

    Refuses LoRA adapters and any leaf whose shape does not match ``cfg``."""
    if "lora" in params:
        raise ValueError("params: LoRA adapters are not merged (call merge_lora first)")
    entries = gpt2_entries(cfg, linear_transposed=linear_transposed)
    leaves = _flat_leaves(params)
    extra = set(leaves) - {e.path for e in entries}
    if extra:
        raise ValueError(f"params: unexpected leaves {sorted('.'.join(p) for p in extra)} for this cfg")
    out = {}
    for entry in entries:
        where = ".".join(entry.path)
        if entry.path not in leaves:
            raise ValueError(f"params: missing {where!r}")
        value = np.asarray(leaves[entry.path])
        expected = ((cfg.n_layer,) if entry.in_block else ()) + entry.shape
        if value.shape != expected:
            raise ValueError(f"params[{where!r}] has shape {value.shape}, cfg expects {expected}")
        for i, array in (enumerate(value) if entry.in_block else [(None, value)]):
            out[entry.key(i)] = np.ascontiguousarray(array.T if entry.transposed else array)
    return out


# --- folders ---------------------------------------------------------------------------------

def _read_weights(folder: str) -> tuple[dict[str, Any], str]:
    """name -> array from the folder's safetensors or PyTorch weights (sharded or not)."""
    def read(file):
        path = os.path.join(folder, file)
        if file.endswith(".safetensors"):
            from safetensors.numpy import load_file
            return load_file(path)
        import torch
        return torch.load(path, map_location="cpu", weights_only=True)

    for file in _WEIGHT_FILES:
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            continue
        if not file.endswith(".index.json"):
            return read(file), path
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors |= read(shard)
        return tensors, path
    raise ValueError(f"path: no {' / '.join(_WEIGHT_FILES)} in {folder!r}")


def load_gpt2(path: str | os.PathLike, *, dtype: str = "float32",
              dropout: float = 0.0) -> tuple[Params, GPTConfig]:
    """``(params, cfg)`` from a local Hugging Face GPT-2 folder: ``config.json`` and
    ``model.safetensors`` (read with numpy; no torch needed) or ``pytorch_model.bin`` (read
    with ``torch.load(weights_only=True)``), sharded or not.

    Every tensor is checked against ``config.json``: a missing key, a wrong shape, a wrong
    vocabulary size or an unknown key raises a ``ValueError`` naming it. Nothing is downloaded.
    ``dtype``: ``cfg.dtype``, the compute dtype (``"float64"`` needs ``jax.enable_x64``); the
    parameters are stored in ``cfg.storage_dtype`` (float32 for a half compute dtype).
    ``dropout``: ``cfg.dropout`` for fine-tuning (0 by default).
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ValueError(f"path must be a folder holding config.json and the weights, got {folder!r}")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"path: no config.json in {folder!r}")
    with open(config_path) as f:
        hf_config = json.load(f)
    _dtype(dtype)
    tensors, weights_path = _read_weights(folder)
    return gpt2_from_state_dict(tensors, hf_config, dtype=dtype, dropout=dropout, source=weights_path)


def save_gpt2(params: Params, cfg: GPTConfig, path: str | os.PathLike, *,
              safe_serialization: bool = True) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin`` when
    ``safe_serialization=False``, which needs torch) to the folder ``path``, loadable with
    ``transformers.GPT2LMHeadModel.from_pretrained(path)``. Tied logits store no
    ``lm_head.weight`` (as Hugging Face does). Weight files of the other format left in the
    folder are removed so that they cannot shadow the new ones.

    Refuses what GPT-2 cannot represent: unmerged LoRA, ``bias=False``, an lm_head bias, a
    non-causal model, or params that do not match ``cfg``.
    """
    hf_config = config_to_hf(cfg)
    tensors = gpt2_to_state_dict(params, cfg)
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    for file in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, file)):
            os.remove(os.path.join(folder, file))
    if safe_serialization:
        from safetensors.numpy import save_file
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        import torch
        torch.save({k: _to_torch(torch, v) for k, v in tensors.items()},
                   os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
        f.write("\n")


def _to_torch(torch, array: np.ndarray):
    if array.dtype.name == "bfloat16":   # numpy has no bfloat16 of its own: reinterpret the bits
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))   # a writable copy

