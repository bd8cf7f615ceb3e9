"""LlamaGen's VQ image tokenizer (``VQ-16``, file ``vq_ds16_c2i.pt``), used by LlamaGen and PAR.

A convolutional encoder/decoder (GroupNorm(32) + swish ResNet blocks, one self-attention level at
the lowest resolution, downsampling by 16) around a codebook of 8-d vectors. The codebook is
l2-normalised at lookup (as the official ``get_codebook_entry``), so encode picks the code with the
largest cosine similarity and decode reads normalised vectors. Attribute names equal the official
``tokenizer/tokenizer_image/vq_model.py`` so its checkpoints load strictly (models.md §2.4).

Images are ``[B, 3, H, W]`` in [0, 1]; token ids are ``[B, (H/16)·(W/16)]`` in raster order.
The tokenizer stays in full precision: it is not part of the traced step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_embed_dim: int = 8

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQ_CONFIGS = {
    "VQ-16": VQConfig(),
    # Same topology (so the same code paths), 4x narrower; 64x64 images <-> 4x4 tokens.
    "tiny": VQConfig(ch=32, z_channels=32, codebook_size=64),
    # The shipped MNIST tokenizer (frontends/embedded/vq_mnist.pt): downsampling by 4, so a
    # 32x32 digit is an 8x8 grid of tokens.
    "mnist": VQConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=32, codebook_size=256),
}

CODEBOOK_USAGE_SLOTS = 65536  # size of the official (training-only) ``codebook_used`` buffer


def detect_vq(state_dict: dict) -> str | None:
    """Name of the VQ config whose widths match the checkpoint (codebook shape is read from it)."""
    conv_in = state_dict.get("encoder.conv_in.weight")
    if conv_in is None or "quantize.embedding.weight" not in state_dict:
        return None
    levels = 1 + max((int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.conv_blocks.")), default=-1)
    for name, cfg in VQ_CONFIGS.items():
        if cfg.ch == conv_in.shape[0] and len(cfg.ch_mult) == levels:
            return name
    return None


def vq_config(name: str, state_dict: dict) -> VQConfig:
    """The named config with the codebook and latent widths of ``state_dict``."""
    codebook = state_dict["quantize.embedding.weight"]
    return VQConfig(**{**VQ_CONFIGS[name].__dict__, "codebook_size": codebook.shape[0],
                       "codebook_embed_dim": codebook.shape[1],
                       "z_channels": state_dict["quant_conv.weight"].shape[1]})


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # [B, HW, C]
        out = F.softmax(q @ k.transpose(1, 2) * x.shape[1] ** -0.5, dim=-1) @ v
        return x + self.proj_out(out.transpose(1, 2).reshape(x.shape))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # the official asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(c_in: int, c_out: int, n_res: int, with_attn: bool) -> nn.Module:
    """One resolution level: ``res`` blocks, ``attn`` after each of them on the lowest level."""
    level = nn.Module()
    level.res = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_res))
    level.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_res if with_attn else 0))
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _middle(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip([cfg.ch] + widths, widths)):
            level = _level(c_in, c_out, cfg.num_res_blocks, with_attn=i == len(widths) - 1)
            if i < len(widths) - 1:
                level.downsample = Downsample(c_out)
            self.conv_blocks.append(level)
        self.mid = _middle(widths[-1])
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder; ``conv_blocks[0]`` is the lowest resolution (the official order)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = _middle(widths[0])
        self.conv_blocks = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(widths[:1] + widths, widths)):
            level = _level(c_in, c_out, cfg.num_res_blocks + 1, with_attn=i == 0)
            if i < len(widths) - 1:
                level.upsample = Upsample(c_out)
            self.conv_blocks.append(level)
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        # Training statistics only; kept so that official checkpoints load strictly.
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_SLOTS))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> token ids ``[B, (H/16)·(W/16)]`` (raster order).

        Both sides are unit vectors, so the nearest code is the one of largest dot product.
        """
        z = self.quant_conv(self.encoder(images * 2 - 1))
        z = F.normalize(z.flatten(2).transpose(1, 2), dim=-1)  # [B, hw, d]
        return (z @ self.quantize.codebook().T).argmax(-1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, N]`` (raster order, N a square) -> images ``[B, 3, H, W]`` in [0, 1]."""
        side = round(ids.shape[1] ** 0.5)
        z = self.quantize.codebook()[ids].unflatten(1, (side, side)).permute(0, 3, 1, 2)
        images = self.decoder(self.post_quant_conv(z))
        return ((images + 1) / 2).clamp(0, 1)
