"""VAR's multi-scale residual VQVAE: tokenizer (images -> token pyramid) and decoder (tokens -> images).

Attribute names follow the official ``vae_ch160v4096z32.pth`` (FoundationVision/VAR,
``models/{vqvae,quant,basic_vae}.py``) so that file loads with ``strict=True``. The code is our
own; only the layout and the maths are the official ones:

* encoder/decoder: LDM-style GroupNorm + SiLU ResNet blocks, single-head attention blocks at the
  lowest resolution, ``2 ** (len(ch_mult) - 1)`` down-sampling;
* quantizer: residual quantization over the scales ``patch_nums``: at scale ``si`` the residual
  is area-downsampled to ``pn x pn``, snapped to the nearest code, bicubic-upsampled back, passed
  through the shared convolution ``Phi`` picked for that scale, and added to ``f_hat``.

Images are float tensors ``[B, 3, H, W]`` in ``[0, 1]`` on both sides (the official encoder
takes ``[-1, 1]``; we convert inside so callers never have to).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from frontends.generic import load_checkpoint, state_dict_problems, strict_load


@functools.cache
def _bicubic_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[n_out, n_in]``: bicubic resizing of one axis (align_corners=False, edges clamped), as a matrix: the
    interpolation of each unit vector (a 1-wide axis is copied exactly by the other factor)."""
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
    return F.interpolate(eye, size=(n_out, 1), mode="bicubic")[:, 0, :, 0].T.to(device, dtype).contiguous()


def bicubic_upsample(x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    """``F.interpolate(x, size=(size, size), mode="bicubic")`` as two small matrix products (bicubic is
    separable: ``A @ x @ A.T``). Equal up to float rounding; torch's CUDA kernel gives each output pixel one
    thread that loops over batch and channels, about 1 ms a call at VAR's batch 64 (nine calls a generation)."""
    h, w = x_BChw.shape[-2:]
    rows = _bicubic_matrix(h, size, x_BChw.device, x_BChw.dtype)
    cols = rows if w == h else _bicubic_matrix(w, size, x_BChw.device, x_BChw.dtype)
    return rows @ x_BChw @ cols.T


@dataclass(frozen=True)
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32  # Cvae: channels of a code vector
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True  # attention blocks at the lowest encoder/decoder resolution
    using_mid_sa: bool = True
    quant_resi: float = 0.5  # Phi(h) = (1 - r) * h + r * conv(h)
    share_quant_resi: int = 4  # number of Phi convolutions shared by the scales
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.downsample * self.patch_nums[-1]


VQVAE_CONFIGS = {
    "ch160v4096z32": VQVAEConfig(),
    # 32x32 images (MNIST padded), 4x4 latent, the scales of VAR's tiny config.
    "tiny": VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                        patch_nums=(1, 2, 3, 4)),
    # The shipped MNIST tokenizer (frontends/embedded/var_mnist_vae.pth): 32x32 -> 8x8 latent.
    "mnist": VQVAEConfig(vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                         patch_nums=(1, 2, 3, 4, 6, 8)),
}


# ----------------------------------------------------------------------------- state_dict checks

# ----------------------------------------------------------------------------- encoder / decoder

