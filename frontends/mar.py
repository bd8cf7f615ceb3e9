"""MAR (LTH14/mar, ``models/mar.py`` + ``models/diffloss.py``): the model, its step graph, its
diffusion head and its sampler.

MAR generates continuous tokens (a KL-16 VAE's latents) in a random order: at every iteration a
bidirectional MAE encoder sees the class-conditioned buffer and the tokens known so far, a decoder
fills the rest with mask tokens, and a small diffusion MLP (``SimpleMLPAdaLN``) turns each
to-be-predicted token's decoder output ``z`` into a token by DDPM sampling.

* ``MAR`` holds the parameters under the names of the official checkpoints (``mar_base`` ...;
  timm ``Block`` layout, ``diffloss.net.*``; strict load). Its ``forward`` is the official
  ``forward_mae_encoder`` + ``forward_mae_decoder`` at inference: masked tokens are DROPPED before
  the encoder (a data-dependent shape) and padded back with the mask token before the decoder.
* ``MARStep`` is one iteration as a fixed-shape graph, traceable by torch.fx and exportable:
  ``(tokens, condition, order, attn_mask, token_groups) -> z``. It lays the sequence out in
  generation order, ``[buffer | order[0], order[1], ...]``: the tokens still masked at this
  iteration are always the first ``n`` of the order and the known ones the rest, so one
  unbatched ``attn_mask [1, T]`` (``-inf`` on the masked span) stands for the reference's drop (an
  encoder key that is masked gets zero weight; the masked rows' own outputs are replaced by the
  mask token before the decoder) and one unbatched ``token_groups [T]`` marks the spans.
  ``z [B, L, D]`` is in the same layout, so the rows to predict are one contiguous slice.
* ``DiffusionHead`` is ``SimpleMLPAdaLN`` as its own graph ``(x, t, c) -> (eps, var)``, which a
  compile can quantize or keep in FP; ``Diffusion`` holds the respaced cosine DDPM of the
  official ``create_diffusion`` (learned-range variance, epsilon prediction, no clipping).
* ``generate`` is the official ``sample_tokens`` (cosine mask schedule, at least one token per
  iteration, CFG with its ``linear``/``constant`` schedule, temperature on the diffusion noise),
  with the order and every noise drawn from the image's own generator.

STWQ token groups (``token_group_ids``): PTQ4ARVG's MAR map gives each of the ``buffer_size``
class-conditioned buffer tokens its own group (one class embedding + that position's embedding:
the "sink" rows, method.md §4.2) and the image tokens one shared group. We split the image tokens
in two, ``buffer_size`` = known tokens (encoder: projected latents; decoder: encoder outputs) and
``buffer_size + 1`` = masked tokens (decoder: the learned mask token + position, the rows whose
outputs feed the head; encoder: filler rows the reference drops), because the two spans carry
different distributions and the masked span's share changes from all to a few tokens over a
generation; a shared grid would be set by whichever dominates calibration.

Calibration (``calib_iterations``): PTQ4ARVG records the inputs of the LAST iteration of each
generation (``main_mar_cali.py``); ``"all"`` records every iteration instead. The head is not
quantized by the reference; a recipe's ``[head]`` table compiles it as its own graph (``compiler/driver.py``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from frontends.families import Family, register_family
from frontends.generic import ModelBundle
from frontends.maskgit_vq import count_indexed, load_strict
from frontends.rar import Mlp  # timm's Mlp (fc1, erf GELU, fc2): the same module in both checkpoints
from frontends.sampling import image_generators, on_device


@dataclass(frozen=True)
class MARConfig:
    embed_dim: int  # encoder_embed_dim == decoder_embed_dim in every released model
    encoder_depth: int
    decoder_depth: int
    num_heads: int
    diffloss_d: int
    diffloss_w: int
    seq_len: int = 256  # (img_size / vae_stride / patch_size) ** 2
    token_dim: int = 16  # vae_embed_dim * patch_size ** 2
    buffer_size: int = 64
    num_classes: int = 1000
    mlp_ratio: float = 4.0

    @property
    def seq_side(self) -> int:
        return math.isqrt(self.seq_len)

    @property
    def total_len(self) -> int:
        return self.buffer_size + self.seq_len


CONFIGS = {
    # main_mar.py --model mar_base|large|huge with the README's evaluation --diffloss_d/--diffloss_w
    "mar_base": MARConfig(768, 12, 12, 12, 6, 1024),
    "mar_large": MARConfig(1024, 16, 16, 16, 8, 1280),
    "mar_huge": MARConfig(1280, 20, 20, 16, 12, 1536),
    "tiny": MARConfig(32, 2, 2, 2, 2, 48, seq_len=16, token_dim=4, buffer_size=4, num_classes=10),
    # builtin:mnist-mar, the tiny MNIST MAR of `tools.train_tiny --only mar mar-head` (MODEL_CARD.md): 8x8 tokens of a KL VAE
    "mnist": MARConfig(64, 2, 2, 4, 2, 128, seq_len=64, token_dim=4, buffer_size=8, num_classes=10),
}


@dataclass(frozen=True)
class Sampling:
    """The README's evaluation settings (``--num_iter 256 --num_sampling_steps 100 --cfg_schedule linear
    --temperature 1.0``) per model; the default object is main_mar.py's argparse defaults."""

    num_iter: int = 64
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    num_sampling_steps: str = "100"


