"""The MNIST MAR's training (``frontends.train_tiny``'s ``mar`` stage): the pieces that are not the
official code's, checked on random weights (no training runs here)."""
from __future__ import annotations

import math

import pytest
import torch

from frontends.kl_vae import KL_CONFIGS, AutoencoderKL
from frontends.mar import Diffusion
from frontends.train_tiny import diffusion_losses, mask_ratio, unit_tokens


def test_unit_tokens_rescale_is_exact():
    torch.manual_seed(0)
    vae = AutoencoderKL(KL_CONFIGS["mnist"]).eval()
    images = torch.rand(4, 3, 32, 32)
    before = vae.decode(vae.encode(images))
    s = unit_tokens(vae, images)
    tokens = vae.encode(images)
    assert tokens.shape == (4, 64, 4) and tokens.std().item() == pytest.approx(1.0, rel=1e-5) and s != 1
    assert torch.allclose(vae.decode(tokens), before, atol=1e-5)  # the decoder absorbs the factor


def test_diffusion_training_pieces():
    d = Diffusion("1000")
    t = torch.tensor([0, 10, 500, 999])
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    ac = torch.tensor([1 / d.tables["sqrt_recip_ac"][i].item() ** 2 for i in t.tolist()]).unsqueeze(-1)
    assert torch.allclose(d.q_sample(x0, t, noise), ac.sqrt() * x0 + (1 - ac).sqrt() * noise, atol=1e-6)
    assert d.at("coef1", t)[2, 0] == d.at("coef1", 500)  # per-row tables equal the scalar ones
    g = torch.Generator().manual_seed(0)
    rates = [mask_ratio(g) for _ in range(200)]
    assert min(rates) >= 0.7 and max(rates) <= 1.0 and 0.8 < sum(rates) / 200 < 0.9  # truncnorm mean 0.854

    def head(x, t, c):  # an oracle: the noise is drawn inside, recover it from x_t and x0
        sqrt_ac = 1 / d.at("sqrt_recip_ac", t)
        return (x - sqrt_ac * x0b) / (d.at("sqrt_recipm1_ac", t) * sqrt_ac), torch.zeros_like(x)

    x0b = torch.randn(64, 3)
    losses = diffusion_losses(head, d, x0b, x0b, torch.Generator().manual_seed(1))
    assert losses.shape == (64,) and math.isfinite(losses.sum().item())
    worse = diffusion_losses(lambda x, t, c: (torch.zeros_like(x), torch.zeros_like(x)), d, x0b, x0b,
                             torch.Generator().manual_seed(1))
    assert worse.mean() > losses.mean() + 0.5  # a zero prediction costs about the noise's variance