def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def _conv3x3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _group_norm(cin)
        self.conv1 = _conv3x3(cin, cout)
        self.norm2 = _group_norm(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map (one 1x1 conv makes q, k, v)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each B, C, HW
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=-1)  # B, HW(query), HW(key)
        h = torch.bmm(v, weights.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the LDM autoencoders


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNet blocks, each followed by its attention block where the level has them.

    The resampler (``downsample``/``upsample``) is attached by the encoder/decoder, which
    decide the order it runs in.
    """

    def __init__(self, cin: int, cout: int, num_blocks: int, with_attn: bool):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(num_blocks):
            self.block.append(ResnetBlock(cin, cout))
            cin = cout
            if with_attn:
                self.attn.append(AttnBlock(cout))

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    def __init__(self, channels: int, with_attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels) if with_attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.conv_in = _conv3x3(3, cfg.ch)
        self.down = nn.ModuleList()
        cin, last = cfg.ch, len(cfg.ch_mult) - 1
        for i, mult in enumerate(cfg.ch_mult):
            level = Level(cin, cfg.ch * mult, cfg.num_res_blocks, with_attn=cfg.using_sa and i == last)
            cin = cfg.ch * mult
            if i != last:
                level.downsample = Downsample2x(cin)
            self.down.append(level)
        self.mid = Middle(cin, cfg.using_mid_sa)
        self.norm_out = _group_norm(cin)
        self.conv_out = _conv3x3(cin, cfg.z_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = level(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        cin, last = cfg.ch * cfg.ch_mult[-1], len(cfg.ch_mult) - 1
        self.conv_in = _conv3x3(cfg.z_channels, cin)
        self.mid = Middle(cin, cfg.using_mid_sa)
        levels: list[Level] = []
        for i in reversed(range(len(cfg.ch_mult))):  # built top-down, stored by level index
            level = Level(cin, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, with_attn=cfg.using_sa and i == last)
            cin = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Upsample2x(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(cin)
        self.conv_out = _conv3x3(cin, 3)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- multi-scale quantizer

class Phi(nn.Conv2d):
    """The residual refinement applied to every scale's upsampled codes: ``(1 - r) h + r conv(h)``."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h):
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiPartiallyShared(nn.Module):
    """K Phi convolutions shared by the scales; scale ``si`` of ``SN`` uses the one whose tick is nearest to si/(SN-1)."""

    def __init__(self, count: int, channels: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(count))
        # The official ticks, rounded exactly as numpy.linspace rounds them: with 10 scales,
        # scales 2 and 7 lie exactly between two ticks and the rounding picks the Phi.
        start = 1 / 3 / count if count == 4 else 1 / 2 / count
        stop = 1 - start
        spacing = (stop - start) / max(count - 1, 1)
        self.ticks = [start + k * spacing for k in range(count - 1)] + [stop]

    def index(self, si: int, num_scales: int) -> int:
        at = si / max(num_scales - 1, 1)
        return min(range(len(self.ticks)), key=lambda k: abs(self.ticks[k] - at))  # first nearest, like argmin

    def forward(self, h, si: int, num_scales: int):
        return self.qresi_ls[self.index(si, num_scales)](h)


class MultiScaleQuantizer(nn.Module):
    """Residual quantization over the scales ``patch_nums`` (the official ``VectorQuantizer2``, inference parts)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.patch_nums = cfg.patch_nums
        self.quant_resi = PhiPartiallyShared(cfg.share_quant_resi, cfg.z_channels, cfg.quant_resi)
        # Codebook-usage statistics of the VAE's training; kept only so official files load strictly.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def token_map(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """Codes of one scale's tokens (raster order) as a map ``[B, Cvae, pn, pn]``."""
        pn = math.isqrt(idx_Bl.shape[1])
        return self.embedding(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], -1, pn, pn)

    def scale_residual(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """What scale ``si``'s code map adds to ``f_hat``: bicubic to full size (all but the last scale), then Phi."""
        if si != self.num_scales - 1:
            full = self.patch_nums[-1]
            h_BChw = bicubic_upsample(h_BChw, full)
        return self.quant_resi(h_BChw, si, self.num_scales)

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        codes = self.embedding.weight
        dist = z_NC.square().sum(1, keepdim=True) + codes.square().sum(1) - 2 * z_NC @ codes.T
        return dist.argmin(dim=1)

    def f_to_idxBl(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Quantize an encoder feature map into one token list ``[B, pn*pn]`` per scale, coarse to fine."""
        B, C = f_BChw.shape[:2]
        f_rest, tokens = f_BChw, []
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != self.num_scales - 1 else f_rest
            idx = self.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C)).reshape(B, pn * pn)
            f_rest = f_rest - self.scale_residual(si, self.token_map(idx))
            tokens.append(idx)
        return tokens

    def idxBl_to_fhat(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """The accumulated feature map ``f_hat [B, Cvae, pn_last, pn_last]`` of a whole token pyramid."""
        f_hat = 0
        for si, idx in enumerate(idx_Bl):
            f_hat = f_hat + self.scale_residual(si, self.token_map(idx))
        return f_hat

    def idxBl_to_var_input(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of VAR: for each scale after the first, ``f_hat`` so far area-resized to that scale.

        Returns ``[B, L - first_l, Cvae]`` (tokens in raster order, scales concatenated).
        """
        f_hat, inputs = 0, []
        for si, idx in enumerate(idx_Bl[:-1]):
            f_hat, nxt = self.get_next_autoregressive_input(si, f_hat, self.token_map(idx))
            inputs.append(nxt.flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    def get_next_autoregressive_input(self, si: int, f_hat, h_BChw: torch.Tensor):
        """One generation step: add scale ``si``'s codes to ``f_hat``; return ``(f_hat, next scale's input map)``.

        The next input is None after the last scale. Out of place (the official one updates f_hat in place).
        """
        f_hat = f_hat + self.scale_residual(si, h_BChw)
        if si == self.num_scales - 1:
            return f_hat, None
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")


# ----------------------------------------------------------------------------- VQVAE

class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig = VQVAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = _conv3x3(cfg.z_channels, cfg.z_channels)
        self.post_quant_conv = _conv3x3(cfg.z_channels, cfg.z_channels)

    @torch.no_grad()
    def img_to_idxBl(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images ``[B, 3, S, S]`` in [0, 1] (S = ``config.image_size``) -> token lists ``[B, pn*pn]`` per scale."""
        size = self.config.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise UserError(f"VQVAE expects {size}x{size} images, got {tuple(images.shape[-2:])}")
        return self.quantize.f_to_idxBl(self.quant_conv(self.encoder(images * 2 - 1)))

    def idxBl_to_var_input(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        return self.quantize.idxBl_to_var_input(idx_Bl)

    def get_next_autoregressive_input(self, si: int, f_hat, h_BChw: torch.Tensor):
        return self.quantize.get_next_autoregressive_input(si, f_hat, h_BChw)

    @torch.no_grad()
    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Feature map -> images ``[B, 3, S, S]`` in [0, 1]."""
        return (self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1) + 1) / 2

    @torch.no_grad()
    def decode(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Token lists per scale -> images ``[B, 3, S, S]`` in [0, 1]."""
        return self.fhat_to_img(self.quantize.idxBl_to_fhat(idx_Bl))


def _meta_vqvae(cfg: VQVAEConfig) -> VQVAE:
    with torch.device("meta"):
        return VQVAE(cfg)


def load_vqvae(path: str | Path, patch_nums: tuple[int, ...], vocab_size: int, z_channels: int) -> VQVAE:
    """Load a VQVAE file (``weights_only``) for a VAR with these scales, vocabulary and code width.

    The architecture is the known config whose layout the file fits. ``ema_vocab_hit_SV`` (training
    statistics, one row per scale) is replaced when the file was trained with other scales, as the
    official loader does.
    """
    state_dict = load_checkpoint(path)
    if not isinstance(state_dict, dict):
        raise UserError(f"tokenizer {path}: expected a VQVAE state_dict, got {type(state_dict).__name__}")
    candidates = {name: _meta_vqvae(replace(cfg, patch_nums=tuple(patch_nums))) for name, cfg in VQVAE_CONFIGS.items()}
    state_dict = dict(state_dict)
    ema = state_dict.get("quantize.ema_vocab_hit_SV")
    if isinstance(ema, torch.Tensor) and ema.shape[0] != len(patch_nums):
        state_dict["quantize.ema_vocab_hit_SV"] = torch.zeros(len(patch_nums), ema.shape[1])
    problems = {name: state_dict_problems(m, state_dict) for name, m in candidates.items()}
    name = min(problems, key=lambda n: len(problems[n]))
    vae = candidates[name]
    strict_load(vae, state_dict, f"tokenizer {path} (closest VQVAE config: {name})")
    cfg = vae.config
    if (cfg.vocab_size, cfg.z_channels) != (vocab_size, z_channels):
        raise UserError(f"tokenizer {path} has {cfg.vocab_size} codes of {cfg.z_channels} channels; "
                        f"the model needs {vocab_size} of {z_channels}")
    return vae.float().eval()
