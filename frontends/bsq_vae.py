"""The decoder of Infinity's BSQ VAE (``infinity_vae_d32reg.pth``): summed bit codes -> RGB image.

Our own code with the official module names (``infinity/models/bsq_vae/flux_vqgan.py``, the
``vae_model`` settings of ``tools/run_infinity.py``: 2D convs, no attention, GroupNorm(32), base 128
channels, ``ch_mult`` (1, 2, 4, 4, 4), 2 res blocks, patch 16). The file's ``"vae"`` (or ``"ema"``)
state_dict is read with ``weights_only``; only the ``decoder.*`` keys are used (generation never
encodes), and they load strictly. A conv or norm saved without its wrapper (``conv_in.weight``
instead of ``conv_in.conv.weight``) is renamed, as the official ``load_cnn`` accepts both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from frontends.generic import load_checkpoint, strict_load


@dataclass(frozen=True)
class BSQVAEConfig:
    codebook_dim: int = 32
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patch_size: int = 16


VAE_CONFIGS = {
    "d32": BSQVAEConfig(),
    "tiny": BSQVAEConfig(codebook_dim=4, base_ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_size=2),
}


class Conv(nn.Module):
    """The official wrapper (``.conv``), 2D."""

    def __init__(self, cin: int, cout: int, k: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding)

    def forward(self, x):
        return self.conv(x)


class Normalize(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 24 if channels % 24 == 0 else 0
        if not groups:
            raise UserError(f"BSQ VAE: {channels} channels is not a multiple of 32 or 24 (GroupNorm groups)")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)

    def forward(self, x):
        return self.norm(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), Conv(cin, cout, 3, 1)
        self.norm2, self.conv2 = Normalize(cout), Conv(cout, cout, 3, 1)
        if cin != cout:
            self.nin_shortcut = Conv(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        n, max_up = len(cfg.ch_mult), int(math.log2(cfg.patch_size))
        block_in = cfg.base_ch * cfg.ch_mult[-1]
        self.conv_in = Conv(cfg.codebook_dim, block_in, 3, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        ups = []
        for level in reversed(range(n)):
            up = nn.Module()
            blocks, out = [], cfg.base_ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, out))
                block_in = out
            up.block, up.attn = nn.ModuleList(blocks), nn.ModuleList()
            if 1 <= level <= max_up:
                up.upsample = Upsample(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in)
        self.conv_out = Conv(block_in, 3, 3, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BSQDecoder(nn.Module):
    """``decode(summed codes [B, d, H, W]) -> [B, 3, 16H, 16W]`` in [-1, 1] (the official ``vae.decode``)."""

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        self.config = cfg
        self.decoder = Decoder(cfg)

    def forward(self, codes_BdHW):
        return self.decoder(codes_BdHW).clamp(-1, 1)


def _canonical(state_dict: dict, expected: set[str]) -> dict:
    """Keys renamed to the module's where only the wrapper differs (``conv1.weight`` -> ``conv1.conv.weight``,
    ``norm1.weight`` -> ``norm1.norm.weight``), as the official ``load_cnn`` accepts both spellings."""
    out = {}
    for key, value in state_dict.items():
        head, _, leaf = key.rpartition(".")
        for name in (key, f"{head}.conv.{leaf}", f"{head}.norm.{leaf}"):
            if name in expected:
                key = name
                break
        out[key] = value
    return out


def _meta(cfg: BSQVAEConfig) -> BSQDecoder:
    with torch.device("meta"):
        return BSQDecoder(cfg)


def load_bsq_decoder(path: str | Path, codebook_dim: int) -> BSQDecoder:
    """The decoder of a BSQ VAE file for tokens of ``codebook_dim`` bits (strict on ``decoder.*``)."""
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("vae", obj.get("ema")), dict):
        obj = obj.get("vae", obj.get("ema"))
    if not isinstance(obj, dict):
        raise UserError(f"tokenizer {path}: expected a BSQ VAE state_dict (or a dict with 'vae'), got {type(obj).__name__}")
    decoder = {k: v for k, v in obj.items() if k.startswith("decoder.")}
    if not decoder:
        raise UserError(f"tokenizer {path}: no decoder.* keys; not a BSQ VAE (infinity_vae_d32reg.pth)")
    z = decoder.get("decoder.conv_in.conv.weight", decoder.get("decoder.conv_in.weight"))
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        raise UserError(f"tokenizer {path}: decoder.conv_in.conv.weight missing or not a 2D conv")
    if z.shape[1] != codebook_dim:
        raise UserError(f"tokenizer {path} decodes {z.shape[1]}-bit codes; the model makes {codebook_dim}-bit tokens")
    from frontends.generic import state_dict_problems

    candidates = {name: _meta(cfg) for name, cfg in VAE_CONFIGS.items() if cfg.codebook_dim == codebook_dim}
    if not candidates:
        raise UserError(f"tokenizer {path}: no known BSQ VAE config has {codebook_dim}-bit codes")
    renamed = {n: _canonical(decoder, set(m.state_dict())) for n, m in candidates.items()}
    name = min(candidates, key=lambda n: len(state_dict_problems(candidates[n], renamed[n])))
    return strict_load(candidates[name], renamed[name], f"tokenizer {path} (closest BSQ VAE config: {name})").float().eval()
