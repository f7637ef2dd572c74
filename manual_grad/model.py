"""The GPT: parameters, forward pass and loss, composed from the layer ops.

This file is composition only, no calculus: ``backend="manual"`` calls the hand-written
custom-VJP ops of :mod:`manual_grad.layers`, ``backend="autodiff"`` calls their plain-jnp
``*_ref`` twins, and the same code wires either set into the model. Blocks are stacked on a
leading axis L and run with ``lax.scan``, so compile time does not grow with depth.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from manual_grad import kernels, layers
from manual_grad.config import GPTConfig
from manual_grad.inputs import check_call, check_ids
from manual_grad.layers.kv_cache import attention_cached
from manual_grad.layers.loss import IGNORE_INDEX
from manual_grad.seq_parallel import seq_split

__all__ = ["init_params", "attach_lora", "UNROLLED_DEPTH", "merge_lora", "split_lora", "forward", "loss_fn",
           "count_params", "embed", "block", "blocks", "final_norm", "head", "BACKENDS", "IGNORE_INDEX"]

Params = dict[str, Any]


class Ops(NamedTuple):
    """The layer ops one backend composes."""
    embedding: Callable
    layernorm: Callable
    attention: Callable
    mlp: Callable
    logits: Callable
    logits_loss: Callable
    dropout: Callable


BACKENDS = {
    "manual": Ops(layers.embedding, layers.layernorm, layers.attention, layers.mlp,
                  layers.logits, layers.logits_loss, layers.dropout),
    "autodiff": Ops(layers.embedding_ref, layers.layernorm_ref, layers.attention_ref,
                    layers.mlp_ref, layers.logits_ref, layers.logits_loss_ref, layers.dropout_ref),
}


# --- parameters --------------------------------------------------------------------------

def init_params(cfg: GPTConfig, key: jax.Array) -> Params:
    """GPT-2-style initialisation: weights N(0, 0.02), the residual projections (w_o, w_proj)
    N(0, 0.02 / sqrt(2 L)), biases 0, LayerNorm scale 1. LoRA adapters are attached when
    ``cfg.lora`` is set (see :func:`attach_lora`)."""
    if not isinstance(cfg, GPTConfig):
        raise ValueError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
    V, T, L, C, F = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd, cfg.mlp_width
    dtype = jnp.dtype(cfg.storage_dtype)
    k = iter(jax.random.split(key, 8))

    def normal(shape, std=0.02):
        return (std * jax.random.normal(next(k), shape, jnp.float32)).astype(dtype)

    def zeros(*shape):
        return jnp.zeros(shape, dtype)

    def ln(*lead):
        return {"scale": jnp.ones((*lead, C), dtype), "bias": zeros(*lead, C)}

    proj_std = 0.02 / math.sqrt(2 * L)
    attn = {"w_qkv": normal((L, C, 3 * C)), "w_o": normal((L, C, C), proj_std)}
    mlp = {"w_fc": normal((L, C, F)), "w_proj": normal((L, F, C), proj_std)}
    if cfg.bias:
        attn |= {"b_qkv": zeros(L, 3 * C), "b_o": zeros(L, C)}
        mlp |= {"b_fc": zeros(L, F), "b_proj": zeros(L, C)}
    params = {
        "wte": normal((V, C)),
        "wpe": normal((T, C)),
        "blocks": {"ln1": ln(L), "attn": attn, "ln2": ln(L), "mlp": mlp},
        "ln_f": ln(),
    }
    if not cfg.tied_embeddings:
        params["lm_head"] = {"w": normal((C, V))}
        if cfg.lm_head_bias:
            params["lm_head"]["b"] = zeros(V)
    if cfg.lora is not None:
        params = attach_lora(params, cfg, next(k))
    return params


def _adapter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every layer an adapter can sit on."""
    C, F, V = cfg.n_embd, cfg.mlp_width, cfg.vocab_size
    return {"q": (C, C), "k": (C, C), "v": (C, C), "o": (C, C), "fc": (C, F), "proj": (F, C),
            "logits": (C, V)}


