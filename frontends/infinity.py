"""Infinity (FoundationVision/Infinity, bitwise next-scale text-to-image) family: model, step, driver, registration.

``Infinity`` has the parameter and buffer names of the official checkpoints (``infinity_2b_reg.pth``:
``block_chunks.{c}.module.{j}.sa.mat_qkv`` ..., ``block_chunks=8`` for 2B), so they load with
``strict=True``. The code is our own, plain torch ops (explicit attention matmuls, so every matmul
is a site; no flash attention, no fused norms, no dropout). The released configuration is built in:
cross-attention blocks, shared AdaLN (``shared_ada_lin`` + each block's ``ada_gss``), cosine
self-attention with 2D RoPE (``rope2d_normalized_by_hw=2``), level embedding added once before the
first block, bitwise head (2 logits for each of the ``codebook_dim`` bits of a token), LayerNorm.

One step, one graph for every scale and aspect ratio. ``InfinityStep`` runs the transformer on one scale:

    forward(x, cond, text, text_bias, rope, positions, attn_bias, k_cache, v_cache, token_groups)
        -> (logits, k_cache, v_cache)

* ``x [B, T, C]``: the scale's tokens, embedded by the driver (step 0: pooled text + ``pos_start``;
  later: ``word_embed`` of the upsampled summed codes), plus ``lvl_embed`` of the scale.
* ``cond [B, D]``: the pooled text (``text_proj_for_sos``); ``shared_ada_lin`` and ``head_nm`` run in the graph.
* ``text [B, Lt, D]``: the text memory after ``text_proj_for_ca``, padded to ``text_maxlen`` (padded
  rows zero); ``text_bias [B, Lt]``: 0 for a prompt token, -inf for padding (the official varlen
  cross-attention, as a mask).
* ``rope [T, 2, head_dim/2]``: cos/sin of the 2D RoPE angles of the step's tokens.
* ``positions [T]``, ``attn_bias [T, L]``, ``k_cache/v_cache [depth, B, heads, L, head_dim]``,
  ``token_groups [T]`` (the scale index): as VAR's step. ``L`` is the longest schedule of the
  configuration, so one graph serves every aspect ratio; positions past the schedule are masked.
* ``logits [B, T, 2 * codebook_dim]``: per bit, the logits of 0 and 1.

The driver (``sample_bits``) keeps what is not exported: the text encoding, CFG on the logits
(``cfg * cond + (1 - cfg) * uncond``, ``cfg_insertion_layer=0``), the temperature ``tau``, top-k/top-p
over each bit's two logits, one generator per image, and the BSQ code update between scales.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from frontends.families import Family, layout, meta_model, register_family, tensor_shape
from frontends.generic import ModelBundle, step_dynamic_shapes, strict_load
from frontends.sampling import check_probs, filter_top_k_top_p, image_generators, multinomial_rows, zero_cache
from frontends.var import AdaLNBeforeHead  # VAR's head norm: same names, same math (width, norm_eps)

MAX_SCALE_MUL = math.log(100)  # clamp of the learnt attention temperature, as the official model
ROPE_GRID = 2048 // 16  # the official RoPE grid: 128 x 128 positions (2048 px at stride 16)
LEVELS = 15  # rows of the official lvl_embed

# The official token grids (h, w) per aspect ratio h/w (infinity/utils/dynamic_resolution.py); a
# resolution uses the first 7 (0.06M), 10 (0.25M), 12 (0.60M) or 13 (1M, 1024 px) scales.
RATIO_HWS = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}
PIXELS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def _with_inverses(table: dict) -> tuple:
    """Every ratio and its inverse (w/h), as the official templates (``int(1/r*1000)/1000``)."""
    out = dict(table)
    for r, hws in table.items():
        if r != 1.0:
            out[int(1 / r * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class InfinityConfig:
    depth: int
    width: int
    heads: int
    block_chunks: int = 8
    text_channels: int = 2048  # flan-t5-xl's d_model
    text_maxlen: int = 512
    pool_heads: int = 16  # text_proj_for_sos: text_channels // 128 in the released models
    codebook_dim: int = 32  # bits per token (infinity_vae_d32reg)
    ffn_hidden: int = 8192
    norm_eps: float = 1e-6
    # (h/w, full-resolution token grids); the rope is placed on the full grid, ``scales`` are used
    ratios: tuple = _with_inverses(RATIO_HWS)
    scales: int = 13

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def vocab(self) -> int:
        return 2 * self.codebook_dim

    def schedule(self, ratio: float) -> tuple[tuple[int, int], ...]:
        """The (h, w) token grids of the template nearest ``ratio`` (h/w), as the official sampler picks it."""
        return self._full(ratio)[: self.scales]

    def _full(self, ratio: float):
        if not ratio > 0:
            raise UserError(f"aspect ratio (h/w) must be positive, got {ratio}")
        return min(self.ratios, key=lambda item: abs(item[0] - ratio))[1]

    @property
    def seq_len(self) -> int:
        """Cache length: the longest schedule over every aspect ratio."""
        return max(sum(h * w for h, w in hws[: self.scales]) for _, hws in self.ratios)


CONFIGS = {
    "2b": InfinityConfig(depth=32, width=2048, heads=16),
    "tiny": InfinityConfig(depth=2, width=64, heads=2, block_chunks=2, text_channels=32, text_maxlen=8, pool_heads=2,
                           codebook_dim=4, ffn_hidden=256,
                           ratios=((0.5, ((1, 1), (1, 2), (2, 4))), (1.0, ((1, 1), (2, 2), (3, 3)))), scales=3),
}


# ----------------------------------------------------------------------------- rope

def rope_table(cfg: InfinityConfig, ratio: float) -> torch.Tensor:
    """``[L, 2, head_dim/2]``: cos and sin of the 2D RoPE angles of every token of ``ratio``'s schedule.

    ``rope2d_normalized_by_hw=2``: a token (i, j) of an h x w scale takes the angles of the grid
    point ``round(i * H / h), round(j * W / w)``, (H, W) the full-resolution (1M) last scale; the
    first half of the pairs rotates with the row, the second with the column.
    """
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    t = torch.arange(ROPE_GRID, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    grid = torch.cat((freqs[:, None, :].expand(-1, ROPE_GRID, -1), freqs[None, :, :].expand(ROPE_GRID, -1, -1)), dim=-1)
    H, W = cfg._full(ratio)[-1]
    rows = []
    for h, w in cfg.schedule(ratio):
        ii = (torch.arange(h) * (H / h)).round().long()[:, None].expand(h, w).reshape(-1)
        jj = (torch.arange(w) * (W / w)).round().long()[None, :].expand(h, w).reshape(-1)
        angles = grid[ii, jj]  # h*w, half
        rows.append(torch.stack((angles.cos(), angles.sin()), dim=1))
    return torch.cat(rows)


def apply_rope(x_BHTc: torch.Tensor, rope_T2c: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) of the head dim by the angles of ``rope`` (the official pairing)."""
    pairs = x_BHTc.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = rope_T2c[:, 0], rope_T2c[:, 1]
    return torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1).flatten(-2)


