"""MAR's KL-16 VAE (LTH14/mar ``models/vae.py``, LDM's ``AutoencoderKL``): continuous tokens -> images.

The layout is LDM's, which VAR's VQVAE shares except for the attention blocks (separate ``q``,
``k``, ``v`` 1x1 convolutions here, one ``qkv`` there), so the encoder and decoder are
``frontends.var_vqvae``'s with those blocks swapped. The official ``kl16.ckpt`` (``{"model": ...}``;
``embed_dim=16, ch_mult=(1, 1, 2, 2, 4)``, ch 128, 2 ResNet blocks) has attention in the encoder's
lowest level (``attn_resolutions=(16,)`` of a 256-px image) and the middle blocks, none in the
decoder's levels. MAR's tokens are the latents scaled by 0.2325 (``engine_mar.py``), in raster
order ``[B, h*w, C]`` (``patch_size`` 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError
from frontends.generic import load_checkpoint
from frontends.maskgit_vq import count_indexed, load_strict
from frontends.var_vqvae import AttnBlock as QKVAttnBlock
from frontends.var_vqvae import Decoder, Encoder, VQVAEConfig, _group_norm

LATENT_SCALE = 0.2325  # engine_mar.py: x = posterior.sample() * 0.2325; images = vae.decode(tokens / 0.2325)


@dataclass(frozen=True)
class KLConfig:
    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2


KL_CONFIGS = {"kl16": KLConfig(), "tiny": KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1),
              # builtin:mnist-mar: downsampling 4, a 32x32 digit is 8x8 tokens (as the other MNIST tokenizers)
              "mnist": KLConfig(embed_dim=4, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1)}


class AttnBlock(nn.Module):
    """LDM's single-head attention over the pixels, with separate q/k/v convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, C, H * W) for conv in (self.q, self.k, self.v))
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=-1)
        return x + self.proj_out(torch.bmm(v, weights.transpose(1, 2)).reshape(B, C, H, W))


def _ldm_attention(module: nn.Module) -> nn.Module:
    """Every VAR-style attention block of ``module`` replaced by LDM's (same channels)."""
    for name, child in list(module.named_children()):
        if isinstance(child, QKVAttnBlock):
            setattr(module, name, AttnBlock(child.proj_out.in_channels))
        else:
            _ldm_attention(child)
    return module


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: KLConfig = KLConfig()):
        super().__init__()
        self.config = cfg
        base = {"ch": cfg.ch, "ch_mult": cfg.ch_mult, "num_res_blocks": cfg.num_res_blocks, "using_mid_sa": True}
        self.encoder = _ldm_attention(Encoder(VQVAEConfig(z_channels=2 * cfg.embed_dim, using_sa=True, **base)))
        self.decoder = _ldm_attention(Decoder(VQVAEConfig(z_channels=cfg.embed_dim, using_sa=False, **base)))
        self.quant_conv = nn.Conv2d(2 * cfg.embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> MAR tokens ``[B, h*w, C]`` (the posterior mean, scaled)."""
        mean = self.quant_conv(self.encoder(images * 2 - 1)).chunk(2, dim=1)[0]
        return (mean * LATENT_SCALE).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """MAR tokens ``[B, h*w, C]`` (raster) -> images ``[B, 3, H, W]`` in [0, 1]."""
        b, n, c = tokens.shape
        side = round(n ** 0.5)
        z = tokens.transpose(1, 2).reshape(b, c, side, side) / LATENT_SCALE
        return (self.decoder(self.post_quant_conv(z)).clamp(-1, 1) + 1) / 2


def infer_kl_config(state_dict: dict) -> KLConfig:
    needed = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "post_quant_conv.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise UserError(f"not a KL VAE checkpoint: missing keys: {', '.join(missing)}")
    ch = state_dict["encoder.conv_in.weight"].shape[0]
    levels = count_indexed(state_dict, "encoder.down.{}.block.0.conv1.weight")
    mult = tuple(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    return KLConfig(embed_dim=state_dict["post_quant_conv.weight"].shape[0], ch=ch, ch_mult=mult,
                    num_res_blocks=count_indexed(state_dict, "encoder.down.0.block.{}.conv1.weight"))


def build_vae(state_dict: dict, what: str = "KL VAE") -> AutoencoderKL:
    # kl16.ckpt nests the weights under "model"; LDM training checkpoints also carry the loss's
    # discriminator and LPIPS under "loss.", which the official loader skips (strict=False) and so do we.
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    cfg = infer_kl_config(state_dict)
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    return load_strict(vae, state_dict, what)


def load_vae(path: str | Path, model_config=None) -> AutoencoderKL:
    """A KL VAE file (``weights_only``); with ``model_config`` (a ``MARConfig``) its latent width is checked."""
    state_dict = load_checkpoint(path)
    if not isinstance(state_dict, dict):
        raise UserError(f"tokenizer {path} holds a {type(state_dict).__name__}, not a KL VAE state_dict")
    vae = build_vae(state_dict, f"tokenizer {path}")
    if model_config is not None and vae.config.embed_dim != model_config.token_dim:
        raise UserError(f"tokenizer {path} has {vae.config.embed_dim}-channel latents; the MAR model's tokens have "
                        f"{model_config.token_dim}")
    return vae