def attach_lora(params: Params, cfg: GPTConfig, key: jax.Array) -> Params:
    """Adds fresh adapters for ``cfg.lora`` under ``params["lora"]``: A ~ U(±1/sqrt(in))
    (as PEFT's Kaiming-uniform), B = 0, so the model's output is unchanged.

    Layout: ``lora = {"blocks": {"attn": {"q": {"a": (L, C, r), "b": (L, r, C)}, ...},
    "mlp": {"fc": ..., "proj": ...}}, "logits": {"a": (C, r), "b": (r, V)}}``.
    """
    if cfg.lora is None:
        raise ValueError("cfg.lora must be a LoRAConfig to attach adapters")
    r, L, dtype = cfg.lora.rank, cfg.n_layer, jnp.dtype(cfg.storage_dtype)
    shapes = _adapter_shapes(cfg)
    keys = dict(zip(cfg.lora.targets, jax.random.split(key, len(cfg.lora.targets))))

    def adapter(name, lead):
        n_in, n_out = shapes[name]
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(keys[name], (*lead, n_in, r), jnp.float32, -bound, bound)
        return {"a": a.astype(dtype), "b": jnp.zeros((*lead, r, n_out), dtype)}

    lora = {"blocks": {
        "attn": {n: adapter(n, (L,)) for n in ("q", "k", "v", "o") if n in cfg.lora.targets},
        "mlp": {n: adapter(n, (L,)) for n in ("fc", "proj") if n in cfg.lora.targets}}}
    if "logits" in cfg.lora.targets:
        lora["logits"] = adapter("logits", ())
    return {**params, "lora": lora}


def split_lora(params: Params) -> tuple[Params, Params]:
    """(base parameters, adapters): the frozen and the trainable parts of a LoRA model."""
    base = {k: v for k, v in params.items() if k != "lora"}
    return base, params.get("lora", {})


def merge_lora(params: Params, cfg: GPTConfig) -> tuple[Params, GPTConfig]:
    """Folds the adapters into the base weights, ``W <- W + s A B``, and drops them.

    Returns the merged parameters and the config without LoRA. A logits adapter on tied
    embeddings unties them (the embedding must stay as it was), giving ``lm_head.w =
    wte^T + s A B``.
    """
    if cfg.lora is None or "lora" not in params:
        raise ValueError("params: no LoRA adapters to merge (cfg.lora is None or params has no 'lora')")
    base, lora = split_lora(params)
    s, C = cfg.lora.scale, cfg.n_embd

    def delta(adapter):
        return s * (adapter["a"] @ adapter["b"])

    blocks = jax.tree.map(lambda x: x, base["blocks"])
    attn, mlp = dict(blocks["attn"]), dict(blocks["mlp"])
    for i, name in enumerate(("q", "k", "v")):
        if name in lora["blocks"]["attn"]:
            attn["w_qkv"] = attn["w_qkv"].at[..., i * C:(i + 1) * C].add(delta(lora["blocks"]["attn"][name]))
    if "o" in lora["blocks"]["attn"]:
        attn["w_o"] = attn["w_o"] + delta(lora["blocks"]["attn"]["o"])
    for name, weight in (("fc", "w_fc"), ("proj", "w_proj")):
        if name in lora["blocks"]["mlp"]:
            mlp[weight] = mlp[weight] + delta(lora["blocks"]["mlp"][name])
    merged = {**base, "blocks": {**blocks, "attn": attn, "mlp": mlp}}
    new_cfg = cfg.replace(lora=None)
    if "logits" in lora:
        if cfg.tied_embeddings:
            merged["lm_head"] = {"w": base["wte"].T + delta(lora["logits"])}
            new_cfg = new_cfg.replace(tied_embeddings=False)
        else:
            merged["lm_head"] = {**base["lm_head"], "w": base["lm_head"]["w"] + delta(lora["logits"])}
    return merged, new_cfg


