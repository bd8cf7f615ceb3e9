"""Training of the shipped MNIST models (``frontends/embedded/``), stage by stage.

Every stage trains a tokenizer, then a class-conditional generator on its tokens, and writes
both in the official checkpoint layouts (half-precision floats; the family loaders cast back to
float32), so ``tools.compile`` / ``tools.generate`` detect them like any released checkpoint:

* ``var``: VAR's multi-scale residual VQVAE (``var_vqvae.VQVAE_CONFIGS["mnist"]``), then VAR
  (``var.CONFIGS["mnist"]``) teacher-forced over the whole token pyramid;
* ``gpt``: LlamaGen's VQ tokenizer (``vq16.VQ_CONFIGS["mnist"]``, downsampling 4, so a 32x32
  digit is 8x8 tokens), then LlamaGen's GPT (``llamagen.CONFIGS["GPT-mnist"]``), raster order;
* ``mar``: MAR's KL VAE (``kl_vae.KL_CONFIGS["mnist"]``: 8x8 tokens of 4 channels, rescaled to unit
  standard deviation), then MAR (``mar.CONFIGS["mnist"]``) with its diffusion head, on the
  official masked-token diffusion loss;
* ``mar-head``: the diffusion head of the MAR that ``mar`` wrote, alone, with extra weight on the
  epsilon MSE at ``t = 999``, where the official sampler's first step amplifies the head's error
  316-fold (``builtin:mnist-mar`` is ``mar`` then ``mar-head``; MODEL_CARD.md).

The generators drop the class to the null class with probability ``class_dropout`` (0.1, as
the official training) so CFG works. Data: the 9,000 training digits of
``mnist.train_holdout_split``, padded to 32x32 and repeated over 3 channels (the tokenizers
take RGB). Everything is seeded; on one CPU the same seed gives the same weights.

Stages are entries of ``STAGES`` (name -> function), so more can be added.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from core.io import atomic_path, atomic_torch_save, atomic_write_text
from core.progress import no_progress
from evaluation import mnist
from frontends import examples

Progress = Callable[..., Iterable]  # tqdm-like: progress(iterable, desc=..., total=...)



# ----------------------------------------------------------------------------- settings and data

@dataclass
class Phase:
    """One optimisation run: ``steps`` AdamW steps of ``batch`` images at peak ``lr``."""

    steps: int
    batch: int
    lr: float
    weight_decay: float = 0.0
    warmup: int = 100
    clip: float = 2.0


@dataclass
class Settings:
    vqvae: Phase = field(default_factory=lambda: Phase(steps=300, batch=32, lr=2e-3, warmup=30))
    var: Phase = field(default_factory=lambda: Phase(steps=500, batch=32, lr=2e-3, weight_decay=0.05, warmup=50))
    vq: Phase = field(default_factory=lambda: Phase(steps=300, batch=32, lr=2e-3, warmup=30))
    gpt: Phase = field(default_factory=lambda: Phase(steps=3000, batch=32, lr=2e-3, weight_decay=0.05, clip=1.0,
                                                     warmup=50))
    kl_vae: Phase = field(default_factory=lambda: Phase(steps=300, batch=32, lr=2e-3, warmup=30))
    mar: Phase = field(default_factory=lambda: Phase(steps=2500, batch=32, lr=1e-3, weight_decay=0.02, clip=1.0,
                                                     warmup=100))
    # stage mar-head: the head alone, on rows (``batch`` = masked tokens per step) drawn from a bank of
    # ``mar_head_bank`` batches of 64 images run through the trained transformer (MODEL_CARD.md)
    mar_head: Phase = field(default_factory=lambda: Phase(steps=3000, batch=4096, lr=1e-4, weight_decay=0.0, clip=1.0,
                                                          warmup=50))
    mar_head_bank: int = 120
    first_step_weight: float = 1000.0  # x the epsilon MSE at t = 999, the sampler's first timestep
    kl_weight: float = 1e-3  # per latent element, against the per-pixel reconstruction loss
    diffusion_batch_mul: int = 4  # official MAR: each masked token's diffusion loss at 4 timesteps
    class_dropout: float = 0.1  # official VAR / LlamaGen / MAR: labels -> null class for CFG
    beta: float = 0.25  # commitment weight, as both official quantizers
    restart_every: int = 40  # dead-code restarts (steps); off after 3/4 of the tokenizer's steps
    sample_seeds: int = 8  # columns of the samples grid


@dataclass
class TrainData:
    images: torch.Tensor  # [N, 3, 32, 32] in [0, 1]
    labels: torch.Tensor  # [N] int64
    root: Path | None = None  # where the MNIST files came from (the classifier reads its held-out digits there)


def load_train_data(root: str | Path | None = None, limit: int | None = None) -> TrainData:
    """The 9,000 training digits (``train_holdout_split``) as 32x32 RGB in [0, 1]."""
    images, labels = mnist.load_mnist(root)
    train, _ = mnist.train_holdout_split(len(images))
    train = train[:limit] if limit else train
    x = (mnist.to_unit_range(images[train]) + 1) / 2
    return TrainData(x.expand(-1, 3, -1, -1).contiguous(), labels[train], Path(root) if root else None)


def _batches(n: int, phase: Phase, g: torch.Generator):
    """Index batches of ``phase.steps`` steps, epoch after epoch of seeded permutations."""
    perm, at = torch.randperm(n, generator=g), 0
    for _ in range(phase.steps):
        if at + phase.batch > n:
            perm, at = torch.randperm(n, generator=g), 0
        yield perm[at: at + min(phase.batch, n)]
        at += phase.batch


def _optimizer(params, phase: Phase) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas of the official VAR/LlamaGen runs), linear warmup then cosine decay to 1/10."""
    opt = torch.optim.AdamW(params, lr=phase.lr, betas=(0.9, 0.95), weight_decay=phase.weight_decay)

    def factor(step: int) -> float:
        if step < phase.warmup:
            return (step + 1) / phase.warmup
        t = (step - phase.warmup) / max(phase.steps - phase.warmup, 1)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _fit(model: nn.Module, loss_fn: Callable, n: int, phase: Phase, g: torch.Generator, progress: Progress,
         desc: str, after_step: Callable | None = None) -> list[float]:
    """Train ``model`` on ``loss_fn(indices) -> loss``; returns the loss of every step."""
    model.train()
    opt, sched = _optimizer([p for p in model.parameters() if p.requires_grad], phase)
    losses = []
    bar = progress(_batches(n, phase, g), desc=desc, total=phase.steps, unit="step")
    for step, idx in enumerate(bar):
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), phase.clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if hasattr(bar, "set_postfix") and step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if after_step is not None:
            after_step(step)
    model.eval()
    return losses