# ----------------------------------------------------------------------------- model

class SelfAttention(nn.Module):
    """Cosine attention of the step's tokens over the KV cache (``sa``); RoPE on q and k after the l2-norm."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x_BTC, rope, attn_bias_TL, k_cache, v_cache, positions_T):
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BTC, self.mat_qkv.weight, bias).unflatten(-1, (3, self.heads, self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, H, T, c
        q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        k = F.normalize(k, dim=-1)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        k_cache = k_cache.index_copy(2, positions_T, k)
        v_cache = v_cache.index_copy(2, positions_T, v)
        scores = torch.matmul(q, k_cache.transpose(-2, -1)) + attn_bias_TL
        out = torch.matmul(scores.softmax(dim=-1), v_cache)
        return self.proj(out.transpose(1, 2).flatten(2)), k_cache, v_cache


class CrossAttention(nn.Module):
    """Attention of queries over the text memory (``ca``), softmax scale 1/sqrt(head_dim).

    ``pool``: the query is one learnt vector per head (``text_proj_for_sos.ca``: attentive pooling).
    """

    def __init__(self, width: int, kv_dim: int, heads: int, pool: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(kv_dim, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x_BTC, text_BLD, text_bias_BL):
        kv = F.linear(text_BLD, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.unflatten(-1, (2, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)  # B, H, Lt, c
        if isinstance(self.mat_q, nn.Linear):
            q = self.mat_q(x_BTC).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        else:
            q = self.mat_q[:, :, None, :].expand(text_BLD.shape[0], -1, -1, -1)  # B, H, 1, c
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim ** -0.5 + text_bias_BL[:, None, None, :]
        out = torch.matmul(scores.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).flatten(2))


class TextAttentivePool(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.ca = CrossAttention(cfg.width, cfg.text_channels, cfg.pool_heads, pool=True)

    def forward(self, text_BLT, text_bias_BL):
        return self.ca(None, text_BLT, text_bias_BL)[:, 0]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttnBlock(nn.Module):
    """Self-attention, cross-attention to the text, FFN; AdaLN from the shared modulation plus ``ada_gss``."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.width
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        self.sa = SelfAttention(C, cfg.heads)
        self.ca = CrossAttention(C, C, cfg.heads)
        self.ffn = FFN(C, cfg.ffn_hidden)
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)

    def forward(self, x, gss_B16C, text, text_bias, rope, attn_bias, k_cache, v_cache, positions):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss_B16C).unbind(2)
        h, k_cache, v_cache = self.sa(self.ln_wo_grad(x) * (1 + scale1) + shift1, rope, attn_bias, k_cache, v_cache, positions)
        x = x + h * gamma1
        x = x + self.ca(self.ca_norm(x), text, text_bias)
        x = x + self.ffn(self.ln_wo_grad(x) * (1 + scale2) + shift2) * gamma2
        return x, k_cache, v_cache


