"""The PyTorch peer: the same GPT-2-style network written with ``torch.nn`` in the manner
of nanoGPT (pre-LayerNorm blocks, fused q/k/v projection, ``scaled_dot_product_attention``,
GELU tanh, tied logits), loaded with *our* parameters so both compute the same function,
and trained with ``torch.optim.AdamW`` on the same hyper-parameters.

``torch`` is an optional extra (``pip install manual-grad[interop]``); import this module
only when it is installed.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from manual_grad import GPTConfig

__all__ = ["TorchGPT", "from_params", "torch_train_step", "torch_dtype"]


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.causal = cfg.n_head, cfg.causal
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):                                             # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)   # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_width, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.n_embd, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh") if cfg.activation == "gelu" else nn.ReLU()

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """nanoGPT's GPT without dropout; ``forward(idx, targets)`` returns the mean
    cross-entropy (targets of -100 ignored)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.lora is not None:
            raise ValueError("cfg: the PyTorch peer has no LoRA adapters (cfg.lora must be None)")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        if not cfg.tied_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.lm_head_bias)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        logits = x @ self.wte.weight.T if self.cfg.tied_embeddings else self.lm_head(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=-100)


def _tensor(array, dtype, device, transpose=False):
    a = np.asarray(array, dtype=np.float32 if dtype == torch.bfloat16 else None)
    t = torch.from_numpy(np.array(a.T if transpose else a, order="C"))      # a writable copy
    return t.to(device=device, dtype=dtype)


def from_params(params: dict, cfg: GPTConfig, *, device: str = "cpu") -> TorchGPT:
    """A :class:`TorchGPT` holding a copy of ``params`` (our (in, out) weights become
    torch's (out, in))."""
    dtype = torch_dtype(cfg.dtype)
    model = TorchGPT(cfg).to(device=device, dtype=dtype)
    to = lambda a, transpose=False: _tensor(a, dtype, device, transpose)  # noqa: E731
    b = params["blocks"]
    with torch.no_grad():
        model.wte.weight.copy_(to(params["wte"]))
        model.wpe.weight.copy_(to(params["wpe"]))
        for i, block in enumerate(model.blocks):
            block.ln_1.weight.copy_(to(b["ln1"]["scale"][i]))
            block.ln_1.bias.copy_(to(b["ln1"]["bias"][i]))
            block.ln_2.weight.copy_(to(b["ln2"]["scale"][i]))
            block.ln_2.bias.copy_(to(b["ln2"]["bias"][i]))
            block.attn.c_attn.weight.copy_(to(b["attn"]["w_qkv"][i], True))
            block.attn.c_proj.weight.copy_(to(b["attn"]["w_o"][i], True))
            block.mlp.c_fc.weight.copy_(to(b["mlp"]["w_fc"][i], True))
            block.mlp.c_proj.weight.copy_(to(b["mlp"]["w_proj"][i], True))
            if cfg.bias:
                block.attn.c_attn.bias.copy_(to(b["attn"]["b_qkv"][i]))
                block.attn.c_proj.bias.copy_(to(b["attn"]["b_o"][i]))
                block.mlp.c_fc.bias.copy_(to(b["mlp"]["b_fc"][i]))
                block.mlp.c_proj.bias.copy_(to(b["mlp"]["b_proj"][i]))
        model.ln_f.weight.copy_(to(params["ln_f"]["scale"]))
        model.ln_f.bias.copy_(to(params["ln_f"]["bias"]))
        if not cfg.tied_embeddings:
            model.lm_head.weight.copy_(to(params["lm_head"]["w"], True))
            if cfg.lm_head_bias:
                model.lm_head.bias.copy_(to(params["lm_head"]["b"]))
    return model


def torch_train_step(model: nn.Module, optimizer_settings: dict, *, compile_model: bool = False):
    """``step(idx, targets) -> loss``: zero grads, forward, backward, AdamW update; waits for
    the device. With ``compile_model`` the forward runs through ``torch.compile``.
    ``step.forward_backward(idx, targets)`` runs the same without the update."""
    s = optimizer_settings
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["learning_rate"], betas=(s["b1"], s["b2"]),
                                  eps=s["eps"], weight_decay=s["weight_decay"])
    if compile_model:
        # A fresh compiler state per peer: dynamo counts recompilations of the model's forward
        # across instances and, past its limit (8), silently runs later shapes eagerly.
        torch._dynamo.reset()
    forward = torch.compile(model, dynamic=False) if compile_model else model

    def forward_backward(idx, targets):
        optimizer.zero_grad(set_to_none=True)
        loss = forward(idx, targets)
        loss.backward()
        if idx.is_cuda:
            torch.cuda.synchronize()
        return loss.detach()

    def step(idx, targets):
        loss = forward_backward(idx, targets)
        optimizer.step()
        if idx.is_cuda:
            torch.cuda.synchronize()
        return loss

    step.forward_backward = forward_backward
    return step


def peak_bytes(device: str) -> int | None:
    """``torch.cuda.max_memory_allocated`` on a GPU; None on CPU (torch keeps no CPU peak)."""
    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))


