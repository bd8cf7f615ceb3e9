"""VAR (FoundationVision/VAR, next-scale prediction) family: model, one-step module, driver, registration.

``VAR`` has the parameter and buffer names of the official checkpoints (``var_d16.pth`` ...), so
they load with ``strict=True``; the code is our own and uses plain torch ops (explicit attention
matmuls, so the quantizer sees them as sites; no flash/xformers; GELU-tanh; no dropout).

One step, one graph for all scales. ``VARStep`` runs the transformer on the tokens of one scale:

    forward(x, cond, positions, attn_bias, k_cache, v_cache, token_groups) -> (logits, k_cache, v_cache)

* ``x [B, T, C]``: the step's tokens, already embedded by the driver (step 0: class embedding +
  ``pos_start``; later steps: ``word_embed`` of the upsampled f_hat; both + level/position
  embedding). Embeddings stay full precision (method §4.5) and the sos/word_embed choice is
  the only thing that differs between step 0 and the others, so keeping it in the driver
  leaves one graph with no branches. T is 1, 4, ..., 256; nothing in the graph depends on it.
* ``cond [B, C]``: class embedding; every block's AdaLN (``ada_lin``) and the head's run in the graph.
* ``positions [T]`` (int64): cache rows written by this step; ``attn_bias [T, L]``: the
  block-causal additive mask rows for them (0 = visible, -inf = not yet generated).
* ``k_cache, v_cache [depth, B, heads, L, head_dim]``: fixed size, updated out of place
  with ``index_copy`` at ``positions`` and returned; ``logits [B, T, V]``.
* ``token_groups [T]`` (int64): the STWQ group of each token = its scale index. The float
  maths ignores it; quantized graphs gather their per-group scales with it.

The driver (``sample_tokens``/``generate``) keeps what is not exported: CFG (batch 2B, class
``num_classes`` as unconditional, guidance ramp), top-k/top-p sampling with one
``torch.Generator`` per image, and the VQVAE f_hat update between scales.
"""
from __future__ import annotations

import functools
import itertools
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
from frontends.var_vqvae import VQVAE, MultiScaleQuantizer, VQVAEConfig, load_vqvae

MAX_SCALE_MUL = math.log(100)  # clamp of the learnt attention temperature, as the official model


@dataclass(frozen=True)
class VARConfig:
    depth: int
    width: int
    heads: int
    vocab_size: int = 4096
    cvae: int = 32
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def _released(depth: int) -> VARConfig:
    return VARConfig(depth=depth, width=64 * depth, heads=depth)


CONFIGS = {
    "d16": _released(16),
    "d20": _released(20),
    "d24": _released(24),
    "d30": _released(30),
    "tiny": VARConfig(depth=2, width=64, heads=2, vocab_size=64, cvae=8, num_classes=10, patch_nums=(1, 2, 3, 4)),
    # The shipped MNIST model (frontends/embedded/var_mnist.pth): 32x32 digits, 8x8 latent.
    "mnist": VARConfig(depth=4, width=96, heads=4, vocab_size=256, cvae=16, num_classes=10,
                       patch_nums=(1, 2, 3, 4, 6, 8)),
}


# ----------------------------------------------------------------------------- model