class BlockChunk(nn.Module):
    """``MultipleLayers`` of the official model: only a container (the names ``block_chunks.c.module.j``)."""

    def __init__(self, blocks):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class Infinity(nn.Module):
    """The Infinity transformer with the official state_dict layout (t2i, ``shared_aln=True``, ``head_aln``)."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        if cfg.depth % cfg.block_chunks:
            raise UserError(f"Infinity: depth {cfg.depth} is not a multiple of block_chunks {cfg.block_chunks}")
        self.config = cfg
        self._rope_tables: dict[float, torch.Tensor] = {}  # per aspect ratio, on the CPU
        C, Ct5 = cfg.width, cfg.text_channels
        self.cfg_uncond = nn.Parameter(torch.randn(cfg.text_maxlen, Ct5) / Ct5 ** 0.5)
        self.text_norm = RMSNorm(Ct5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        std = math.sqrt(1 / C / 3)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * std)
        self.lvl_embed = nn.Embedding(LEVELS, C)
        self.word_embed = nn.Linear(cfg.codebook_dim, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        per = cfg.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(BlockChunk(CrossAttnBlock(cfg) for _ in range(per)) for _ in range(cfg.block_chunks))
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(C, cfg.vocab)

    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    def encode_text(self, features_BLT: torch.Tensor, mask_BL: torch.Tensor, cfg: bool = True):
        """(cond [B', D], text [B', Lt, D], text_bias [B', Lt]) of T5 features; ``cfg`` appends the
        unconditional half (``cfg_uncond`` rows in place of each prompt's tokens), so B' = 2B."""
        Lt = self.config.text_maxlen
        if features_BLT.shape[1] != Lt or features_BLT.shape[-1] != self.config.text_channels:
            raise UserError(f"Infinity: text features are {tuple(features_BLT.shape)}; the model takes "
                            f"[batch, {Lt}, {self.config.text_channels}] (T5 output padded to text_maxlen)")
        mask = mask_BL.bool()
        features = features_BLT.to(self.pos_start.dtype) * mask[..., None]
        if cfg:
            uncond = self.cfg_uncond[None].expand(features.shape[0], -1, -1) * mask[..., None]
            features, mask = torch.cat((features, uncond)), torch.cat((mask, mask))
        bias = torch.zeros(mask.shape, dtype=features.dtype, device=features.device).masked_fill(~mask, -torch.inf)
        normed = self.text_norm(features)
        cond = self.text_proj_for_sos(normed, bias)
        text = self.text_proj_for_ca(normed) * mask[..., None]  # padding rows: zero, and masked anyway
        return cond, text, bias

    def sos(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Embedded input of step 0."""
        return cond_BD[:, None] + self.pos_start + self.lvl_embed.weight[0]

    def embed_codes(self, next_BTd: torch.Tensor, si: int) -> torch.Tensor:
        """Embedded input of step ``si`` > 0: ``word_embed`` of the upsampled summed codes + the level."""
        return self.word_embed(next_BTd) + self.lvl_embed.weight[si]

    def new_kv_cache(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero caches as broadcast zeros (``frontends.sampling.zero_cache``): steps update them out of place."""
        c = self.config
        shape = (c.depth, batch, c.heads, c.seq_len, c.head_dim)
        return zero_cache(self.pos_start, shape), zero_cache(self.pos_start, shape)

    def blocks(self) -> list[CrossAttnBlock]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    def _rope(self, ratio: float) -> torch.Tensor:
        if ratio not in self._rope_tables:
            self._rope_tables[ratio] = rope_table(self.config, ratio)
        return self._rope_tables[ratio]

    def step_inputs(self, si: int, ratio: float, x, cond, text, text_bias, k_cache, v_cache) -> tuple:
        """The ``InfinityStep`` arguments of scale ``si`` of ``ratio``'s schedule."""
        sched = self.config.schedule(ratio)
        ends = torch.tensor([h * w for h, w in sched]).cumsum(0).tolist()
        begin, end = ends[si] - sched[si][0] * sched[si][1], ends[si]
        dev = self.device
        visible = torch.arange(self.config.seq_len) < end
        attn_bias = torch.zeros(end - begin, self.config.seq_len).masked_fill(~visible, -torch.inf)
        rope = self._rope(ratio)[begin:end]
        return (x, cond, text, text_bias, rope.to(dev, x.dtype), torch.arange(begin, end, device=dev),
                attn_bias.to(dev, x.dtype), k_cache, v_cache, torch.full((end - begin,), si, device=dev))

    def forward(self, features_BLT, mask_BL, bits: list[torch.Tensor], ratio: float = 1.0) -> torch.Tensor:
        """Teacher-forced logits ``[B, L, 2d]`` of a whole schedule in one pass (block-causal mask, no CFG).

        ``bits[si] [B, h, w, d]``: the tokens of every scale (the last is not an input).
        """
        cond, text, text_bias = self.encode_text(features_BLT, mask_BL, cfg=False)
        sched = self.config.schedule(ratio)
        xs = [self.sos(cond)]
        for si, nxt in enumerate(next_scale_inputs(self.config, ratio, bits)):
            xs.append(self.embed_codes(nxt, si + 1))
        x = torch.cat(xs, dim=1)
        L, n = x.shape[1], self.config.seq_len
        level = torch.cat([torch.full((h * w,), si) for si, (h, w) in enumerate(sched)])
        ends = torch.tensor([h * w for h, w in sched]).cumsum(0)[level]
        attn_bias = torch.zeros(L, n).masked_fill(torch.arange(n)[None, :] >= ends[:, None], -torch.inf)
        k_cache, v_cache = self.new_kv_cache(x.shape[0])
        logits, _, _ = InfinityStep(self)(x, cond, text, text_bias, self._rope(ratio), torch.arange(L), attn_bias,
                                          k_cache, v_cache, level)
        return logits


class InfinityStep(nn.Module):
    """One generation step (see the module docstring); shares its blocks and head with the ``Infinity``."""

    def __init__(self, model: Infinity):
        super().__init__()
        self.shared_ada_lin, self.block_chunks = model.shared_ada_lin, model.block_chunks
        self.head_nm, self.head = model.head_nm, model.head
        self.width = model.config.width

    def forward(self, x, cond, text, text_bias, rope, positions, attn_bias, k_cache, v_cache, token_groups):
        gss = self.shared_ada_lin(cond).view(-1, 1, 6, self.width)
        k_out, v_out, i = [], [], 0
        for chunk in self.block_chunks:
            for block in chunk.module:
                x, k, v = block(x, gss, text, text_bias, rope, attn_bias, k_cache[i], v_cache[i], positions)
                k_out.append(k)
                v_out.append(v)
                i += 1
        logits = self.head(self.head_nm(x, cond))
        return logits, torch.stack(k_out), torch.stack(v_out)


STEP_INPUT_NAMES = ["x", "cond", "text", "text_bias", "rope", "positions", "attn_bias", "k_cache", "v_cache", "token_groups"]
STEP_OUTPUT_NAMES = ["logits", "k_cache_out", "v_cache_out"]


def dynamic_shapes(cfg: InfinityConfig) -> tuple:
    return step_dynamic_shapes(STEP_INPUT_NAMES, cfg.seq_len)


# ----------------------------------------------------------------------------- BSQ codes between scales

def bits_to_codes(bits_BTd: torch.Tensor, codebook_dim: int) -> torch.Tensor:
    """BSQ codes of 0/1 bits: ``+-1/sqrt(d)`` (``bits_to_codes`` of the official quantizer)."""
    s = 1 / math.sqrt(codebook_dim)
    return bits_BTd.float() * (2 * s) - s


def _upsample(codes_Bd1hw: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(codes_Bd1hw, size=(1, h, w), mode="trilinear")  # the quantizer's z_interplote_up


def _as_map(bits: torch.Tensor, h: int, w: int, d: int) -> torch.Tensor:
    """``[B, h, w, d]`` (or ``[B, h*w, d]``) bits -> codes ``[B, d, 1, h, w]``."""
    return bits_to_codes(bits.reshape(bits.shape[0], h, w, d), d).permute(0, 3, 1, 2)[:, :, None]


class CodeAccumulator:
    """The summed codes at full resolution (``summed_codes``) and the next scale's input, scale by scale."""

    def __init__(self, cfg: InfinityConfig, ratio: float):
        self.cfg, self.sched, self.summed = cfg, cfg.schedule(ratio), None

    def add(self, si: int, bits_BTd: torch.Tensor) -> torch.Tensor | None:
        """Add scale ``si``'s bits; the next scale's input ``[B, h'*w', d]`` (None after the last)."""
        H, W = self.sched[-1]
        h, w = self.sched[si]
        up = _upsample(_as_map(bits_BTd, h, w, self.cfg.codebook_dim), H, W)
        self.summed = up if self.summed is None else self.summed + up
        if si + 1 == len(self.sched):
            return None
        nh, nw = self.sched[si + 1]
        return _upsample(self.summed, nh, nw)[:, :, 0].flatten(2).transpose(1, 2)


def next_scale_inputs(cfg: InfinityConfig, ratio: float, bits: list[torch.Tensor]) -> list[torch.Tensor]:
    """The (un-embedded) inputs of scales 1.. given every scale's bits."""
    acc, out = CodeAccumulator(cfg, ratio), []
    for si, b in enumerate(bits[: len(cfg.schedule(ratio)) - 1]):
        out.append(acc.add(si, b))
    return out


# ----------------------------------------------------------------------------- driver

class InfinitySamples(NamedTuple):
    bits: list[torch.Tensor]  # per scale, [B, h, w, d] int64 (0/1)
    codes: torch.Tensor  # summed BSQ codes [B, d, 1, H, W]: what the VAE decodes


@torch.no_grad()
def sample_bits(model: Infinity, features_BLT: torch.Tensor, mask_BL: torch.Tensor, *, ratio: float = 1.0,
                cfg: float = 4.0, tau: float = 0.5, top_k: int = 900, top_p: float = 0.97, seed: int = 0,
                step: Callable | None = None, fixed_bits: list[torch.Tensor] | None = None,
                on_probs: Callable[[int, torch.Tensor], None] | None = None) -> InfinitySamples:
    """Sample the bits of every scale for prompts given as T5 features (official ``autoregressive_infer_cfg``
    with ``cfg_insertion_layer=0``, ``scripts/infer.sh``'s cfg 4 and tau 0.5, ``gen_one_img``'s top-k/top-p).

    CFG runs the batch twice (prompt, then ``cfg_uncond``) and mixes ``cfg * cond + (1 - cfg) * uncond``
    after dividing the logits by ``tau``; each bit draws 0 or 1 from its two filtered logits. Image i
    draws from its own generator (``frontends.sampling.image_generators``). ``step``: any callable with
    ``InfinityStep.forward``'s signature. ``fixed_bits``: teacher forcing, as VAR's ``fixed_tokens``.
    ``on_probs(si, probs [B, h*w*d, 2])`` sees each scale's sampling distribution.
    """
    c = model.config
    device = model.device
    step = step if step is not None else InfinityStep(model).eval()
    B = features_BLT.shape[0]
    cond, text, text_bias = model.encode_text(features_BLT.to(device), mask_BL.to(device))
    generators = image_generators(seed, B, device)
    x = model.sos(cond)
    k_cache, v_cache = model.new_kv_cache(2 * B)
    acc, bits, bad = CodeAccumulator(c, ratio), [], []  # bad: the draws' checks, read at the end
    for si in range(len(c.schedule(ratio))):
        logits, k_cache, v_cache = step(*model.step_inputs(si, ratio, x, cond, text, text_bias, k_cache, v_cache))
        logits = torch.as_tensor(logits).to(device) / tau
        mixed = cfg * logits[:B] - (cfg - 1) * logits[B:]
        probs = filter_top_k_top_p(mixed.reshape(B, -1, 2), top_k, top_p).softmax(dim=-1)
        if on_probs is not None:
            on_probs(si, probs)
        if fixed_bits is None:
            b = multinomial_rows(probs, generators, bad=bad)
        else:
            b = fixed_bits[si].to(device).reshape(B, -1)
        h, w = c.schedule(ratio)[si]
        b = b.reshape(B, h, w, c.codebook_dim)
        bits.append(b)
        nxt = acc.add(si, b)
        if nxt is not None:
            x = model.embed_codes(nxt.to(x.dtype), si + 1).repeat(2, 1, 1)
    check_probs(bad)
    return InfinitySamples(bits, acc.summed)


class ImageDecoder(nn.Module):
    """The ``tokenizer`` of an Infinity bundle: bits of every scale (``[B, h, w, d]``, the grid read from
    the shapes, so any aspect ratio) -> images ``[B, 3, H, W]`` in [0, 1] through the BSQ VAE decoder."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def decode(self, bits: list[torch.Tensor]) -> torch.Tensor:
        _, H, W, d = bits[-1].shape
        summed = sum(_upsample(_as_map(b.to(self.vae.decoder.conv_in.conv.weight.device), *b.shape[1:3], d), H, W)
                     for b in bits)
        return (self.vae(summed[:, :, 0]) + 1) / 2


# ----------------------------------------------------------------------------- family

# Masks that some official checkpoints carry and the official loader drops (the code rebuilds them).
DERIVED_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
_MARKER_KEYS = ("cfg_uncond", "text_proj_for_sos.ca.mat_q", "shared_ada_lin.1.weight", "block_chunks.0.module.0.ada_gss")


@functools.cache
def _layout(name: str) -> dict[str, tuple[int, ...]]:
    return layout(Infinity, CONFIGS[name])


def _shape(state_dict: dict, key: str) -> tuple[int, ...]:
    return tensor_shape(state_dict, key, "Infinity")


def config_from_state_dict(state_dict: dict, scales: int | None = None) -> InfinityConfig:
    """The configuration of an Infinity checkpoint of no known size, read from its shapes (official schedules)."""
    text_maxlen, text_channels = _shape(state_dict, "cfg_uncond")
    _, pool_heads, _ = _shape(state_dict, "text_proj_for_sos.ca.mat_q")
    width = _shape(state_dict, "pos_start")[-1]
    chunks = {k.split(".")[1] for k in state_dict if k.startswith("block_chunks.") and k.endswith(".ada_gss")}
    blocks = [k for k in state_dict if k.startswith("block_chunks.") and k.endswith(".ada_gss")]
    return InfinityConfig(
        depth=len(blocks), width=width, heads=_shape(state_dict, "block_chunks.0.module.0.sa.scale_mul_1H11")[1],
        block_chunks=len(chunks), text_channels=text_channels, text_maxlen=text_maxlen, pool_heads=pool_heads,
        codebook_dim=_shape(state_dict, "word_embed.weight")[1],
        ffn_hidden=_shape(state_dict, "block_chunks.0.module.0.ffn.fc1.weight")[0],
        scales=scales or PIXELS["1M"])


def detect(state_dict: dict) -> str | None:
    """``"2b"``/``"tiny"`` when the keys and shapes are exactly a known config's, ``"custom"`` for other Infinity layouts."""
    if not all(k in state_dict for k in _MARKER_KEYS):
        return None
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor) and k not in DERIVED_KEYS}
    return next((name for name in CONFIGS if _layout(name) == shapes), "custom")


def load_infinity(state_dict: dict, cfg: InfinityConfig, source: str = "Infinity checkpoint") -> Infinity:
    """Build on the meta device and adopt the checkpoint's tensors (strict; UserError lists every mismatch)."""
    model = meta_model(Infinity, cfg)
    strict_load(model, {k: v for k, v in state_dict.items() if k not in DERIVED_KEYS}, source)
    return model.float().eval()


def group_maps(num_scales: int) -> dict[str, list[int]]:
    """Per site glob, the STWQ group of each scale (VAR's rule, method.md §4.2): one group per scale
    for the inputs of the self-attention qkv, the cross-attention q and fc1; the first scale vs the
    rest for the projections and fc2; the head per-tensor."""
    per_scale = list(range(num_scales))
    first_vs_rest = [0] + [1] * (num_scales - 1)
    return {"*.sa.mat_qkv": per_scale, "*.ca.mat_q": per_scale, "*.ffn.fc1": per_scale,
            "*.sa.proj": first_vs_rest, "*.ca.proj": first_vs_rest, "*.ffn.fc2": first_vs_rest,
            "head": [0] * num_scales}


DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "infinity_calibration.txt"


def standin_text(cfg: InfinityConfig, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random T5-like features (half the tokens valid) for runs without a text encoder: tracing
    and random-weight benchmarks. Calibration needs the real encoder (``--text-encoder``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = torch.randn(batch, cfg.text_maxlen, cfg.text_channels)
    mask = torch.arange(cfg.text_maxlen)[None].expand(batch, -1) < max(1, cfg.text_maxlen // 2)
    return features, mask


def _last_step_inputs(model: Infinity, features, mask) -> tuple:
    """Inputs of the last scale's step (ratio 1, CFG batch 2), its KV cache filled by real sampling."""
    step, seen = InfinityStep(model).eval(), []

    def recording_step(*inputs):
        seen.append(inputs)
        return step(*inputs)

    sample_bits(model, features, mask, seed=0, step=recording_step)
    return seen[-1]


def build(state_dict: dict, path: str | Path | None = None, config: str | None = None,
          tokenizer: str | Path | None = None, text_encoder: str | Path | None = None,
          prompts: list[str] | None = None, aspect_ratio: float | None = None, **_other_options) -> ModelBundle:
    """ModelBundle of one Infinity step. ``text_encoder``: a local T5 directory (prompts need it);
    ``prompts``: the calibration prompts, or the images' prompts (default: the shipped file);
    ``tokenizer``: the BSQ VAE file, whose decoder makes images; ``aspect_ratio`` (h/w, default 1):
    the images' template (the nearest official one)."""
    cfg = CONFIGS[config] if config in CONFIGS else config_from_state_dict(state_dict)
    ratio = 1.0 if aspect_ratio is None else float(aspect_ratio)
    cfg.schedule(ratio)  # a bad ratio fails before the weights load
    model = load_infinity(state_dict, cfg, f"Infinity checkpoint {path or ''}".strip())
    decoder = None
    if tokenizer:
        from frontends.bsq_vae import load_bsq_decoder

        decoder = ImageDecoder(load_bsq_decoder(tokenizer, cfg.codebook_dim)).eval()
    encoder = None
    if text_encoder:
        from frontends.t5_text import T5TextEncoder

        encoder = T5TextEncoder(text_encoder, cfg.text_maxlen)
        if encoder.channels != cfg.text_channels:
            raise UserError(f"--text-encoder {text_encoder}: its width is {encoder.channels}, the Infinity checkpoint "
                            f"takes {cfg.text_channels}-channel text features")
    if prompts is None:
        from frontends.t5_text import read_prompts

        prompts = read_prompts(DEFAULT_PROMPTS)
    example_text = encoder([prompts[0]]) if encoder is not None else standin_text(cfg)

    def generate_bits(labels, seed: int = 0, step: Callable | None = None, fixed_tokens=None) -> list[torch.Tensor]:
        """``labels``: indices into ``prompts`` (the calibration driver's sample ids)."""
        if encoder is None:
            raise UserError("Infinity generates from prompts: pass --text-encoder DIR (a local T5 encoder, e.g. flan-t5-xl)")
        idx = torch.as_tensor(labels).flatten().tolist()
        features, mask = encoder([prompts[i % len(prompts)] for i in idx])
        return sample_bits(model, features, mask, ratio=ratio, seed=seed, step=step, fixed_bits=fixed_tokens).bits

    import hashlib

    return ModelBundle(
        name=Path(path).stem if path else f"infinity-{config or 'custom'}",
        module=InfinityStep(model).eval(),
        example_inputs=_last_step_inputs(model, *example_text),
        family="infinity",
        input_names=list(STEP_INPUT_NAMES),
        output_names=list(STEP_OUTPUT_NAMES),
        calib_inputs=[],
        extra={"model": model, "tokenizer": decoder, "text_encoder": encoder, "prompts": list(prompts),
               "generate": generate_bits, "group_maps": group_maps(cfg.scales),
               "sampling": {"prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16], "ratio": ratio,
                            "text_encoder": str(text_encoder) if text_encoder else None},
               "dynamic_shapes": dynamic_shapes(cfg),
               "default_exclude": ["shared_ada_lin.1", "head_nm.ada_lin.1"]},  # M = batch rows: passes/exclude.py
    )


register_family(Family("infinity", detect, build))
