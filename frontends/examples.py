"""Built-in example models (``builtin:<name>``), used before any checkpoint is at hand.

``tiny-block`` is one pre-norm transformer block (LayerNorm -> qkv -> attention with explicit
matmuls -> proj; LayerNorm -> fc1 -> GELU -> fc2) whose LayerNorm gains carry a few large
channels, the activation outliers that make naive per-tensor INT8 lose accuracy.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UserError
from frontends.generic import ModelBundle


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.heads))
        out = torch.matmul(F.softmax(att, dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def tiny_block(dim: int = 64, tokens: int = 16, batch: int = 2, seed: int = 0, outliers: float = 20.0) -> ModelBundle:
    g = torch.Generator().manual_seed(seed)
    block = Block(dim)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() == 1 else 1 / math.sqrt(p.shape[-1])))
        for norm in (block.norm1, block.norm2):
            norm.weight.fill_(1.0)
            idx = torch.randperm(dim, generator=g)[:3]
            norm.weight[idx] = outliers  # a few channels with large activations
    example = (torch.randn(batch, tokens, dim, generator=g),)
    calib = [(torch.randn(batch, tokens, dim, generator=g),) for _ in range(8)]
    dims = ({0: torch.export.Dim("batch", min=1, max=4096), 1: torch.export.Dim("tokens", min=1, max=4096)},)
    return ModelBundle("tiny-block", block.eval(), example, calib_inputs=calib, output_names=["y"],
                       extra={"dynamic_shapes": dims})


EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
# The shipped MNIST models (MODEL_CARD.md there): name -> (model, tokenizer) files in
# EMBEDDED_DIR, in the official checkpoint layouts; ``python -m tools.train_tiny`` writes them.
EMBEDDED = {"mnist-var": ("var_mnist.pth", "var_mnist_vae.pth"), "mnist-gpt": ("gpt_mnist.pt", "vq_mnist.pt"),
            "mnist-mar": ("mar_mnist.pth", "mar_mnist_kl.ckpt")}


def embedded(name: str, root: str | Path = EMBEDDED_DIR) -> ModelBundle:
    """A shipped model, loaded as any family checkpoint (detection from its keys, strict load)."""
    from frontends.generic import load_model

    model, tokenizer = EMBEDDED[name]
    return load_model(str(Path(root) / model), tokenizer=str(Path(root) / tokenizer))


BUILTINS = {"tiny-block": tiny_block, **{name: partial(embedded, name) for name in EMBEDDED}}


def load(name: str) -> ModelBundle:
    if name not in BUILTINS:
        raise UserError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTINS)}")
    return BUILTINS[name]()