SAMPLING = {
    "mar_base": Sampling(256, 2.9),
    "mar_large": Sampling(256, 3.0),
    "mar_huge": Sampling(256, 3.2),
    "tiny": Sampling(4, 2.0, num_sampling_steps="10"),  # tests: CFG on (calibration's cond/uncond rows), few steps
    # the tiny MNIST MAR: 64 tokens in 16 iterations, the official 100 diffusion steps (MODEL_CARD.md)
    "mnist": Sampling(16, 3.0),
}

STEP_INPUT_NAMES = ["tokens", "condition", "order", "attn_mask", "token_groups"]
STEP_OUTPUT_NAMES = ["z"]
HEAD_INPUT_NAMES = ["x", "t", "c"]
HEAD_OUTPUT_NAMES = ["eps", "var"]


def token_group_ids(config: MARConfig, n_masked: int) -> torch.Tensor:
    """``[buffer + L]``: buffer position p -> group p, the masked span -> ``buffer + 1``, known tokens ->
    ``buffer`` (module docstring), in the step's order layout."""
    buf = config.buffer_size
    groups = torch.full((config.total_len,), buf, dtype=torch.long)
    groups[:buf] = torch.arange(buf)
    groups[buf:buf + n_masked] = buf + 1
    return groups


# ----------------------------------------------------------------------------- transformer (timm Block names)


class Attention(nn.Module):
    """timm ``Attention`` (qkv with bias, no q/k norm) with explicit matmuls: quantization sites
    ``attn.matmul1/2`` as in the other families; ``attn_mask`` is additive over the keys."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.matmul(q * self.scale, k.transpose(-2, -1))
        if attn_mask is not None:
            scores = scores + attn_mask
        out = torch.matmul(scores.softmax(-1), v)
        return self.proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- diffusion head (diffloss.py names)


def modulate(x, shift, scale):
    """Kept literally ``x * (1 + scale) + shift``: the GPS pass folds its scales into this form."""
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """DiT's sinusoidal embedding ``[cos | sin]`` of (float) timesteps ``t [N]`` (``dim`` even here)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs.to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (shift, scale): diffloss.py's order
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, in_channels: int, model_channels: int, z_channels: int, num_res_blocks: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, 2 * in_channels)  # eps and the learned-range variance

    def forward(self, x, t, c):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class DiffLoss(nn.Module):
    """Only the parameter container (``diffloss.net``); the diffusion math is ``Diffusion``."""

    def __init__(self, config: MARConfig):
        super().__init__()
        self.net = SimpleMLPAdaLN(config.token_dim, config.diffloss_w, config.embed_dim, config.diffloss_d)