def count_params(tree_or_cfg: Params | GPTConfig, *, which: str = "all") -> int:
    """Number of scalars in a parameter pytree (arrays or shape structs) or in a config's
    parameters (counted from shapes, nothing allocated).

    ``which``: ``"all"``; ``"base"`` (everything but LoRA adapters); ``"lora"`` (adapters only,
    the trainable count of a LoRA fine-tune).
    """
    if which not in ("all", "base", "lora"):
        raise ValueError(f"which must be 'all', 'base' or 'lora', got {which!r}")
    tree = tree_or_cfg
    if isinstance(tree_or_cfg, GPTConfig):
        tree = jax.eval_shape(lambda: init_params(tree_or_cfg, jax.random.key(0)))
    if isinstance(tree, dict):
        base, lora = split_lora(tree)
        tree = {"all": tree, "base": base, "lora": lora}[which]
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


# --- the model -----------------------------------------------------------------------------

def _compute_params(params: Params, cfg: GPTConfig) -> Params:
    """The parameters cast to the compute dtype (a no-op when they are stored in it); the
    cast's transpose returns the gradients in the storage dtype."""
    dtype = jnp.dtype(cfg.dtype)
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def _layer_settings(cfg: GPTConfig, backend: str) -> dict[str, dict]:
    """Static settings of each op: the lean or the paper backward for the manual backend."""
    lean = backend == "manual" and cfg.backward == "lean"
    backward = "lean" if lean else "paper"
    s = cfg.lora.scale if cfg.lora is not None else 1.0
    core = kernels.select(cfg.kernels if lean else "xla", cfg.dtype)     # Pallas cores, or None
    return {
        "layernorm": dict(eps=cfg.ln_eps, backward=backward),
        "attention": dict(n_head=cfg.n_head, causal=cfg.causal, lora_scale=s,
                          backward=backward, tile=cfg.attn_block_size, core=core["attention"]),
        "mlp": dict(activation=cfg.activation, lora_scale=s),
        "logits": dict(tied=cfg.tied_embeddings, lora_scale=s),
        # chunking pays only when a token's logits are larger than its hidden state
        "loss": dict(tied=cfg.tied_embeddings, lora_scale=s,
                     backward=backward if cfg.vocab_size > cfg.n_embd else "paper", chunk=cfg.loss_chunk,
                     core=core["loss"]),
    }


Tap = Callable[[str, jax.Array], None]


def _tapped(tap: Tap | None, name: str, value):
    """``value``, after showing it to ``tap`` (a debug hook) under ``name``."""
    if tap is not None:
        tap(name, value)
    return value


def _dropout(cfg: GPTConfig, dropout_key):
    """``(rate, keys)``: the dropout rate (0 outside training) and 2 L + 1 keys, one per block
    branch then the embedding's."""
    train = dropout_key is not None and cfg.dropout > 0
    keys = jax.random.split(dropout_key if train else jax.random.key(0), 2 * cfg.n_layer + 1)
    return (cfg.dropout if train else 0.0), keys