class _CodeRestarts:
    """Dead-code restarts: codes no image used since the last check get a random encoder vector.

    Small codebooks on small data collapse to a few codes without it; restarts stop after 3/4 of
    the run so the last steps settle the codebook the decoder is trained against.
    """

    def __init__(self, embedding: nn.Embedding, every: int, stop: int, g: torch.Generator):
        self.embedding, self.every, self.stop, self.g = embedding, every, stop, g
        self.hits = torch.zeros(embedding.num_embeddings)
        self.latest: torch.Tensor | None = None  # encoder vectors of the last batch [M, C]

    def record(self, idx: torch.Tensor, z_NC: torch.Tensor) -> None:
        self.hits += torch.bincount(idx.flatten(), minlength=self.hits.numel()).float()
        self.latest = z_NC.detach()

    def __call__(self, step: int) -> None:
        if step == 0 or step % self.every or step >= self.stop or self.latest is None:
            return
        dead = (self.hits == 0).nonzero().flatten()
        if len(dead):
            pick = torch.randint(len(self.latest), (len(dead),), generator=self.g)
            with torch.no_grad():
                self.embedding.weight[dead] = self.latest[pick]
        self.hits.zero_()


# ----------------------------------------------------------------------------- writing

def half_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with floating tensors in float16 (the loaders cast back to float32)."""
    return {k: v.detach().half() if v.is_floating_point() else v.detach().clone() for k, v in module.state_dict().items()}


def _save_png(images: torch.Tensor, rows: int, path: Path) -> None:
    """``[rows*cols, 3, H, W]`` in [0, 1] -> a grid PNG (row r = class r), written atomically."""
    from PIL import Image

    cols = images.shape[0] // rows
    grid = images.clamp(0, 1).mul(255).round().to(torch.uint8)
    grid = F.pad(grid, (1, 1, 1, 1), value=255).unflatten(0, (rows, cols))  # r, c, 3, H+2, W+2
    grid = grid.permute(0, 3, 1, 4, 2).flatten(2, 3).flatten(0, 1)  # rows*(H+2), cols*(W+2), 3
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid.numpy()).save(tmp)


def loss_curve(losses: list[float], window: int = 20) -> list[float]:
    """Mean loss of every ``window`` steps."""
    return [round(sum(c) / len(c), 4) for c in (losses[i:i + window] for i in range(0, len(losses), window))]


def _mean_last(losses: list[float], n: int = 100) -> float:
    tail = losses[-n:]
    return round(sum(tail) / len(tail), 4)


# ----------------------------------------------------------------------------- stage "var"

def _var_init(var: nn.Module, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
    """The official ``VAR.init_weights`` defaults: trunc-normal linears, small head, AdaLN gates near 0."""
    C, depth = var.config.width, var.config.depth
    std = math.sqrt(1 / C / 3)
    with torch.no_grad():
        for m in var.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
        var.head.weight.mul_(init_head)
        var.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        var.head_nm.ada_lin[-1].bias.zero_()
        for block in var.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            ada = block.ada_lin[-1]
            ada.weight[2 * C:].mul_(init_adaln)  # scale1, scale2, shift1, shift2
            ada.weight[:2 * C].mul_(init_adaln_gamma)  # gamma1, gamma2
            ada.bias.zero_()


def vqvae_losses(vae, images: torch.Tensor, beta: float, restarts: _CodeRestarts | None = None):
    """Reconstruction and VQ losses of VAR's multi-scale quantizer (the official ``VectorQuantizer2.forward``).

    Per scale: the residual is area-resized, snapped to its nearest code, the code map is
    resized back and refined by Phi; ``mse(f_hat, sg(f))`` trains codes and Phi,
    ``beta * mse(sg(f_hat), f)`` the encoder, and the decoder sees ``f`` + sg(f_hat - f).
    Returns ``(reconstruction loss, vq loss, reconstructions)``.
    """
    q = vae.quantize
    f = vae.quant_conv(vae.encoder(images * 2 - 1))
    B, C = f.shape[:2]
    f_no_grad, f_hat, vq_loss = f.detach(), 0, 0.0
    f_rest = f_no_grad
    for si, pn in enumerate(q.patch_nums):
        z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != q.num_scales - 1 else f_rest
        z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
        idx = q.nearest_code(z_NC).reshape(B, pn * pn)
        if restarts is not None:
            restarts.record(idx, z_NC)
        with torch.no_grad():
            q.ema_vocab_hit_SV[si].mul_(0.99).add_(torch.bincount(idx.flatten(), minlength=q.embedding.num_embeddings)
                                                   .float() / idx.numel(), alpha=0.01)
        h = q.scale_residual(si, q.token_map(idx))
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        vq_loss = vq_loss + beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_no_grad)
    recon = vae.decoder(vae.post_quant_conv((f_hat.detach() - f_no_grad) + f))
    target = images * 2 - 1
    return F.mse_loss(recon, target) + F.l1_loss(recon, target), vq_loss / q.num_scales, recon


def _train_tokenizer(model, losses, data: TrainData, settings: Settings, phase: Phase, g: torch.Generator,
                     progress: Progress, desc: str):
    """Reconstruction + VQ loss steps with dead-code restarts; ``losses(model, images, beta, restarts)``."""
    restarts = _CodeRestarts(model.quantize.embedding, settings.restart_every, phase.steps * 3 // 4, g)
    recon_losses = []

    def loss_fn(idx):
        rec, vq, _ = losses(model, data.images[idx], settings.beta, restarts)
        recon_losses.append(rec.item())
        return rec + vq

    step_losses = _fit(model, loss_fn, len(data.images), phase, g, progress, desc, restarts)
    return model.eval(), {"loss": _mean_last(step_losses), "recon_loss": _mean_last(recon_losses), "losses": step_losses}


def train_vqvae(data: TrainData, settings: Settings, g: torch.Generator, progress: Progress = no_progress):
    from frontends.var_vqvae import VQVAE, VQVAE_CONFIGS

    return _train_tokenizer(VQVAE(VQVAE_CONFIGS["mnist"]), vqvae_losses, data, settings, settings.vqvae, g,
                            progress, "var: VQVAE")


@torch.no_grad()
def var_inputs(vae, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Token pyramid (scales concatenated, ``[N, L]``) and teacher-forcing input ``[N, L - 1, Cvae]`` of every image."""
    tokens, inputs = [], []
    for chunk in images.split(batch):
        idx_Bl = vae.img_to_idxBl(chunk)
        tokens.append(torch.cat(idx_Bl, dim=1))
        inputs.append(vae.idxBl_to_var_input(idx_Bl))
    return torch.cat(tokens), torch.cat(inputs)