class DiffusionHead(nn.Module):
    """``SimpleMLPAdaLN`` as its own graph: ``x [N, C]`` noisy tokens, ``t [N]`` ORIGINAL timesteps
    (the respacing map already applied), ``c [N, D]`` decoder outputs -> ``(eps, var)`` ``[N, C]`` each.
    Parameter names are the checkpoint's minus the ``diffloss.net.`` prefix."""

    def __init__(self, net: SimpleMLPAdaLN):
        super().__init__()
        self.in_channels = net.in_channels
        for name, child in net.named_children():
            self.add_module(name, child)

    def forward(self, x, t, c):
        out = SimpleMLPAdaLN.forward(self, x, t, c)
        return out[:, :self.in_channels], out[:, self.in_channels:]


# ----------------------------------------------------------------------------- the model


class MAR(nn.Module):
    """The official parameter layout (names, shapes and order of ``mar_*`` checkpoints)."""

    def __init__(self, config: MARConfig):
        super().__init__()
        self.config = config
        d, total = config.embed_dim, config.total_len
        hidden_heads = (d, config.num_heads, config.mlp_ratio)
        self.class_emb = nn.Embedding(config.num_classes, d)
        self.fake_latent = nn.Parameter(torch.zeros(1, d))
        self.z_proj = nn.Linear(config.token_dim, d)
        self.z_proj_ln = nn.LayerNorm(d, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, d))
        self.encoder_blocks = nn.ModuleList(Block(*hidden_heads) for _ in range(config.encoder_depth))
        self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_embed = nn.Linear(d, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, d))
        self.decoder_blocks = nn.ModuleList(Block(*hidden_heads) for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, config.seq_len, d))
        self.diffloss = DiffLoss(config)

    def class_embedding(self, condition: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: ``class_emb`` of a label, ``fake_latent`` for label ``num_classes`` (CFG's null class)."""
        return class_embedding(self, condition)

    def forward(self, tokens, mask, condition):
        """The official encoder + decoder (eval: no label drop): ``tokens [B, L, C]`` in raster order,
        ``mask [B, L]`` (1 = unknown; every row masks as many tokens), ``condition [B]`` labels.
        Returns ``z [B, L, D]`` in raster order (diffusion position embedding added)."""
        cfg = self.config
        bsz, buf = tokens.shape[0], cfg.buffer_size
        x = self.z_proj(tokens)
        x = torch.cat([self.class_embedding(condition).unsqueeze(1).expand(-1, buf, -1), x], dim=1)
        keep = torch.cat([torch.ones(bsz, buf, dtype=torch.bool), mask == 0], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = x[keep.nonzero(as_tuple=True)].reshape(bsz, -1, x.shape[-1])  # the reference's drop
        for block in self.encoder_blocks:
            x = block(x)
        x = self.decoder_embed(self.encoder_norm(x))
        padded = self.mask_token.expand(bsz, cfg.total_len, -1).clone()
        padded[keep.nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
        x = padded + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)[:, buf:] + self.diffusion_pos_embed_learned


def class_embedding(m, condition: torch.Tensor) -> torch.Tensor:
    null = (condition == m.config.num_classes).unsqueeze(-1)
    return torch.where(null, m.fake_latent, m.class_emb(condition.clamp(max=m.config.num_classes - 1)))


class MARStep(nn.Module):
    """One MAR iteration as a graph with explicit, fixed-shape inputs (module docstring).

    It shares the model's parameters under the same names (no ``model.`` prefix), so sites read
    ``encoder_blocks.3.attn.qkv``. The head's parameters stay out of it (``DiffusionHead``).
    """

    def __init__(self, model: MAR):
        super().__init__()
        self.config = model.config
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, child in model.named_children():
            if name != "diffloss":
                self.add_module(name, child)

    def forward(self, tokens, condition, order, attn_mask, token_groups):
        """``tokens [B, L, C]`` raster order (zeros where unknown), ``condition [B]`` labels
        (``num_classes``: null), ``order [B, L]`` the generation order, ``attn_mask [1, T]`` additive
        (``T = buffer + L``; ``-inf`` on the masked span ``buffer .. buffer + n``), ``token_groups [T]``
        (STWQ groups; not used by the float math). Returns ``z [B, L, D]`` in order layout: row j
        is token ``order[:, j]``."""
        return step_forward(self, tokens, condition, order, attn_mask)


def step_forward(m, tokens, condition, order, attn_mask):
    """The step on ``m`` (MAR's parameters under their names). Written without shape or device reads
    and with broadcasting instead of ``expand``, so the graph saved by ``--target torch`` rebuilds
    from the allowed functions (``backends/fx_graph.py``)."""
    buf = m.config.buffer_size
    cls = class_embedding(m, condition).unsqueeze(1)
    index = order.unsqueeze(-1).expand(-1, -1, m.config.token_dim)
    image = m.z_proj(torch.gather(tokens, 1, index))  # [B, L, D] in order layout
    x = torch.cat([cls + m.encoder_pos_embed_learned[:, :buf],
                   image + F.embedding(order, m.encoder_pos_embed_learned[0, buf:])], dim=1)
    x = m.z_proj_ln(x)
    for block in m.encoder_blocks:
        x = block(x, attn_mask)
    x = m.decoder_embed(m.encoder_norm(x))
    x = torch.where(attn_mask.transpose(0, 1) >= 0, x, m.mask_token)  # the masked rows: the reference pads them
    x = torch.cat([x[:, :buf] + m.decoder_pos_embed_learned[:, :buf],
                   x[:, buf:] + F.embedding(order, m.decoder_pos_embed_learned[0, buf:])], dim=1)
    for block in m.decoder_blocks:
        x = block(x)
    return m.decoder_norm(x)[:, buf:] + F.embedding(order, m.diffusion_pos_embed_learned[0])


# ----------------------------------------------------------------------------- diffusion (respaced cosine DDPM)


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """The official ``space_timesteps`` for comma-separated counts (``"100"``), sorted."""
    counts = [int(c) for c in str(section_counts).split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count or count < 1:
            raise UserError(f"cannot divide {size} diffusion steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(steps))


class Diffusion:
    """``create_diffusion(num_sampling_steps, noise_schedule="cosine")`` at sampling: the respaced
    betas of a 1000-step cosine schedule, epsilon prediction, learned-range variance, no clip.
    Tables in float64 as the official numpy code, gathered to float32 per step as it does."""

    def __init__(self, num_sampling_steps: str = "100", diffusion_steps: int = 1000):
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        base = torch.tensor([min(1 - alpha_bar((i + 1) / diffusion_steps) / alpha_bar(i / diffusion_steps), 0.999)
                             for i in range(diffusion_steps)], dtype=torch.float64)
        cumprod = torch.cumprod(1 - base, 0)
        self.timestep_map = space_timesteps(diffusion_steps, num_sampling_steps)
        kept = cumprod[self.timestep_map]
        betas = 1 - kept / torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
        ac = torch.cumprod(1 - betas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self.num_timesteps = len(betas)
        self.tables = {
            "sqrt_recip_ac": torch.sqrt(1 / ac), "sqrt_recipm1_ac": torch.sqrt(1 / ac - 1),
            "min_log": torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(betas) > 1 else torch.log(betas),
            "max_log": torch.log(betas),
            "coef1": betas * torch.sqrt(ac_prev) / (1 - ac), "coef2": (1 - ac_prev) * torch.sqrt(1 - betas) / (1 - ac),
        }

    def at(self, name: str, i) -> torch.Tensor:
        """Table ``name`` at step ``i``: a scalar for an int, ``[N, 1]`` (one per row) for a tensor of steps."""
        if isinstance(i, torch.Tensor):
            return self.tables[name].to(i.device)[i].float().unsqueeze(-1)
        return self.tables[name][i].float()

    def p_mean_log_var(self, eps, var_values, x, i):
        """Mean and log-variance of ``p(x_{i-1} | x_i)`` from the head's outputs (official
        ``p_mean_variance``: learned-range variance between the posterior's and ``beta``)."""
        frac = (var_values + 1) / 2
        log_var = frac * self.at("max_log", i) + (1 - frac) * self.at("min_log", i)
        x0 = self.at("sqrt_recip_ac", i) * x - self.at("sqrt_recipm1_ac", i) * eps
        return self.at("coef1", i) * x0 + self.at("coef2", i) * x, log_var

    def q_sample(self, x0, i, noise):
        """``x_i`` from clean ``x0`` (official ``q_sample``), ``i`` a tensor of steps."""
        sqrt_ac = 1 / self.at("sqrt_recip_ac", i)
        return sqrt_ac * x0 + self.at("sqrt_recipm1_ac", i) * sqrt_ac * noise

    def p_sample(self, eps, var_values, x, i: int, noise, temperature: float):
        """``x_{i-1}`` from the head's outputs at respaced step ``i`` (official ``p_sample``)."""
        mean, log_var = self.p_mean_log_var(eps, var_values, x, i)
        return mean + (float(i != 0) * torch.exp(0.5 * log_var)) * noise * temperature


def sample_head(head, diffusion: Diffusion, z, cfg_scale: float, temperature: float, noise_fn) -> torch.Tensor:
    """Official ``DiffLoss.sample``: ``z [2N, D]`` (cond rows then null rows) with CFG, ``[N, D]``
    without; ``noise_fn(shape_rows)`` draws ``[N, C]`` noise (per image streams). Returns ``[N, C]``."""
    n = z.shape[0] // 2 if cfg_scale != 1.0 else z.shape[0]
    x = noise_fn()
    for i in reversed(range(diffusion.num_timesteps)):
        xin = torch.cat([x, x]) if cfg_scale != 1.0 else x
        t = torch.full((xin.shape[0],), diffusion.timestep_map[i], dtype=torch.long, device=z.device)
        eps, var = head(xin, t, z)
        if cfg_scale != 1.0:  # forward_with_cfg: guided eps, the conditional half's variance
            eps = eps[n:] + cfg_scale * (eps[:n] - eps[n:])
            var = var[:n]
        x = diffusion.p_sample(eps, var, x, i, noise_fn(), temperature)
    return x


class FirstStepsFP:
    """A head callable that runs the FP head for the first ``fp_steps`` denoising steps of every chain
    (the largest timesteps of the respaced schedule) and ``quantized`` for the rest (a recipe's
    ``[head] fp_steps``). The first step, at ``t = 999`` where ``alpha_bar`` is 2.4e-9, multiplies
    the head's epsilon error by 316 (100 steps): a quantized head's error there derails the chain."""

    def __init__(self, quantized, fp, num_sampling_steps: str, fp_steps: int):
        self.quantized, self.fp, self.fp_steps = quantized, fp, fp_steps
        timesteps = sorted(Diffusion(num_sampling_steps).timestep_map)
        self.threshold = timesteps[-min(fp_steps, len(timesteps))] if fp_steps else None

    def __call__(self, x, t, c):
        if self.threshold is not None and int(t.reshape(-1)[0]) >= self.threshold:  # one timestep per call
            return self.fp(x, t, c)
        return self.quantized(x, t, c)


def head_with_fp_steps(bundle: ModelBundle, quantized, fp_steps: int):
    """``quantized`` (the head graph or its runner) with the first ``fp_steps`` steps on the bundle's FP head."""
    if not fp_steps:
        return quantized
    return FirstStepsFP(quantized, bundle.extra["head"].module, bundle.extra["sampling"]["num_sampling_steps"], fp_steps)


# ----------------------------------------------------------------------------- driver


def step_inputs(config: MARConfig, tokens, condition, order, n_masked: int) -> tuple:
    """Arguments of ``MARStep.forward`` at an iteration where the first ``n_masked`` of ``order`` are unknown."""
    groups = token_group_ids(config, n_masked)
    # one row [1, T], broadcast over the queries (SDPA, which the GPU lowering calls, wants a 2-D mask)
    attn_mask = torch.zeros(1, config.total_len).masked_fill(groups == config.buffer_size + 1, float("-inf"))
    return tokens, condition, order, attn_mask, groups


def mask_schedule(config: MARConfig, num_iter: int) -> list[tuple[int, int, int]]:
    """Per iteration ``(n_masked, n_next, next_mask_len)``: tokens unknown before it, after it, and
    the official ``mask_len`` used by the linear CFG schedule (cosine ratio, floor, at least 1
    masked for the next round but one fewer than now; the last iteration predicts all the rest)."""
    n, out = config.seq_len, []
    for step in range(num_iter):
        mask_len = math.floor(config.seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = max(1, min(n - 1, mask_len))
        n_next = 0 if step >= num_iter - 1 else mask_len
        out.append((n, n_next, mask_len))
        n = n_next
    return out


@torch.no_grad()
def generate(model: MAR, labels, *, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
             temperature: float = 1.0, num_sampling_steps: str = "100", seed: int = 0, step=None, head=None,
             return_tokens: bool = True) -> torch.Tensor:
    """Official ``sample_tokens``: returns the token latents ``[B, L, C]`` in raster order.

    ``step``: any callable with ``MARStep.forward``'s signature (traced, quantized, onnxruntime);
    ``head``: any callable with ``DiffusionHead.forward``'s. Image i draws its order
    (``randperm``) and then every diffusion noise from its own generator, so it does not depend
    on the batch. ``cfg == 1`` runs without the null class, as the official code.
    """
    c = model.config
    if cfg_schedule not in ("linear", "constant"):
        raise UserError(f"unknown MAR cfg schedule {cfg_schedule!r} (linear, constant)")
    step = MARStep(model).eval() if step is None else step
    head = DiffusionHead(model.diffloss.net).eval() if head is None else head
    device = model.mask_token.device
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
    labels = labels.masked_fill(labels < 0, c.num_classes)  # -1: unconditional (fake_latent), as tools.generate's
    bsz = labels.numel()
    guided = cfg != 1.0
    condition = torch.cat([labels, torch.full_like(labels, c.num_classes)]) if guided else labels
    generators = image_generators(seed, bsz, device)
    order = torch.stack([torch.randperm(c.seq_len, generator=g, device=device) for g in generators])
    rows_order = torch.cat([order, order]) if guided else order
    diffusion = Diffusion(num_sampling_steps)
    tokens = torch.zeros(bsz, c.seq_len, c.token_dim, device=device)
    for n_masked, n_next, mask_len in mask_schedule(c, num_iter):
        if n_next == n_masked:  # nothing to predict (num_iter > seq_len): the official loop samples 0 tokens
            continue
        doubled = torch.cat([tokens, tokens]) if guided else tokens
        z = step(*on_device(device, *step_inputs(c, doubled, condition, rows_order, n_masked)))
        z = z[0] if isinstance(z, (tuple, list)) else z  # runners (onnxruntime, TensorRT) return every output
        z = z[:, n_next:n_masked]  # [rows, k, D]: the tokens this iteration predicts, in order
        k = n_masked - n_next
        scale = cfg if cfg_schedule == "constant" else 1 + (cfg - 1) * (c.seq_len - mask_len) / c.seq_len

        def noise(k=k):
            return torch.cat([torch.randn(k, c.token_dim, generator=g, device=device) for g in generators])

        latents = sample_head(head, diffusion, z.flatten(0, 1), scale, temperature, noise).unflatten(0, (bsz, k))
        index = order[:, n_next:n_masked].unsqueeze(-1).expand(-1, -1, c.token_dim)
        tokens = tokens.scatter(1, index, latents)
    return tokens


@torch.no_grad()
def example_inputs(step: MARStep, label: int = 0, batch: int = 1, masked: int | None = None) -> tuple:
    """A CFG iteration (``batch`` images and as many null rows) with ``masked`` unknown tokens
    (default half) and seeded random latents at the known ones."""
    c = step.config
    masked = c.seq_len // 2 if masked is None else masked
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(c.seq_len, generator=g) for _ in range(batch)]).repeat(2, 1)
    tokens = torch.randn(batch, c.seq_len, c.token_dim, generator=g).repeat(2, 1, 1)
    tokens = tokens.scatter(1, order[:, :masked].unsqueeze(-1).expand(-1, -1, c.token_dim), 0.0)
    labels = torch.arange(label, label + batch) % c.num_classes
    condition = torch.cat([labels, torch.full_like(labels, c.num_classes)])
    return step_inputs(c, tokens, condition, order, masked)


def head_example_inputs(model: MAR, rows: int = 4) -> tuple:
    g = torch.Generator().manual_seed(0)
    c = model.config
    return (torch.randn(rows, c.token_dim, generator=g), torch.randint(0, 1000, (rows,), generator=g),
            torch.randn(rows, c.embed_dim, generator=g))


def dynamic_shapes() -> tuple:
    """Only the batch varies: the token axis is ``buffer + L`` at every iteration."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    return ({0: batch}, {0: batch}, {0: batch}, None, None)


def head_dynamic_shapes() -> tuple:
    """The head's rows (tokens x CFG halves of one denoising step) vary; nothing else does."""
    rows = torch.export.Dim("rows", min=2, max=1 << 20)
    return ({0: rows}, {0: rows}, {0: rows})


def random_mar(config: MARConfig | str = "tiny", seed: int = 0) -> MAR:
    """A MAR with random weights that exercise every path (the official init zeroes the head's
    adaLN and output layers: the head would predict a constant)."""
    model = MAR(CONFIGS[config] if isinstance(config, str) else config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_(1 + 0.1 * noise if ("norm" in name or "_ln" in name) and name.endswith(".weight") else 0.1 * noise)
            elif p.dim() == 2 and name.endswith(".weight") and name != "class_emb.weight":
                # the head's output small: its variance input stays near [-1, 1] and samples stay finite
                p.copy_(noise / math.sqrt(p.shape[1]) * (0.1 if name.startswith("diffloss.net.final_layer.linear") else 1))
            else:
                p.copy_(0.5 * noise)
    return model.eval()


# ----------------------------------------------------------------------------- family

_SIGNATURE_KEYS = ("fake_latent", "z_proj.weight", "encoder_pos_embed_learned", "diffusion_pos_embed_learned",
                   "diffloss.net.input_proj.weight")


def unwrap_state_dict(obj: dict) -> dict:
    """The weights of a checkpoint: main_mar.py saves ``{"model", "model_ema", ...}`` and evaluates the
    EMA (``use_ema=True``), so ``model_ema`` wins; a plain state_dict (safetensors export) is itself."""
    for key in ("model_ema", "model"):
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def infer_config(state_dict: dict) -> MARConfig:
    """The architecture read from tensor shapes. Heads are not in the shapes: a released width
    (768: 12, 1024/1280: 16) gives its model's, any other width 64-wide heads."""
    needed = ("encoder_pos_embed_learned", "diffusion_pos_embed_learned", "class_emb.weight", "z_proj.weight",
              "encoder_blocks.0.mlp.fc1.weight", "diffloss.net.input_proj.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise UserError(f"MAR checkpoint lacks {', '.join(missing)}: cannot read the model size")
    d = state_dict["z_proj.weight"].shape[0]
    seq_len = state_dict["diffusion_pos_embed_learned"].shape[1]
    known = {c.embed_dim: c.num_heads for c in CONFIGS.values()}
    return MARConfig(
        embed_dim=d,
        encoder_depth=count_indexed(state_dict, "encoder_blocks.{}.norm1.weight"),
        decoder_depth=count_indexed(state_dict, "decoder_blocks.{}.norm1.weight"),
        num_heads=known.get(d, max(1, d // 64)),
        diffloss_d=count_indexed(state_dict, "diffloss.net.res_blocks.{}.in_ln.weight"),
        diffloss_w=state_dict["diffloss.net.input_proj.weight"].shape[0],
        seq_len=seq_len,
        token_dim=state_dict["z_proj.weight"].shape[1],
        buffer_size=state_dict["encoder_pos_embed_learned"].shape[1] - seq_len,
        num_classes=state_dict["class_emb.weight"].shape[0],
        mlp_ratio=state_dict["encoder_blocks.0.mlp.fc1.weight"].shape[0] / d,
    )


def detect(state_dict: dict) -> str | None:
    """``mar_base``/``mar_large``/``mar_huge``/``tiny`` by shapes, ``custom`` for another MAR size."""
    weights = unwrap_state_dict(state_dict)
    if not all(k in weights for k in _SIGNATURE_KEYS):
        return None
    config = infer_config(weights)
    return next((name for name, c in CONFIGS.items() if c == config), "custom")


def load_mar(state_dict: dict, config: MARConfig, what: str = "MAR checkpoint") -> MAR:
    with torch.device("meta"):
        model = MAR(config)
    return load_strict(model, state_dict, what)


CALIB_ITERATIONS = ("last", "all")


def build(state_dict: dict, path=None, config: str | None = None, tokenizer=None, calib_iterations: str = "last",
          **options) -> ModelBundle:
    """Strict-load a MAR checkpoint (``model_ema`` of a training checkpoint, or a plain state_dict).
    ``calib_iterations``: ``last`` (PTQ4ARVG) or ``all`` iterations of each calibration generation."""
    if calib_iterations not in CALIB_ITERATIONS:
        raise UserError(f"calib_iterations must be one of {', '.join(CALIB_ITERATIONS)}, got {calib_iterations!r}")
    if options:
        raise UserError(f"the mar frontend has no option {', '.join(sorted(options))}")
    weights = unwrap_state_dict(state_dict)
    arch = CONFIGS[config] if config in CONFIGS else infer_config(weights)
    model = load_mar(weights, arch, f"MAR checkpoint {path or ''}".strip())
    vae = None
    if tokenizer is not None:
        from frontends.kl_vae import load_vae

        vae = load_vae(tokenizer, arch)
    sampling = asdict(SAMPLING.get(config, Sampling()))
    step = MARStep(model).eval()
    head = DiffusionHead(model.diffloss.net).eval()

    def generate_fn(labels, seed: int = 0, step=None, head=None) -> torch.Tensor:
        return generate(model, labels, seed=seed, step=step, head=head, **sampling)

    return ModelBundle(
        name=Path(path).stem if path else f"mar-{config}",
        module=step,
        example_inputs=example_inputs(step),
        family="mar",
        input_names=list(STEP_INPUT_NAMES),
        output_names=list(STEP_OUTPUT_NAMES),
        calib_inputs=[],
        extra={"model": model, "tokenizer": vae, "generate": generate_fn, "group_maps": {}, "sampling": sampling,
               "head": ModelBundle(name=f"{Path(path).stem if path else 'mar'}-head", module=head,
                                   example_inputs=head_example_inputs(model), family="mar-head",
                                   input_names=list(HEAD_INPUT_NAMES), output_names=list(HEAD_OUTPUT_NAMES),
                                   extra={"dynamic_shapes": head_dynamic_shapes(),  # compiler/driver.py: compile_head
                                          "calls_per_iteration": Diffusion(sampling["num_sampling_steps"]).num_timesteps}),
               # PTQ4ARVG's MAR map: only the blocks' qkv/proj/fc1/fc2; z_proj and decoder_embed stay FP
               # (--no-default-exclude quantizes them); the head is a separate graph, FP here
               "default_exclude": ["z_proj", "decoder_embed"],
               "calib_steps": calib_iterations,  # calib/capture.py
               # batch 3 so the exporter ties the batch axis to no other size
               "export_inputs": example_inputs(step, batch=3),
               "dynamic_shapes": dynamic_shapes()},
    )


register_family(Family("mar", detect, build))