def block(x, p: Params, adapters: Params, cfg: GPTConfig, backend: str = "manual", *, rate: float = 0.0,
          keys=(None, None), cache=None, pos=0, tap: Tap | None = None, attention_core=None):
    """One pre-LN transformer block on x (B, T, C): ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``,
    with dropout ``rate`` on each branch. Returns ``(x, cache)``. ``attention_core``: replaces
    the attention layer's core (the ring when the time axis is split over a mesh).

    ``p``/``adapters``: one layer's slice of ``params["blocks"]`` / ``params["lora"]["blocks"]``.
    ``cache``: this block's (K, V) (B, H, S, D) for decoding; x then holds the tokens at
    positions ``pos ..`` and attends over the cache (:mod:`manual_grad.layers.kv_cache`).
    ``tap(name, value)`` sees every op's output (:mod:`manual_grad.debug`).
    """
    ops, settings = BACKENDS[backend], _layer_settings(cfg, backend)
    if attention_core is not None:
        settings["attention"]["core"] = attention_core
    key_attn, key_mlp = keys
    attn, mlp = p["attn"], p["mlp"]
    h = _tapped(tap, "blocks/ln1", ops.layernorm(x, p["ln1"]["scale"], p["ln1"]["bias"], **settings["layernorm"]))
    if cache is None:
        a = ops.attention(h, attn["w_qkv"], attn.get("b_qkv"), attn["w_o"], attn.get("b_o"),
                          adapters.get("attn", {}), **settings["attention"])
    else:
        a, cache = attention_cached(h, attn["w_qkv"], attn.get("b_qkv"), attn["w_o"], attn.get("b_o"),
                                    adapters.get("attn", {}), cache, pos, n_head=cfg.n_head,
                                    lora_scale=settings["attention"]["lora_scale"])
    a = _tapped(tap, "blocks/attention", a)
    x = x + _tapped(tap, "blocks/attention dropout", ops.dropout(a, key_attn, rate=rate))
    h = _tapped(tap, "blocks/ln2", ops.layernorm(x, p["ln2"]["scale"], p["ln2"]["bias"], **settings["layernorm"]))
    m = _tapped(tap, "blocks/mlp", ops.mlp(h, mlp["w_fc"], mlp.get("b_fc"), mlp["w_proj"], mlp.get("b_proj"),
                                           adapters.get("mlp", {}), **settings["mlp"]))
    return x + _tapped(tap, "blocks/mlp dropout", ops.dropout(m, key_mlp, rate=rate)), cache


UNROLLED_DEPTH = 2      # stacks of at most this many blocks are unrolled (see blocks)


def blocks(params: Params, x, cfg: GPTConfig, backend: str = "manual", *, dropout_key=None, cache=None,
           pos=0, tap: Tap | None = None, attention_core=None):
    """Every block, by ``lax.scan`` over the stacked layers: ``(x (B, T, C), cache)``.

    ``cache``: (K, V) each (L, B, H, S, D), or None. Dropout when ``dropout_key`` is given and
    ``cfg.dropout > 0``. A stack of at most ``UNROLLED_DEPTH`` blocks is unrolled: a rolled scan
    passes each block's residuals through zero-filled (L, ...) stacks, written and read back,
    about a tenth of a small model's step (benchmarks/findings.md, finding 8); two blocks keep
    the program, and the compile time, bounded.
    """
    lora = params.get("lora", {})
    rate, keys = _dropout(cfg, dropout_key)
    keys = keys[:-1].reshape(cfg.n_layer, 2)

    def step(x, layer):
        p, adapters, layer_keys, layer_cache = layer
        return block(x, p, adapters, cfg, backend, rate=rate, keys=(layer_keys[0], layer_keys[1]),
                     cache=layer_cache, pos=pos, tap=tap, attention_core=attention_core)
    unroll = 0 if cfg.n_layer <= UNROLLED_DEPTH else 1                      # 0: every step unrolled
    return jax.lax.scan(step, x, (params["blocks"], lora.get("blocks", {}), keys, cache), unroll=unroll)


def embed(params: Params, inputs, cfg: GPTConfig, backend: str = "manual", *, dropout_key=None,
          tap: Tap | None = None):
    """Token ids (B, T) -> token + position embeddings (B, T, C), with dropout in training."""
    ops = BACKENDS[backend]
    rate, keys = _dropout(cfg, dropout_key)
    x = _tapped(tap, "embedding", ops.embedding(inputs, params["wte"], params["wpe"]))
    return _tapped(tap, "embedding dropout", ops.dropout(x, keys[-1], rate=rate))


def final_norm(params: Params, x, cfg: GPTConfig, backend: str = "manual", *, tap: Tap | None = None):
    """The last LayerNorm, ``ln_f``: (B, T, C) -> (B, T, C)."""
    settings = _layer_settings(cfg, backend)["layernorm"]
    return _tapped(tap, "ln_f", BACKENDS[backend].layernorm(x, params["ln_f"]["scale"], params["ln_f"]["bias"],
                                                            **settings))