def drop_labels(labels: torch.Tensor, num_classes: int, p: float, g: torch.Generator) -> torch.Tensor:
    """Labels with probability ``p`` replaced by the null class ``num_classes`` (CFG training)."""
    return torch.where(torch.rand(labels.shape, generator=g) < p, num_classes, labels)


def train_var(tokens: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, settings: Settings,
              g: torch.Generator, progress: Progress = no_progress):
    from frontends.var import CONFIGS, VAR

    var = VAR(CONFIGS["mnist"])
    _var_init(var)
    nc = var.config.num_classes

    def loss_fn(idx):
        logits = var(drop_labels(labels[idx], nc, settings.class_dropout, g), inputs[idx])
        return F.cross_entropy(logits.flatten(0, 1), tokens[idx].flatten())

    losses = _fit(var, loss_fn, len(tokens), settings.var, g, progress, "var: VAR")
    return var.eval(), {"loss": _mean_last(losses), "losses": losses}


def stage_var(data: TrainData, out: Path, settings: Settings, seed: int, progress: Progress = no_progress) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    vae, vae_log = train_vqvae(data, settings, g, progress)
    t1 = time.perf_counter()
    tokens, inputs = var_inputs(vae, data.images)
    var, var_log = train_var(tokens, inputs, data.labels, settings, g, progress)
    t2, c2 = time.perf_counter(), time.process_time()
    model_file, tokenizer_file = examples.EMBEDDED["mnist-var"]
    atomic_torch_save(half_state_dict(vae), out / tokenizer_file)
    atomic_torch_save(half_state_dict(var), out / model_file)
    return {"tokenizer": vae_log, "generator": var_log,
            "seconds": {"tokenizer": round(t1 - t0, 1), "generator": round(t2 - t1, 1)},
            "cpu_seconds": round(c2 - c0, 1)}


