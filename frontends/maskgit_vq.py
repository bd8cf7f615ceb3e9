"""MaskGIT-VQGAN, the image tokenizer of RAR (``maskgit-vqgan-imagenet-f16-256.bin``).

Parameter names equal the official ``PretrainedTokenizer`` state_dict (bytedance/1d-tokenizer,
``modeling/modules/maskgit_vqgan.py``) so the released file loads strictly. The tokenizer is
never quantized: it only turns images into codebook ids (calibration from real images) and ids
back into images (evaluation).

Two quirks of the official network are kept on purpose, since the weights were trained with them:
the residual blocks have bias-free convolutions, and when a block changes the channel count its
``nin_shortcut`` is applied to the *output* branch, not to the block input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UserError
from frontends.generic import load_checkpoint, strict_load


@dataclass(frozen=True)
class VQConfig:
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    hidden_channels: int = 128
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 1024
    num_channels: int = 3


VQ_CONFIGS = {
    "maskgit-f16-256": VQConfig(),
    # f4, 4x4 latent grid: 16 tokens, 16x16 images. GroupNorm(32) needs multiples of 32 channels.
    "tiny": VQConfig(channel_mult=(1, 1, 2), hidden_channels=32, num_res_blocks=1, z_channels=32, codebook_size=64),
}


def conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    """The official ``Conv2dSame`` (TF "same" padding). Every conv of this network has stride 1
    and an odd kernel, where TF padding is symmetric, so a plain padded Conv2d is identical."""
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = norm(cin)
        self.conv1 = conv(cin, cout, 3, bias=False)
        self.norm2 = norm(cout)
        self.conv2 = conv(cout, cout, 3, bias=False)
        self.nin_shortcut = conv(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        residual = x if self.nin_shortcut is None else self.nin_shortcut(h)  # official quirk: output branch
        return h + residual


def res_stack(cin: int, cout: int, n: int) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(n))


class DownLevel(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, downsample: bool):
        super().__init__()
        self.block = res_stack(cin, cout, n)
        self.downsample = downsample

    def forward(self, x):
        for blk in self.block:
            x = blk(x)
        return F.avg_pool2d(x, 2) if self.downsample else x


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, upsample: bool):
        super().__init__()
        self.block = res_stack(cin, cout, n)
        self.upsample_conv = conv(cout, cout, 3) if upsample else None

    def forward(self, x):
        for blk in self.block:
            x = blk(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.hidden_channels * m for m in cfg.channel_mult]
        ins = [cfg.hidden_channels] + chans[:-1]
        self.conv_in = conv(cfg.num_channels, cfg.hidden_channels, 3, bias=False)
        self.down = nn.ModuleList(DownLevel(ins[i], chans[i], cfg.num_res_blocks, i < len(chans) - 1)
                                  for i in range(len(chans)))
        self.mid = res_stack(chans[-1], chans[-1], cfg.num_res_blocks)
        self.norm_out = norm(chans[-1])
        self.conv_out = conv(chans[-1], cfg.z_channels, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        for blk in self.mid:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """``up[i]`` is resolution level i (0 = full size); they run from the lowest level up."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.hidden_channels * m for m in cfg.channel_mult]
        ins = chans[1:] + chans[-1:]
        self.conv_in = conv(cfg.z_channels, chans[-1], 3)
        self.mid = res_stack(chans[-1], chans[-1], cfg.num_res_blocks)
        self.up = nn.ModuleList(UpLevel(ins[i], chans[i], cfg.num_res_blocks, i > 0) for i in range(len(chans)))
        self.norm_out = norm(chans[0])
        self.conv_out = conv(chans[0], cfg.num_channels, 3)

    def forward(self, z):
        x = self.conv_in(z)
        for blk in self.mid:
            x = blk(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)

    def ids(self, z):
        """Nearest codebook entry of every latent pixel: ``[B, C, h, w] -> [B, h*w]`` (raster order)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        book = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.t()
        return dist.argmin(1).reshape(z.shape[0], -1)

    def latents(self, ids):
        """``[B, n] -> [B, C, sqrt(n), sqrt(n)]``: RAR's 1-D token sequence is a square raster grid."""
        side = math.isqrt(ids.shape[1])
        return self.embedding(ids).reshape(ids.shape[0], side, side, -1).permute(0, 3, 1, 2)


class MaskGITVQ(nn.Module):
    """Images in [0, 1] <-> codebook ids. Key order and names as the official tokenizer."""

    def __init__(self, cfg: VQConfig = VQConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.z_channels)

    @torch.no_grad()
    def encode(self, images):
        """``[B, 3, H, W]`` in [0, 1] -> ids ``[B, (H/f)*(W/f)]``."""
        return self.quantize.ids(self.encoder(images))

    @torch.no_grad()
    def decode(self, ids):
        """ids ``[B, n]`` -> images ``[B, 3, H, W]`` clamped to [0, 1] (the decoder's output range)."""
        return self.decoder(self.quantize.latents(ids)).clamp(0.0, 1.0)


def count_indexed(state_dict: dict, pattern: str) -> int:
    """How many consecutive indices ``i = 0, 1, ...`` have ``pattern.format(i)`` in the state_dict."""
    n = 0
    while pattern.format(n) in state_dict:
        n += 1
    return n


def infer_vq_config(state_dict: dict) -> VQConfig:
    """Read the architecture from the tensor shapes, so any MaskGIT-VQGAN size loads without a name."""
    needed = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "quantize.embedding.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise UserError(f"not a MaskGIT-VQGAN tokenizer checkpoint: missing keys: {', '.join(missing)}")
    out_ch, in_ch = state_dict["encoder.conv_in.weight"].shape[:2]
    levels = count_indexed(state_dict, "encoder.down.{}.block.0.conv1.weight")
    mult = tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // out_ch for i in range(levels))
    n_res = count_indexed(state_dict, "encoder.down.0.block.{}.conv1.weight")
    book = state_dict["quantize.embedding.weight"]
    return VQConfig(mult, out_ch, n_res, book.shape[1], book.shape[0], in_ch)


def load_strict(module: nn.Module, state_dict: dict, what: str) -> nn.Module:
    """``strict_load`` (meta-built module adopts the tensors), then float32, eval, frozen."""
    return strict_load(module, state_dict, what).float().eval().requires_grad_(False)


def build_tokenizer(state_dict: dict, what: str = "tokenizer") -> MaskGITVQ:
    cfg = infer_vq_config(state_dict)
    with torch.device("meta"):
        vq = MaskGITVQ(cfg)
    return load_strict(vq, state_dict, what)


def load_tokenizer(path: str | Path) -> MaskGITVQ:
    """The official tokenizer file (a plain state_dict), read with ``weights_only``."""
    state_dict = load_checkpoint(path)
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} holds a {type(state_dict).__name__}, not a tokenizer state_dict")
    return build_tokenizer(state_dict, f"tokenizer {path}")
