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


# ----------------------------------------------------------------------------- builtin:mnist-mar (the shipped weights)

@pytest.fixture(scope="module")
def mnist_mar():
    from frontends.generic import load_model

    return load_model("builtin:mnist-mar")


@pytest.fixture(scope="module")
def digit_tokens(mnist_mar):
    from evaluation import mnist

    images, labels = mnist.heldout_rgb(limit=6)  # uint8 [N, 32, 32, 3]
    return mnist_mar.extra["tokenizer"].encode(images.permute(0, 3, 1, 2).float() / 255), labels


def test_builtin_mnist_mar_loads_strictly(mnist_mar):
    from frontends import examples, families
    from frontends.generic import load_checkpoint

    model_file, tokenizer_file = examples.EMBEDDED["mnist-mar"]
    stored = load_checkpoint(examples.EMBEDDED_DIR / model_file)
    assert families.detect(stored) == ("mar", "mnist") and mnist_mar.family == "mar"
    # the transformer stored in float16, the diffusion head in float32 (its first sampling step needs it)
    assert {v.dtype for k, v in stored.items() if not k.startswith("diffloss.")} == {torch.float16}
    assert {v.dtype for k, v in stored.items() if k.startswith("diffloss.")} == {torch.float32}
    model = mnist_mar.extra["model"]
    loaded = model.state_dict()
    assert loaded.keys() == stored.keys() and {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(loaded[k], v.float()) for k, v in stored.items())
    assert sum(p.numel() for p in model.parameters()) == 476_936  # 258,056 of them the diffusion head
    assert mnist_mar.extra["sampling"] == {"num_iter": 16, "cfg": 3.0, "cfg_schedule": "linear", "temperature": 1.0,
                                           "num_sampling_steps": "100"}


@pytest.mark.parametrize("n_masked", [64, 29, 1])
def test_builtin_mnist_mar_step_equals_the_reference_forward(mnist_mar, digit_tokens, n_masked):
    from frontends.mar import CONFIGS, MARStep, step_inputs

    c, model = CONFIGS["mnist"], mnist_mar.extra["model"]
    tokens, labels = digit_tokens
    g = torch.Generator().manual_seed(n_masked)
    order = torch.stack([torch.randperm(c.seq_len, generator=g) for _ in range(len(tokens))])
    mask = torch.zeros(len(tokens), c.seq_len).scatter(1, order[:, :n_masked], 1.0)
    tokens = tokens * (1 - mask).unsqueeze(-1)
    condition = labels.masked_fill(torch.arange(len(labels)) % 3 == 2, c.num_classes)  # some null-class rows
    with torch.no_grad():
        ref = model(tokens, mask, condition)
        z = MARStep(model)(*step_inputs(c, tokens, condition, order, n_masked))
    raster = torch.empty_like(z).scatter_(1, order.unsqueeze(-1).expand_as(z), z)
    assert (raster - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_builtin_mnist_mar_head_first_step_and_samples(mnist_mar, digit_tokens):
    """What the head phase (stage mar-head) trained for: epsilon at t = 999 to about 1e-3, so the
    official sampler's first step (x316) stays bounded and the samples are digits of their class."""
    from evaluation import mnist_classifier
    from frontends.mar import CONFIGS, Diffusion, DiffusionHead

    c, model = CONFIGS["mnist"], mnist_mar.extra["model"]
    tokens, labels = digit_tokens
    head = DiffusionHead(model.diffloss.net).eval()
    mask = torch.ones(len(tokens), c.seq_len)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = model(tokens, mask, labels).flatten(0, 1)
        x0 = tokens.flatten(0, 1)
        t = torch.full((len(x0),), 999)
        noise = torch.randn(x0.shape, generator=g)
        eps, _ = head(Diffusion("1000").q_sample(x0, t, noise), t, z)
        assert (eps - noise).pow(2).mean() < 2e-5
        classes = torch.arange(10)
        latents = mnist_mar.extra["generate"](classes, 0)
        images = mnist_mar.extra["tokenizer"].decode(latents)
    # the data's tokens: std 1; at CFG 3 about 3 tokens in 100 images still run away (MODEL_CARD.md)
    assert (latents.abs() > 10).sum() <= 1 and 0.7 < latents.clamp(-10, 10).std() < 1.3
    _, probs = mnist_classifier.predict(mnist_classifier.load_classifier(), images.mean(1, keepdim=True) * 2 - 1)
    assert (probs.argmax(-1) == classes).float().mean() >= 0.7


def test_builtin_mnist_mar_compiles_with_the_head_and_evaluates(tmp_path):
    """Both graphs to ONNX (lint, onnxruntime parity) and the continuous-token fidelity of a few images,
    with the transformer-only recipe as a comparison row."""
    import json

    from tools.compile import main as compile_main

    args = ["builtin:mnist-mar", "--recipe", "ptq4arvg-head", "--target", "onnx", "--calib-samples", "2",
            "--calib-cache", str(tmp_path / "cache"), "--no-site-sqnr", "--evaluate", "2",
            "--compare", "ptq4arvg:W8A8", "--out", str(tmp_path / "o")]
    assert compile_main(args) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    for section in (report["onnx"], report["head"]["onnx"]):
        assert section["tensorrt_lint"]["ok"]
        assert section["ort_reference_max_abs_diff"] <= 1e-4 or section["ort_reference_sqnr_db"] >= 50, section
    assert report["fidelity"]["min_sqnr_db"] > 35 and report["head"]["fidelity"]["min_sqnr_db"] > 15  # W8A8 steps
    assert report["head"]["fp_steps"] == 2
    rows = {r["name"]: r for r in report["quality"]["rows"]}
    assert rows["FP"]["class_accuracy"] == 1.0
    # two images: the head quantized (its first two steps FP) costs about what the transformer's W8A8 costs
    for name in ("ptq4arvg-head W8A8, compiled", "ptq4arvg W8A8"):
        assert rows[name]["token_cosine"] > 0.95 and rows[name]["psnr_db"] > 18 and rows[name]["class_accuracy"] == 1.0


def test_head_phase_lowers_the_first_step_error(tmp_path):
    """Stage mar-head's loss on a freshly initialised MNIST MAR (zero head output: epsilon MSE 1 at t = 999)."""
    from core.errors import UserError
    from frontends import train_tiny
    from frontends.mar import CONFIGS, MAR

    torch.manual_seed(0)
    mar = MAR(CONFIGS["mnist"])
    train_tiny._mar_init(mar)
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randn(128, 64, 4, generator=g), torch.randint(0, 10, (128,), generator=g)
    settings = train_tiny.Settings(mar_head=train_tiny.Phase(steps=40, batch=256, lr=3e-3, warmup=1), mar_head_bank=2)
    before = [p.detach().clone() for p in mar.parameters()]
    log = train_tiny.train_mar_head(mar.eval(), tokens, labels, settings, g)
    held = log["held_out_eps_mse"]
    assert held["before"]["999"] == pytest.approx(1.0, abs=0.1) and held["after"]["999"] < 0.2
    changed = [not torch.equal(b, p) for b, p in zip(before, mar.parameters())]
    names = [n for n, _ in mar.named_parameters()]
    assert all(c == n.startswith("diffloss.") for c, n in zip(changed, names))  # the transformer stays frozen
    with pytest.raises(UserError, match="run --only mar mar-head"):
        train_tiny.stage_mar_head(train_tiny.TrainData(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)),
                                  tmp_path, settings, 0)