# ----------------------------------------------------------------------------- stage "gpt"

def vq_losses(vq, images: torch.Tensor, beta: float, restarts: _CodeRestarts | None = None):
    """Reconstruction and VQ losses of LlamaGen's quantizer (l2-normalised codes, ``VectorQuantizer.forward``)."""
    z = F.normalize(vq.quant_conv(vq.encoder(images * 2 - 1)), dim=1)  # B, d, h, w
    B, d, h, w = z.shape
    z_Nd = z.permute(0, 2, 3, 1).reshape(-1, d)
    codebook = vq.quantize.codebook()
    idx = (z_Nd @ codebook.T).argmax(-1)
    if restarts is not None:
        restarts.record(idx, z_Nd)
    zq = codebook[idx].view(B, h, w, d).permute(0, 3, 1, 2)
    vq_loss = F.mse_loss(zq, z.detach()) + beta * F.mse_loss(zq.detach(), z)
    recon = vq.decoder(vq.post_quant_conv(z + (zq - z).detach()))
    target = images * 2 - 1
    return F.mse_loss(recon, target) + F.l1_loss(recon, target), vq_loss, recon


def train_vq(data: TrainData, settings: Settings, g: torch.Generator, progress: Progress = no_progress):
    from frontends import vq16

    return _train_tokenizer(vq16.VQModel(vq16.VQ_CONFIGS["mnist"]), vq_losses, data, settings, settings.vq, g,
                            progress, "gpt: VQ")


def _gpt_init(gpt: nn.Module) -> None:
    """The official ``initialize_weights``: normal(0.02) linears and embeddings, zero output layer."""
    with torch.no_grad():
        for m in gpt.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0, 0.02)
        gpt.output.weight.zero_()


def train_gpt(tokens: torch.Tensor, labels: torch.Tensor, settings: Settings, g: torch.Generator,
              progress: Progress = no_progress):
    from frontends.llamagen import CONFIGS, Transformer

    gpt = Transformer(CONFIGS["GPT-mnist"])
    _gpt_init(gpt)
    nc = gpt.config.num_classes

    def loss_fn(idx):
        logits = gpt.teacher_forcing(tokens[idx], drop_labels(labels[idx], nc, settings.class_dropout, g))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[idx].flatten())

    losses = _fit(gpt, loss_fn, len(tokens), settings.gpt, g, progress, "gpt: GPT")
    return gpt.eval(), {"loss": _mean_last(losses), "losses": losses}