class SelfAttention(nn.Module):
    """Multi-head attention of the step's tokens over the KV cache.

    q and k are l2-normalised and q is scaled by a learnt per-head temperature (``attn_l2_norm``
    of the released models), so the softmax scale is 1. The qkv bias is assembled from
    ``q_bias``, the zero ``zero_k_bias`` buffer and ``v_bias`` as in the checkpoints.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x_BTC, attn_bias_TL, k_cache, v_cache, positions_T):
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BTC, self.mat_qkv.weight, bias).unflatten(-1, (3, self.heads, self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, H, T, c
        q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        k = F.normalize(k, dim=-1)
        k_cache = k_cache.index_copy(2, positions_T, k)
        v_cache = v_cache.index_copy(2, positions_T, v)
        scores = torch.matmul(q, k_cache.transpose(-2, -1)) + attn_bias_TL
        out = torch.matmul(scores.softmax(dim=-1), v_cache)  # B, H, T, c
        return self.proj(out.transpose(1, 2).flatten(2)), k_cache, v_cache


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gains come from the class condition."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.width = cfg.width
        self.attn = SelfAttention(cfg.width, cfg.heads)
        self.ffn = FFN(cfg.width, round(cfg.width * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, x_BTC, cond_BD, attn_bias_TL, k_cache, v_cache, positions_T):
        # The checkpoints' order of the six modulation vectors.
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.width).unbind(2)
        h, k_cache, v_cache = self.attn(self.ln_wo_grad(x_BTC) * (1 + scale1) + shift1,
                                        attn_bias_TL, k_cache, v_cache, positions_T)
        x_BTC = x_BTC + h * gamma1
        x_BTC = x_BTC + self.ffn(self.ln_wo_grad(x_BTC) * (1 + scale2) + shift2) * gamma2
        return x_BTC, k_cache, v_cache


class AdaLNBeforeHead(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.width = cfg.width
        self.ln_wo_grad = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def forward(self, x_BTC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.width).unbind(2)
        return self.ln_wo_grad(x_BTC) * (1 + scale) + shift


class VAR(nn.Module):
    """The VAR transformer with the official state_dict layout (``shared_aln=False``, ``attn_l2_norm=True``)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.config = cfg
        C, std = cfg.width, math.sqrt(1 / cfg.width / 3)
        self.pos_start = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, self.first_l, C), std=std))
        self.pos_1LC = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, cfg.seq_len, C), std=std))
        levels = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", levels[None])
        # Block-causal: a token sees every token of its own and of earlier scales.
        mask = torch.where(levels[None, :] <= levels[:, None], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask[None, None])
        self.word_embed = nn.Linear(cfg.cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # row num_classes: unconditional
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        for emb in (self.class_emb, self.lvl_embed):
            nn.init.trunc_normal_(emb.weight, std=std)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(C, cfg.vocab_size)

    @property
    def num_scales(self) -> int:
        return len(self.config.patch_nums)

    @property
    def first_l(self) -> int:
        return self.config.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        ends = itertools.accumulate(pn * pn for pn in self.config.patch_nums)
        return [(end - pn * pn, end) for end, pn in zip(ends, self.config.patch_nums)]

    def lvl_pos(self) -> torch.Tensor:
        """Level + position embedding of every token, ``[1, L, C]``."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def sos(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """Embedded input of step 0: the class embedding at the first scale's positions."""
        return cond_BD[:, None] + self.pos_start + self.lvl_pos()[:, : self.first_l]

    def embed_tokens(self, x_BTCv: torch.Tensor, begin: int) -> torch.Tensor:
        """Embedded input of later steps: ``word_embed`` of VQVAE features placed at positions ``begin...``."""
        return self.word_embed(x_BTCv) + self.lvl_pos()[:, begin : begin + x_BTCv.shape[1]]

    def new_kv_cache(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero caches as broadcast zeros (``frontends.sampling.zero_cache``): steps update them out of place."""
        c = self.config
        shape = (c.depth, batch, c.heads, c.seq_len, c.head_dim)
        return zero_cache(self.pos_1LC, shape), zero_cache(self.pos_1LC, shape)

    def step_inputs(self, si: int, x_BTC, cond_BD, k_cache, v_cache) -> tuple:
        """The ``VARStep`` arguments of scale ``si``: positions, mask rows and token groups added."""
        begin, end = self.begin_ends[si]
        positions_T = torch.arange(begin, end, device=self.lvl_1L.device)
        return (x_BTC, cond_BD, positions_T, self.attn_bias_for_masking[0, 0, begin:end],
                k_cache, v_cache, self.lvl_1L[0, begin:end])

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, L, V]`` of the whole pyramid in one pass (block-causal mask).

        ``x_BLCv_wo_first_l`` is ``VQVAE.idxBl_to_var_input`` of the target tokens. No label
        dropout here: training code that wants it replaces labels by ``num_classes`` itself.
        """
        cond_BD = self.class_emb(label_B)
        x_BLC = torch.cat((self.sos(cond_BD), self.embed_tokens(x_BLCv_wo_first_l, self.first_l)), dim=1)
        k_cache, v_cache = self.new_kv_cache(label_B.shape[0])
        positions = torch.arange(self.config.seq_len, device=self.lvl_1L.device)
        logits, _, _ = VARStep(self)(x_BLC, cond_BD, positions, self.attn_bias_for_masking[0, 0],
                                     k_cache, v_cache, self.lvl_1L[0])
        return logits


class VARStep(nn.Module):
    """One generation step (see the module docstring); shares its blocks and head with the ``VAR``.

    Its submodules carry the checkpoint's names (``blocks.3.attn.mat_qkv``, ``head``) so the
    traced graph's sites do too.
    """

    def __init__(self, var: VAR):
        super().__init__()
        self.blocks, self.head_nm, self.head = var.blocks, var.head_nm, var.head

    def forward(self, x, cond, positions, attn_bias, k_cache, v_cache, token_groups):
        k_out, v_out = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cond, attn_bias, k_cache[i], v_cache[i], positions)
            k_out.append(k)
            v_out.append(v)
        logits = self.head(self.head_nm(x, cond))
        return logits, torch.stack(k_out), torch.stack(v_out)


# Lower-case, suffix-free names: fx keeps them as the placeholder names and ONNX as the input names.
# The AdaLN linears run on one row per image (M = batch rows), where int8 GEMMs lose: passes/exclude.py
DEFAULT_EXCLUDE = ("blocks.*.ada_lin.1", "head_nm.ada_lin.1")
STEP_INPUT_NAMES = ["x", "cond", "positions", "attn_bias", "k_cache", "v_cache", "token_groups"]
STEP_OUTPUT_NAMES = ["logits", "k_cache_out", "v_cache_out"]  # ONNX forbids an output named like an input


def dynamic_shapes(cfg: VARConfig) -> tuple:
    """torch.export dims of the step inputs: batch and token count vary, so one exported graph
    serves every scale and batch size."""
    return step_dynamic_shapes(STEP_INPUT_NAMES, cfg.seq_len)


# ----------------------------------------------------------------------------- driver

class VAREdit(NamedTuple):
    tokens: list[torch.Tensor]        # the edited pyramids, per scale [B, pn*pn]
    input_tokens: list[torch.Tensor]  # the inputs' pyramids (``img_to_idxBl``), per scale
    keep_pixels: torch.Tensor         # [S, S] bool: pixels under the last scale's kept tokens


class VARSamples(NamedTuple):
    tokens: list[torch.Tensor]  # per scale, [B, pn*pn] int64
    images: torch.Tensor | None  # [B, 3, H, W] in [0, 1] when a VQVAE was given


def _labels(labels, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if labels.numel() == 0:
        raise UserError("VAR generation needs at least one class label")
    if int(labels.max()) >= num_classes:
        raise UserError(f"class label {int(labels.max())} is out of range: the model has {num_classes} classes")
    return torch.where(labels < 0, num_classes, labels)  # negative: unconditional, as the official sampler


@functools.cache
def standin_quantizer(cfg: VARConfig) -> MultiScaleQuantizer:
    """A fixed random codebook + Phi for runs without the VQVAE file.

    Random-weight benchmarks and example inputs need a next-scale input; with a trained VAR,
    pass the real tokenizer instead, or the inputs after step 0 are not the real ones.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vq_cfg = VQVAEConfig(vocab_size=cfg.vocab_size, z_channels=cfg.cvae, patch_nums=cfg.patch_nums)
        return MultiScaleQuantizer(vq_cfg).eval()


def _probs(logits_BTV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    return filter_top_k_top_p(logits_BTV, top_k, top_p).softmax(dim=-1)


def edit_mask(patch_nums: tuple[int, ...], box: tuple[float, float, float, float], *, inpainting: bool) -> torch.Tensor:
    """The keep-mask of a zero-shot edit, ``[pn, pn]`` at the last scale (the official ``get_edit_mask``).

    ``box = (y0, x0, y1, x1)`` in fractions of the image. 1 = keep the input's token, 0 = generate.
    Outpainting keeps the box; inpainting (also class-conditional editing) regenerates it. The
    box edges are rounded with Python's ``round`` (half to even), as the official code does.
    """
    y0, x0, y1, x1 = box
    pn = patch_nums[-1]
    mask = torch.zeros(pn, pn)
    mask[round(y0 * pn):round(y1 * pn), round(x0 * pn):round(x1 * pn)] = 1
    return 1 - mask if inpainting else mask


def scale_keep_masks(keep_mask: torch.Tensor, patch_nums: tuple[int, ...], batch: int) -> list[torch.Tensor]:
    """Per scale, which tokens of ``[B, pn*pn]`` take the input's token (the official ``replace_embedding``).

    ``keep_mask`` ``[h, w]`` (all images) or ``[B, h, w]`` is resized to each scale bilinearly
    (``align_corners=False``) and thresholded at > 0.5; scales of at most 3 tokens (the 1x1 one)
    keep everything, so even an all-zero mask keeps the input's first token.
    """
    mask = torch.as_tensor(keep_mask).float()
    if mask.ndim == 2:
        mask = mask.expand(batch, *mask.shape)
    if mask.ndim != 3 or mask.shape[0] != batch:
        raise UserError(f"edit keep-mask must be [h, w] or [B={batch}, h, w], got {tuple(mask.shape)}")
    keeps = []
    for pn in patch_nums:
        keep = F.interpolate(mask[:, None], size=(pn, pn), mode="bilinear", align_corners=False) > 0.5
        keeps.append(keep.flatten(1) | (pn * pn <= 3))
    return keeps


def _check_edit(edit_tokens, keep_mask, patch_nums: tuple[int, ...], batch: int) -> None:
    if (edit_tokens is None) != (keep_mask is None):
        raise UserError("an edit needs both the input's tokens and the keep-mask")
    if edit_tokens is None:
        return
    want = [(batch, pn * pn) for pn in patch_nums]
    got = [tuple(t.shape) for t in edit_tokens]
    if got != want:
        raise UserError(f"edit input tokens must be one [B, pn*pn] tensor per scale, {want}; got {got}")


@torch.no_grad()
def sample_tokens(model: VAR, labels, *, quantizer: MultiScaleQuantizer | None = None, cfg: float = 1.5,
                  top_k: int = 900, top_p: float = 0.96, seed: int = 0, step: Callable | None = None,
                  fixed_tokens: list[torch.Tensor] | None = None,
                  on_probs: Callable[[int, torch.Tensor], None] | None = None,
                  edit_tokens: list[torch.Tensor] | None = None,
                  keep_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Sample token pyramids for ``labels`` (negative = unconditional), the official ``autoregressive_infer_cfg`` loop.

    CFG runs the batch twice (conditional, then class ``num_classes``) and mixes the logits of
    scale si as ``(1 + t) * cond - t * uncond`` with ``t = cfg * si / (SN - 1)``. ``step`` is any
    callable with ``VARStep.forward``'s signature (eager by default, a GraphModule, a quantized
    graph, an onnxruntime wrapper). Image i draws from its own generator
    (``frontends.sampling.image_generators``) on the model's device, so its tokens do not
    depend on the batch it is in, and a batch of one draws the same stream as the official
    sampler with ``g_seed=seed``.
    ``quantizer``: the VQVAE's (``vae.quantize``); None uses ``standin_quantizer``.
    ``fixed_tokens``: teacher forcing, the official ``fixed_idx_Bl``: scale si takes
    ``fixed_tokens[si] [B, pn²]`` instead of sampling (calibration resampling, method.md §12.3).
    ``on_probs(si, probs [B, pn², V])``: sees each scale's sampling distribution (CFG-mixed,
    top-k/top-p filtered, softmaxed).
    ``edit_tokens`` (the input images' ``VQVAE.img_to_idxBl``) and ``keep_mask`` (``edit_mask``):
    zero-shot editing, the official ``autoregressive_infer_cfg_with_mask``. After each scale is
    sampled, its tokens where ``scale_keep_masks`` is true become the input's, before the next
    scale's input is built. The official code swaps the code vectors; swapping the tokens gives
    the same vectors and returns tokens that decode to the edited image. Every token is still
    drawn, so the random streams stay those of plain generation. Labels ``-1`` (unconditional)
    give in/outpainting, a class gives class-conditional editing.
    """
    labels = _labels(labels, model.config.num_classes)
    B, SN, last_pn = labels.numel(), model.num_scales, model.config.patch_nums[-1]
    _check_edit(edit_tokens, keep_mask, model.config.patch_nums, B)
    step = step if step is not None else VARStep(model).eval()
    device = model.pos_1LC.device
    # the stand-in follows the model to its device and dtype (a GPU benchmark drives fp16 steps)
    quantizer = quantizer if quantizer is not None else standin_quantizer(model.config).to(device, model.pos_1LC.dtype)
    labels = labels.to(device)
    generators = image_generators(seed, B, device)
    cond_BD = model.class_emb(torch.cat((labels, torch.full_like(labels, model.config.num_classes))))
    x_BTC = model.sos(cond_BD)
    k_cache, v_cache = model.new_kv_cache(2 * B)
    f_hat = cond_BD.new_zeros(B, model.config.cvae, last_pn, last_pn)
    keeps = None if keep_mask is None else [k.to(device) for k in scale_keep_masks(keep_mask, model.config.patch_nums, B)]
    tokens, bad = [], []  # bad: the draws' input checks, read once at the end (no host sync between scales)
    for si in range(SN):
        logits, k_cache, v_cache = step(*model.step_inputs(si, x_BTC, cond_BD, k_cache, v_cache))
        logits = torch.as_tensor(logits)  # an onnxruntime wrapper may return numpy
        t = cfg * si / max(SN - 1, 1)
        probs = _probs((1 + t) * logits[:B] - t * logits[B:], top_k, top_p)
        if on_probs is not None:
            on_probs(si, probs)
        idx_Bl = multinomial_rows(probs, generators, bad=bad) if fixed_tokens is None else fixed_tokens[si].to(device)
        if keeps is not None:
            idx_Bl = torch.where(keeps[si], edit_tokens[si].to(device), idx_Bl)
        tokens.append(idx_Bl)
        f_hat, next_map = quantizer.get_next_autoregressive_input(si, f_hat, quantizer.token_map(idx_Bl))
        if next_map is not None:
            next_BTCv = next_map.flatten(2).transpose(1, 2)
            x_BTC = model.embed_tokens(next_BTCv, model.begin_ends[si + 1][0]).repeat(2, 1, 1)
    check_probs(bad)
    return tokens


def generate(model: VAR, labels, *, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, seed: int = 0,
             step: Callable | None = None, vae: VQVAE | None = None) -> VARSamples:
    """``sample_tokens`` with the VQVAE's quantizer, plus the decoded images when ``vae`` is given."""
    tokens = sample_tokens(model, labels, quantizer=None if vae is None else vae.quantize, cfg=cfg,
                           top_k=top_k, top_p=top_p, seed=seed, step=step)
    return VARSamples(tokens, None if vae is None else vae.decode(tokens))


def edit_keep_pixels(model: VAR, vae: VQVAE, box: tuple[float, float, float, float], *, inpainting: bool,
                     image_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """``[S, S]`` bool: the pixels under the last scale's kept tokens. A box that keeps or regenerates
    every token, or images (``image_hw``) of another size than the tokenizer's, are errors."""
    pn, size = model.config.patch_nums[-1], vae.config.image_size
    if image_hw is not None and tuple(image_hw) != (size, size):
        raise UserError(f"VQVAE expects {size}x{size} images, got {tuple(image_hw)}")
    mask = edit_mask(model.config.patch_nums, box, inpainting=inpainting)
    keep = scale_keep_masks(mask, model.config.patch_nums, 1)[-1].reshape(pn, pn)
    if keep.all() or not keep.any():
        raise UserError(f"the edit box {tuple(round(v, 4) for v in box)} (fractions y0,x0,y1,x1) "
                        f"{'keeps' if keep.all() else 'regenerates'} every token of the {pn}x{pn} token grid "
                        f"({size // pn} px per token): widen or shrink it")
    return keep.repeat_interleave(size // pn, 0).repeat_interleave(size // pn, 1)


def edit_images(model: VAR, vae: VQVAE, labels, images: torch.Tensor, box: tuple[float, float, float, float], *,
                inpainting: bool, seed: int = 0, step: Callable | None = None, **sampling) -> VAREdit:
    """Zero-shot edit of ``images [B, 3, S, S]`` in [0, 1]: tokenize, build the official keep-mask
    of ``box`` (fractions), and sample around it (``sample_tokens``). Each image is tokenized
    alone, so its tokens do not depend on its batch (a convolution's rounding does)."""
    keep = edit_keep_pixels(model, vae, box, inpainting=inpainting, image_hw=images.shape[-2:])
    images = images.to(model.pos_1LC.device, model.pos_1LC.dtype)
    per_image = [vae.img_to_idxBl(images[i:i + 1]) for i in range(len(images))]
    input_tokens = [torch.cat(scale) for scale in zip(*per_image)]
    tokens = sample_tokens(model, labels, quantizer=vae.quantize, seed=seed, step=step, edit_tokens=input_tokens,
                           keep_mask=edit_mask(model.config.patch_nums, box, inpainting=inpainting), **sampling)
    return VAREdit(tokens, input_tokens, keep)


# ----------------------------------------------------------------------------- family

_MARKER_KEYS = ("pos_1LC", "lvl_1L", "blocks.0.ada_lin.1.weight", "blocks.0.attn.mat_qkv.weight")


@functools.cache
def _layout(name: str) -> dict[str, tuple[int, ...]]:
    return layout(VAR, CONFIGS[name])


def _shape(state_dict: dict, key: str) -> tuple[int, ...]:
    return tensor_shape(state_dict, key, "VAR")


def config_from_state_dict(state_dict: dict) -> VARConfig:
    """The configuration of a VAR checkpoint of no known size, read from its shapes and ``lvl_1L``."""
    _, seq_len, width = _shape(state_dict, "pos_1LC")
    _shape(state_dict, "lvl_1L")
    counts = torch.bincount(state_dict["lvl_1L"].flatten().long()).tolist()
    patch_nums = tuple(math.isqrt(n) for n in counts)
    if any(pn * pn != n for pn, n in zip(patch_nums, counts)) or sum(counts) != seq_len:
        raise UserError(f"VAR checkpoint: lvl_1L does not describe square scales (tokens per scale: {counts})")
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.") and k.endswith(".ada_lin.1.weight")})
    return VARConfig(
        depth=depth,
        width=width,
        heads=_shape(state_dict, "blocks.0.attn.scale_mul_1H11")[1],
        vocab_size=_shape(state_dict, "head.weight")[0],
        cvae=_shape(state_dict, "word_embed.weight")[1],
        num_classes=_shape(state_dict, "class_emb.weight")[0] - 1,
        patch_nums=patch_nums,
        mlp_ratio=_shape(state_dict, "blocks.0.ffn.fc1.weight")[0] / width,
    )


def detect(state_dict: dict) -> str | None:
    """``"d16"``... when the keys and shapes are exactly a known config's, ``"custom"`` for other VAR layouts, else None."""
    if not all(k in state_dict for k in _MARKER_KEYS):
        return None
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    same_size = [name for name, c in CONFIGS.items() if shapes.get("pos_1LC") == (1, c.seq_len, c.width)]
    return next((name for name in same_size if _layout(name) == shapes), "custom")


def load_var(state_dict: dict, cfg: VARConfig, source: str = "VAR checkpoint") -> VAR:
    """Build on the meta device and adopt the checkpoint's tensors (strict; UserError lists every mismatch)."""
    var = meta_model(VAR, cfg)
    strict_load(var, state_dict, source)
    return var.float().eval()


def group_maps(num_scales: int) -> dict[str, list[int]]:
    """Per site glob, the STWQ group of each token group id (= scale index), method.md §4.2.

    qkv and fc1 get one group per scale; proj and fc2 two (token 0, the class token, vs the
    rest); the head one (per-tensor).
    """
    per_scale = list(range(num_scales))
    first_vs_rest = [0] + [1] * (num_scales - 1)
    return {"*.attn.mat_qkv": per_scale, "*.ffn.fc1": per_scale,
            "*.attn.proj": first_vs_rest, "*.ffn.fc2": first_vs_rest, "head": [0] * num_scales}


def _last_step_inputs(var: VAR, quantizer: MultiScaleQuantizer | None) -> tuple:
    """Inputs of the last scale's step for class 0 (CFG batch 2), its KV cache filled by real sampling."""
    step, seen = VARStep(var).eval(), []

    def recording_step(*inputs):
        seen.append(inputs)
        return step(*inputs)

    sample_tokens(var, [0], quantizer=quantizer, seed=0, step=recording_step)
    return seen[-1]


def build(state_dict: dict, path: str | Path | None = None, config: str | None = None,
          tokenizer: str | Path | None = None, **_other_options) -> ModelBundle:
    """ModelBundle of one VAR step; ``tokenizer`` is the VQVAE file. Options of other families are ignored."""
    cfg = CONFIGS[config] if config in CONFIGS else config_from_state_dict(state_dict)
    var = load_var(state_dict, cfg, f"VAR checkpoint {path or ''}".strip())
    vae = load_vqvae(tokenizer, cfg.patch_nums, cfg.vocab_size, cfg.cvae) if tokenizer else None
    quantizer = None if vae is None else vae.quantize

    def generate_tokens(labels, seed: int = 0, step: Callable | None = None, **forcing) -> list[torch.Tensor]:
        return sample_tokens(var, labels, quantizer=quantizer, seed=seed, step=step, **forcing)

    def edit(labels, images, box, *, inpainting: bool, seed: int = 0, step: Callable | None = None) -> VAREdit:
        if vae is None:
            raise UserError("editing images needs the VQVAE (--tokenizer) to tokenize them")
        return edit_images(var, vae, labels, images, box, inpainting=inpainting, seed=seed, step=step)

    def edit_check(image_hw, box, *, inpainting: bool) -> None:  # bad boxes and sizes fail before any work
        if vae is not None:
            edit_keep_pixels(var, vae, box, inpainting=inpainting, image_hw=image_hw)

    return ModelBundle(
        name=Path(path).stem if path else f"var-{config or 'custom'}",
        module=VARStep(var).eval(),
        example_inputs=_last_step_inputs(var, quantizer),
        family="var",
        input_names=list(STEP_INPUT_NAMES),
        output_names=list(STEP_OUTPUT_NAMES),
        calib_inputs=[],
        extra={"model": var, "tokenizer": vae, "generate": generate_tokens, "group_maps": group_maps(var.num_scales),
               "dynamic_shapes": dynamic_shapes(cfg), "edit": edit, "edit_check": edit_check,
               "default_exclude": list(DEFAULT_EXCLUDE)},
    )


register_family(Family("var", detect, build))