def head(params: Params, x, cfg: GPTConfig, backend: str = "manual", *, tap: Tap | None = None):
    """The head: ``ln_f`` then the logits layer, (..., C) -> (..., V)."""
    x = final_norm(params, x, cfg, backend, tap=tap)
    logits = BACKENDS[backend].logits(x, *_head(params, cfg), **_layer_settings(cfg, backend)["logits"])
    return _tapped(tap, "logits", logits)


def _hidden(params: Params, inputs, cfg: GPTConfig, backend: str, dropout_key, tap, core=None) -> jax.Array:
    """Token ids (B, T) -> the last block's output (B, T, C); ``core``: attention's, if not the default."""
    x = embed(params, inputs, cfg, backend, dropout_key=dropout_key, tap=tap)
    return blocks(params, x, cfg, backend, dropout_key=dropout_key, tap=tap, attention_core=core)[0]


def _split(inputs, cfg: GPTConfig, backend: str, mesh):
    """``(split, core)``: the time axis split over ``mesh``'s seq axis and its ring, or (None, None)."""
    split = seq_split(mesh, inputs.shape, causal=cfg.causal, backend=backend, tile=cfg.attn_block_size)
    return split, (None if split is None else split.core)


def _head(params: Params, cfg: GPTConfig):
    """(weight, bias, adapters) of the logits layer."""
    w = params["wte"] if cfg.tied_embeddings else params["lm_head"]["w"]
    b = None if cfg.tied_embeddings else params["lm_head"].get("b")
    adapters = {"logits": params["lora"]["logits"]} if "logits" in params.get("lora", {}) else {}
    return w, b, adapters


def forward(params: Params, inputs: jax.typing.ArrayLike, cfg: GPTConfig, backend: str = "manual", *,
            dropout_key: jax.Array | None = None, tap: Tap | None = None,
            mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """Logits (B, T, V) for token ids ``inputs`` (B, T). Dropout only when ``dropout_key`` is given;
    ``tap(name, value)`` sees every op's output; ``mesh``: as for :func:`loss_fn`."""
    check_call(params, inputs, cfg, backend, BACKENDS)
    params, (split, core) = _compute_params(params, cfg), _split(inputs, cfg, backend, mesh)

    def logits(params, inputs, key):
        return head(params, _hidden(params, inputs, cfg, backend, key, tap, core), cfg, backend, tap=tap)
    return logits(params, inputs, dropout_key) if split is None else split.forward(logits, params, inputs, dropout_key)


def loss_fn(params: Params, inputs: jax.typing.ArrayLike, targets: jax.typing.ArrayLike, cfg: GPTConfig,
            backend: str = "manual", *, dropout_key: jax.Array | None = None, tap: Tap | None = None,
            mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    """Mean next-token cross-entropy over the counted targets (a target of -100 is ignored).

    ``jax.grad(loss_fn)`` runs the hand-written backwards with ``backend="manual"`` (the lean
    or the paper variant, by ``cfg.backward``) and JAX's autodiff of the plain-jnp twins with
    ``backend="autodiff"``. The loss is computed in at least float32. ``mesh``: a mesh from
    :func:`manual_grad.parallel.make_mesh`; with a ``seq`` axis the time axis is split over it
    and attention runs as ring attention (:mod:`manual_grad.seq_parallel`).
    """
    check_call(params, inputs, cfg, backend, BACKENDS)
    check_ids("targets", targets, cfg, allow_ignore=True)
    if targets.shape != inputs.shape:
        raise ValueError(f"targets must have the shape of inputs {tuple(inputs.shape)}, "
                         f"got {tuple(targets.shape)}")
    params, (split, core) = _compute_params(params, cfg), _split(inputs, cfg, backend, mesh)

    def loss(params, inputs, targets, key):
        x = final_norm(params, _hidden(params, inputs, cfg, backend, key, tap, core), cfg, backend, tap=tap)
        w, b, adapters = _head(params, cfg)
        mean = BACKENDS[backend].logits_loss(x, w, b, targets, adapters, **_layer_settings(cfg, backend)["loss"])
        return _tapped(tap, "logits+loss", mean)
    return loss(params, inputs, targets, dropout_key) if split is None else split.loss(
        loss, params, inputs, targets, dropout_key)