def stage_gpt(data: TrainData, out: Path, settings: Settings, seed: int, progress: Progress = no_progress) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    vq, vq_log = train_vq(data, settings, g, progress)
    t1 = time.perf_counter()
    with torch.no_grad():
        tokens = torch.cat([vq.encode(chunk) for chunk in data.images.split(500)])
    gpt, gpt_log = train_gpt(tokens, data.labels, settings, g, progress)
    t2, c2 = time.perf_counter(), time.process_time()
    model_file, tokenizer_file = examples.EMBEDDED["mnist-gpt"]
    atomic_torch_save({"model": half_state_dict(vq)}, out / tokenizer_file)  # official layout: weights under "model"
    atomic_torch_save({"model": half_state_dict(gpt)}, out / model_file)
    return {"tokenizer": vq_log, "generator": gpt_log,
            "seconds": {"tokenizer": round(t1 - t0, 1), "generator": round(t2 - t1, 1)},
            "cpu_seconds": round(c2 - c0, 1)}


# ----------------------------------------------------------------------------- stage "mar"

def kl_vae_losses(vae, images: torch.Tensor, kl_weight: float):
    """Reconstruction (L2 + L1) of a posterior sample and ``kl_weight`` x the KL to N(0, I) per latent
    element (LDM's ``AutoencoderKL`` objective without its perceptual and GAN terms)."""
    mean, log_var = vae.quant_conv(vae.encoder(images * 2 - 1)).chunk(2, dim=1)
    log_var = log_var.clamp(-30.0, 20.0)  # DiagonalGaussianDistribution
    z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
    recon = vae.decoder(vae.post_quant_conv(z))
    target = images * 2 - 1
    kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).mean()
    return F.mse_loss(recon, target) + F.l1_loss(recon, target), kl_weight * kl


@torch.no_grad()
def kl_tokens(vae, images: torch.Tensor) -> torch.Tensor:
    """MAR's tokens of ``images`` (the KL VAE's scaled posterior means), encoded 500 images at a time."""
    return torch.cat([vae.encode(chunk) for chunk in images.split(500)])


@torch.no_grad()
def unit_tokens(vae, images: torch.Tensor) -> float:
    """Rescale the latent space so MAR's tokens (posterior mean x ``LATENT_SCALE``) have unit standard
    deviation on ``images``, as the official 0.2325 does for KL-16: the encoder's mean and
    log-variance rows and the decoder's input columns absorb the factor exactly. Returns it."""
    tokens = kl_tokens(vae, images)
    s = 1.0 / tokens.std().item()
    c = vae.config.embed_dim
    vae.quant_conv.weight[:c].mul_(s)
    vae.quant_conv.bias[:c].mul_(s)
    vae.quant_conv.bias[c:].add_(2 * math.log(s))
    vae.post_quant_conv.weight.div_(s)
    return s


def train_kl_vae(data: TrainData, settings: Settings, g: torch.Generator, progress: Progress = no_progress):
    from frontends.kl_vae import KL_CONFIGS, AutoencoderKL

    vae = AutoencoderKL(KL_CONFIGS["mnist"])
    recon_losses = []

    def loss_fn(idx):
        rec, kl = kl_vae_losses(vae, data.images[idx], settings.kl_weight)
        recon_losses.append(rec.item())
        return rec + kl

    losses = _fit(vae, loss_fn, len(data.images), settings.kl_vae, g, progress, "mar: KL VAE")
    scale = unit_tokens(vae, data.images)
    return vae.eval(), {"loss": _mean_last(losses), "recon_loss": _mean_last(recon_losses), "losses": losses,
                        "latent_rescale": round(scale, 4)}


def diffusion_losses(head, diffusion, x0: torch.Tensor, z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-row loss of the official ``DiffLoss`` (``GaussianDiffusion.training_losses``, learned-range
    variance): epsilon MSE plus the variational bound term with the mean held fixed (in bits), at a
    uniform timestep of the 1000. At ``t = 0`` the bound's decoder term is the Gaussian NLL of ``x0``
    (the official code takes the discretised-pixel likelihood there)."""
    t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = diffusion.q_sample(x0, t, noise)
    eps, var = head(x_t, t, z)
    mse = (noise - eps).pow(2).mean(-1)
    mean, log_var = diffusion.p_mean_log_var(eps.detach(), var, x_t, t)
    true_mean = diffusion.at("coef1", t) * x0 + diffusion.at("coef2", t) * x_t
    true_log_var = diffusion.at("min_log", t)
    kl = 0.5 * (-1 + log_var - true_log_var + (true_log_var - log_var).exp() + (true_mean - mean).pow(2) * (-log_var).exp())
    nll = 0.5 * (math.log(2 * math.pi) + log_var + (x0 - mean).pow(2) * (-log_var).exp())
    vb = torch.where((t == 0).unsqueeze(-1), nll, kl).mean(-1) / math.log(2.0)
    return mse + vb


def mask_ratio(g: torch.Generator, low: float = 0.7) -> float:
    """The official masking rate: a normal(1, 0.25) truncated to ``[0.7, 1]`` (``stats.truncnorm``)."""
    while True:
        r = 1.0 + 0.25 * torch.randn((), generator=g).item()
        if low <= r <= 1.0:
            return r


def train_mar(tokens: torch.Tensor, labels: torch.Tensor, settings: Settings, g: torch.Generator,
              progress: Progress = no_progress):
    """The official ``MAR.forward`` loss: a random order, ``ceil(L * rate)`` tokens masked, the diffusion
    loss on the masked ones, each repeated ``diffusion_batch_mul`` times (4, official)."""
    from frontends.mar import CONFIGS, MAR, Diffusion, DiffusionHead

    mar = MAR(CONFIGS["mnist"])
    _mar_init(mar)
    head = DiffusionHead(mar.diffloss.net)
    diffusion = Diffusion("1000")
    c, mul = mar.config, settings.diffusion_batch_mul

    def loss_fn(idx):
        x = tokens[idx]
        b = len(idx)
        order = torch.argsort(torch.rand(b, c.seq_len, generator=g), dim=1)
        n = math.ceil(c.seq_len * mask_ratio(g))
        mask = torch.zeros(b, c.seq_len).scatter(1, order[:, :n], 1.0)
        z = mar(x, mask, drop_labels(labels[idx], c.num_classes, settings.class_dropout, g))
        rows = mask.flatten().bool()
        target, cond = x.flatten(0, 1)[rows].repeat(mul, 1), z.flatten(0, 1)[rows].repeat(mul, 1)
        return diffusion_losses(head, diffusion, target, cond, g).mean()

    losses = _fit(mar, loss_fn, len(tokens), settings.mar, g, progress, "mar: MAR")
    return mar.eval(), {"loss": _mean_last(losses), "losses": losses}


def _mar_init(mar: nn.Module) -> None:
    """The official ``initialize_weights``: normal(0.02) embeddings, mask token and position embeddings,
    xavier-uniform linears with zero bias, unit LayerNorms; the head's (``SimpleMLPAdaLN``) time
    embedder normal(0.02), adaLN modulations and output layer zero."""
    with torch.no_grad():
        for p in (*mar.parameters(recurse=False), mar.class_emb.weight):
            nn.init.normal_(p, std=0.02)
        for m in mar.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        net = mar.diffloss.net
        for layer in (net.time_embed.mlp[0], net.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in net.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (net.final_layer.adaLN_modulation[-1], net.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


def head_bank(mar, tokens: torch.Tensor, labels: torch.Tensor, settings: Settings, g: torch.Generator):
    """``(x0 [N, C], z [N, D])``: the masked tokens of ``mar_head_bank`` batches of 64 training images
    (the official masking and label drop) and the trained transformer's outputs for them."""
    c = mar.config
    xs, zs = [], []
    with torch.no_grad():
        for idx in _batches(len(tokens), Phase(steps=settings.mar_head_bank, batch=64, lr=0.0), g):
            x, b = tokens[idx], len(idx)
            order = torch.argsort(torch.rand(b, c.seq_len, generator=g), dim=1)
            n = math.ceil(c.seq_len * mask_ratio(g))
            mask = torch.zeros(b, c.seq_len).scatter(1, order[:, :n], 1.0)
            z = mar(x, mask, drop_labels(labels[idx], c.num_classes, settings.class_dropout, g))
            rows = mask.flatten().bool()
            xs.append(x.flatten(0, 1)[rows])
            zs.append(z.flatten(0, 1)[rows])
    return torch.cat(xs), torch.cat(zs)


def first_step_mse(head, diffusion, x0: torch.Tensor, z: torch.Tensor, g: torch.Generator, t: int = 999) -> torch.Tensor:
    """The head's epsilon MSE at timestep ``t`` (default the last, where the sampler starts)."""
    steps = torch.full((len(x0),), t, dtype=torch.long)
    noise = torch.randn(x0.shape, generator=g)
    eps, _ = head(diffusion.q_sample(x0, steps, noise), steps, z)
    return (eps - noise).pow(2).mean()


def train_mar_head(mar, tokens: torch.Tensor, labels: torch.Tensor, settings: Settings, g: torch.Generator,
                   progress: Progress = no_progress) -> dict:
    """The diffusion head alone, transformer frozen: the official loss at uniform timesteps plus
    ``first_step_weight`` x the epsilon MSE at ``t = 999`` on the same rows (fresh noise). At
    ``t = 999`` the cosine schedule's ``alpha_bar`` is 2.4e-9 and the sampler's first step multiplies
    the head's epsilon error by 316 (100 steps): the head must predict ``eps = x_t`` to about 1e-3
    there. A training choice; the sampler stays the official one."""
    from frontends.mar import Diffusion, DiffusionHead

    head = DiffusionHead(mar.diffloss.net)
    for p in head.parameters():
        p.requires_grad_(True)
    diffusion = Diffusion("1000")
    x0, z = head_bank(mar, tokens, labels, settings, g)
    held = torch.randperm(len(x0), generator=g)
    hx, hz, x0, z = x0[held[:4096]], z[held[:4096]], x0[held[4096:]], z[held[4096:]]

    def held_out() -> dict:
        with torch.no_grad():
            return {str(t): float(f"{first_step_mse(head, diffusion, hx, hz, torch.Generator().manual_seed(5), t).item():.3g}")
                    for t in (999, 989, 500)}

    before = held_out()
    first = []

    def loss_fn(idx):
        rows_x, rows_z = x0[idx], z[idx]
        mse = first_step_mse(head, diffusion, rows_x, rows_z, g)
        first.append(mse.item())
        return diffusion_losses(head, diffusion, rows_x, rows_z, g).mean() + settings.first_step_weight * mse

    losses = _fit(head, loss_fn, len(x0), settings.mar_head, g, progress, "mar-head: diffusion head")
    for p in head.parameters():
        p.requires_grad_(False)
    tail = first[-100:]
    return {"loss": _mean_last(losses), "losses": losses, "first_step_mse": float(f"{sum(tail) / len(tail):.3g}"),
            "bank_rows": len(x0),
            "held_out_eps_mse": {"before": before, "after": held_out()}}


def mar_state_dict(mar: nn.Module) -> dict[str, torch.Tensor]:
    """``half_state_dict`` but the diffusion head in float32: its first sampling step needs its
    epsilon to about 1e-3, which float16 weights (1e-3 relative steps) would not keep."""
    full = {k: v.detach().clone() for k, v in mar.state_dict().items()}
    return {k: v if k.startswith("diffloss.") else (v.half() if v.is_floating_point() else v) for k, v in full.items()}


def stage_mar_head(data: TrainData, out: Path, settings: Settings, seed: int, progress: Progress = no_progress) -> dict:
    """The head phase on the MAR that stage ``mar`` wrote into ``out`` (rewritten in place)."""
    from frontends.generic import load_checkpoint
    from frontends.kl_vae import load_vae
    from frontends.mar import CONFIGS, load_mar, unwrap_state_dict

    model_file, tokenizer_file = STAGE_FILES["mar"]
    if not (out / model_file).is_file() or not (out / tokenizer_file).is_file():
        raise UserError(f"stage mar-head fine-tunes the MAR of stage mar: {out / model_file} and {out / tokenizer_file} "
                        f"not found (run --only mar mar-head)")
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    t0, c0 = time.perf_counter(), time.process_time()
    weights = unwrap_state_dict(load_checkpoint(out / model_file))
    mar = load_mar({k: v.float() for k, v in weights.items()}, CONFIGS["mnist"]).eval()
    vae = load_vae(out / tokenizer_file, mar.config).eval()
    tokens = kl_tokens(vae, data.images)
    log = train_mar_head(mar, tokens, data.labels, settings, g, progress)
    atomic_torch_save(mar_state_dict(mar), out / model_file)
    return {"head": log, "seconds": {"head": round(time.perf_counter() - t0, 1)},
            "cpu_seconds": round(time.process_time() - c0, 1)}


def stage_mar(data: TrainData, out: Path, settings: Settings, seed: int, progress: Progress = no_progress) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    vae, vae_log = train_kl_vae(data, settings, g, progress)
    t1 = time.perf_counter()
    tokens = kl_tokens(vae, data.images)
    mar, mar_log = train_mar(tokens, data.labels, settings, g, progress)
    t2, c2 = time.perf_counter(), time.process_time()
    model_file, tokenizer_file = STAGE_FILES["mar"]
    atomic_torch_save({"model": half_state_dict(vae)}, out / tokenizer_file)  # kl16.ckpt's layout
    atomic_torch_save(half_state_dict(mar), out / model_file)  # a plain state_dict, as the safetensors release
    return {"tokenizer": vae_log, "generator": mar_log,
            "seconds": {"tokenizer": round(t1 - t0, 1), "generator": round(t2 - t1, 1)},
            "cpu_seconds": round(c2 - c0, 1)}


# ----------------------------------------------------------------------------- driver

def stage_classifier(data: TrainData, out: Path, settings: Settings, seed: int, progress: Progress = no_progress) -> dict:
    """The MNIST classifier behind MNIST-FID and class accuracy (``evaluation.mnist_classifier``)."""
    from evaluation.mnist_classifier import build_embedded

    t0 = time.perf_counter()
    log = build_embedded(out, seed=seed, progress=progress, data_root=data.root)
    return {**log, "seconds": round(time.perf_counter() - t0, 1)}


STAGES: dict[str, Callable[..., dict]] = {"var": stage_var, "gpt": stage_gpt, "mar": stage_mar,
                                          "mar-head": stage_mar_head, "classifier": stage_classifier}
# Stages run without --only. ``mar-head`` fine-tunes the head of the MAR that ``mar`` wrote
# (frontends/embedded/MODEL_CARD.md, "MAR").
DEFAULT_STAGES = ("var", "gpt", "mar", "mar-head", "classifier")
# model and tokenizer files of each generator stage (the shipped ones are examples.EMBEDDED's)
STAGE_FILES = {"var": examples.EMBEDDED["mnist-var"], "gpt": examples.EMBEDDED["mnist-gpt"],
               "mar": examples.EMBEDDED["mnist-mar"], "mar-head": examples.EMBEDDED["mnist-mar"]}


def written_files(stage: str) -> tuple[str, ...]:
    """What a stage writes into ``out``: model, tokenizer, samples grid, training log (the classifier: weights, FID reference)."""
    if stage == "classifier":
        return ("mnist_classifier.pt", "mnist_fid_ref.npz")
    tag = stage.replace("-", "_")
    return (*STAGE_FILES[stage], f"samples_{tag}.png", f"train_{tag}.json")


def sample_grid(stage: str, out: Path, seeds: int) -> torch.Tensor:
    """Images ``[10 * seeds, 3, 32, 32]`` of the written checkpoints (row = class) with the family's default sampler."""
    from frontends.generic import load_model

    model_file, tokenizer_file = STAGE_FILES[stage]
    bundle = load_model(str(out / model_file), tokenizer=str(out / tokenizer_file))
    labels = torch.arange(10).repeat_interleave(seeds)
    with torch.no_grad():
        return bundle.extra["tokenizer"].decode(bundle.extra["generate"](labels, 0))


def run(out: str | Path, *, data_root: str | Path | None = None, seed: int = 0, only: list[str] | None = None,
        settings: Settings | None = None, limit: int | None = None, progress: Progress = no_progress) -> dict:
    """Train the ``only`` stages (default: ``DEFAULT_STAGES``) into ``out``; returns the log also written to ``train_<stage>.json``.

    The data is read before anything is written, so a bad ``data_root`` leaves ``out`` untouched.
    """
    stages = list(DEFAULT_STAGES) if not only else list(dict.fromkeys(only))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    settings = settings or Settings()
    data = load_train_data(data_root, limit)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    logs = {}
    for name in stages:
        log = STAGES[name](data, out, settings, seed, progress)
        logs[name] = log
        if name not in STAGE_FILES:  # the classifier: its files and accuracy are its log
            continue
        _save_png(sample_grid(name, out, settings.sample_seeds), 10, out / written_files(name)[2])
        for part in ("tokenizer", "generator", "head"):  # the curve, not every step, goes to the log
            if part in log:
                log[part]["loss_curve"] = loss_curve(log[part].pop("losses"))
        log.update(stage=name, seed=seed, train_images=len(data.images), settings=asdict(settings),
                   torch=torch.__version__, threads=torch.get_num_threads())
        path = out / written_files(name)[3]
        atomic_write_text(path, json.dumps(log, indent=1) + "\n")
    return logs
