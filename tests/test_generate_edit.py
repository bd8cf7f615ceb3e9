"""tools.generate --task inpaint|outpaint|edit: zero-shot VAR edits of real MNIST digits with the shipped
builtin:mnist-var, on the FP step and a quantized one; the edit metrics; every bad input is one error line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation import metrics
from evaluation.images import edit_scores
from evaluation.mnist import heldout_rgb
from frontends import load_model
from tools.generate import main

CENTRE = "0.25,0.25,0.75,0.75"  # 8..24 px of 32: the 4x4 centre tokens of the 8x8 grid


@pytest.fixture(scope="module")
def mnist_var():
    return load_model("builtin:mnist-var")


def _input_tokens(bundle, n):
    images = torch.from_numpy(heldout_rgb(n)[0].numpy()).permute(0, 3, 1, 2).float() / 255
    vae = bundle.extra["tokenizer"]
    per_image = [vae.img_to_idxBl(images[i:i + 1]) for i in range(n)]
    return [torch.cat(s) for s in zip(*per_image)]


def _kept_token_masks(bundle, inpainting):
    from frontends.var import edit_mask, scale_keep_masks

    pn = bundle.extra["model"].config.patch_nums
    return scale_keep_masks(edit_mask(pn, (0.25, 0.25, 0.75, 0.75), inpainting=inpainting), pn, 1)


def test_inpaint_real_digits_keeps_the_outside(tmp_path, mnist_var):
    out = tmp_path / "inp"
    # on the CPU: the checks below decode and tokenize on the CPU (a GPU's float rounding moves a pixel by 1)
    assert main(["builtin:mnist-var", "--task", "inpaint", "--images", "builtin:mnist", "--max-images", "4",
                 "--box", CENTRE, "--device", "cpu", "--out", str(out)]) == 0
    digits, own = heldout_rgb(4)
    samples = np.load(out / "samples.npz")
    edit = np.load(out / "edit.npz")
    assert samples["arr_1"].tolist() == own.tolist()  # in/outpainting records the input's own class
    assert np.array_equal(edit["inputs"], digits.numpy())
    # the kept pixels are those outside the centre box (the last scale's kept tokens, 4 px each)
    keep = np.ones((32, 32), bool)
    keep[8:24, 8:24] = False
    assert np.array_equal(edit["keep"], keep)
    # every scale: the kept tokens are the input's, the others were sampled (and differ somewhere)
    tokens, gt = torch.load(out / "tokens.pt", weights_only=True), _input_tokens(mnist_var, 4)
    changed = 0
    for t, g, k in zip(tokens, gt, _kept_token_masks(mnist_var, True)):
        k = k.expand_as(t)
        assert torch.equal(t[k], g[k])
        changed += int((t[~k] != g[~k]).sum())
    assert changed > 0
    # recon = the input's reconstruction by the tokenizer, decoded image by image
    from compiler.generation import decode_each

    assert np.array_equal(edit["recon"], decode_each(mnist_var.extra["tokenizer"], gt))
    scores = json.loads((out / "edit.json").read_text())
    assert scores["task"] == "inpaint" and scores["box"] == [0.25, 0.25, 0.75, 0.75]
    assert scores["psnr_kept_db"] == pytest.approx(metrics.masked_psnr(samples["arr_0"], edit["recon"], keep))
    # outside the box the edit stays close to the input; inside it is new
    assert scores["psnr_kept_db"] > 22 and scores["psnr_kept_db"] > scores["psnr_generated_db"] + 10
    # plain unconditional generation (same seeds) is nowhere near the input outside the box
    assert main(["builtin:mnist-var", "--classes", "-1", "--per-class", "4", "--device", "cpu",
                 "--out", str(tmp_path / "plain")]) == 0
    plain = np.load(tmp_path / "plain" / "samples.npz")["arr_0"]
    assert metrics.masked_psnr(plain, edit["recon"], keep) < scores["psnr_kept_db"] - 8


def test_classedit_and_outpaint(tmp_path, mnist_var):
    out = tmp_path / "ed"
    assert main(["builtin:mnist-var", "--task", "edit", "--classes", "0,7", "--images", "builtin:mnist",
                 "--max-images", "2", "--box", "8,8,24,24", "--batch-size", "3", "--out", str(out)]) == 0
    samples, edit = np.load(out / "samples.npz"), np.load(out / "edit.npz")
    assert samples["arr_1"].tolist() == [0, 7, 0, 7]  # every image to every class
    digits = heldout_rgb(2)[0].numpy()
    assert np.array_equal(edit["inputs"], digits[[0, 0, 1, 1]])
    tokens, gt = torch.load(out / "tokens.pt", weights_only=True), _input_tokens(mnist_var, 2)
    for t, g, k in zip(tokens, gt, _kept_token_masks(mnist_var, True)):
        k = k.expand_as(t)
        assert torch.equal(t[k], g[[0, 0, 1, 1]][k])
    scores = json.loads((out / "edit.json").read_text())
    assert 0 <= scores["class_accuracy"] <= 1 and scores["psnr_kept_db"] > 18
    # one batch of 4 gives the same images as batches of 3 + 1 (per-image seeds and tokenization)
    assert main(["builtin:mnist-var", "--task", "edit", "--classes", "0,7", "--images", "builtin:mnist",
                 "--max-images", "2", "--box", "0.25,0.25,0.75,0.75", "--out", str(tmp_path / "ed4")]) == 0
    assert np.array_equal(np.load(tmp_path / "ed4" / "samples.npz")["arr_0"], samples["arr_0"])

    out = tmp_path / "out"
    np.savez(tmp_path / "in.npz", digits, np.array([5, 5]))  # an evaluator-layout file as input
    assert main(["builtin:mnist-var", "--task", "outpaint", "--images", str(tmp_path / "in.npz"), "--box", CENTRE,
                 "--out", str(out)]) == 0
    edit = np.load(out / "edit.npz")
    assert edit["keep"].sum() == 16 * 16 and edit["keep"][8:24, 8:24].all()
    tokens, gt = torch.load(out / "tokens.pt", weights_only=True), _input_tokens(mnist_var, 2)
    for t, g, k in zip(tokens, gt, _kept_token_masks(mnist_var, False)):
        k = k.expand_as(t)
        assert torch.equal(t[k], g[k])
    assert np.load(out / "samples.npz")["arr_1"].tolist() == [5, 5]


def test_png_inputs_resume_and_changed_settings(tmp_path, capsys):
    """A folder of PNGs (grey ones too) edits like the same images from an .npz; an interrupted
    edit resumes to the same result, and a changed box is refused rather than mixed in."""
    from PIL import Image

    digits = heldout_rgb(3)[0].numpy()
    (tmp_path / "png").mkdir()
    for i, d in enumerate(digits):
        Image.fromarray(d[..., 0]).save(tmp_path / "png" / f"{i}.png")  # mode L
    np.savez(tmp_path / "in.npz", digits)
    common = ["builtin:mnist-var", "--task", "inpaint", "--box", CENTRE]
    assert main([*common, "--images", str(tmp_path / "png"), "--out", str(tmp_path / "a")]) == 0
    resumable = [*common, "--images", str(tmp_path / "in.npz"), "--batch-size", "1", "--out", str(tmp_path / "b")]
    assert main([*resumable, "--max-batches", "1"]) == 0 and not (tmp_path / "b").exists()
    capsys.readouterr()
    assert main([*resumable[:4], "0.5,0.5,1,1", *resumable[5:]]) == 2
    assert "different box" in capsys.readouterr().err
    assert main(resumable) == 0
    a, b = np.load(tmp_path / "a" / "edit.npz"), np.load(tmp_path / "b" / "edit.npz")
    assert np.array_equal(a["inputs"], digits) and np.array_equal(b["inputs"], digits)
    assert np.array_equal(a["recon"], b["recon"])
    assert np.array_equal(np.load(tmp_path / "a" / "samples.npz")["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"])
    assert np.load(tmp_path / "a" / "samples.npz")["arr_1"].tolist() == [-1, -1, -1]  # no labels given


def test_edit_with_a_quantized_step(tmp_path):
    """The fake-quant graph of a compile output runs the same edit driver: kept tokens stay the
    input's, and the sampled ones follow the quantized model (close to, not equal to FP)."""
    from tests.test_family_compile import _var
    from tools.compile import main as compile_main

    args = _var(tmp_path)
    assert compile_main([*args, "--target", "torch", "--out", str(tmp_path / "q"), "--calib-samples", "2",
                         "--calib-cache", str(tmp_path / "cache"), "--no-site-sqnr"]) == 0
    g = torch.Generator().manual_seed(3)
    images = (torch.nn.functional.interpolate(torch.rand(3, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear")
              .clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "in.npz", images)
    common = [*args, "--task", "inpaint", "--images", str(tmp_path / "in.npz"), "--box", "0.25,0,1,0.75",
              "--per-class", "4"]
    assert main([*common, "--out", str(tmp_path / "fp")]) == 0
    assert main([*common, "--quantized", str(tmp_path / "q"), "--out", str(tmp_path / "fq")]) == 0
    fp, fq = (torch.load(tmp_path / d / "tokens.pt", weights_only=True) for d in ("fp", "fq"))
    bundle = load_model(args[0], tokenizer=args[2])
    from frontends.var import edit_mask, scale_keep_masks

    pn = bundle.extra["model"].config.patch_nums
    keeps = scale_keep_masks(edit_mask(pn, (0.25, 0, 1, 0.75), inpainting=True), pn, 1)
    vae = bundle.extra["tokenizer"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    gt = [torch.cat(s).repeat_interleave(4, 0) for s in zip(*[vae.img_to_idxBl(x[i:i + 1]) for i in range(3)])]
    same = total = 0
    for a, b, g, k in zip(fp, fq, gt, keeps):
        k = k.expand_as(a)
        assert torch.equal(a[k], g[k]) and torch.equal(b[k], g[k])
        same, total = same + int((a[~k] == b[~k]).sum()), total + int((~k).sum())
    assert 0.3 < same / total < 1.0  # 186 of 192 sampled tokens agree here
    assert np.load(tmp_path / "fq" / "samples.npz")["arr_1"].tolist() == [-1] * 12
    # the quantized run edits with FP too, side by side: the same images as the FP run's
    fp_images, fq_images = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("fp", "fq"))
    side = np.load(tmp_path / "fq" / "edit.npz")
    assert np.array_equal(side["fp"], fp_images) and "fp" not in np.load(tmp_path / "fp" / "edit.npz")
    info = json.loads((tmp_path / "fq" / "edit.json").read_text())
    assert info["psnr_generated_vs_fp_db"] == pytest.approx(metrics.masked_psnr(fq_images, fp_images, ~side["keep"]))
    assert 10 < info["psnr_generated_vs_fp_db"] < 60 and 0 < info["ssim_generated_vs_fp"] < 1
    from PIL import Image

    assert Image.open(tmp_path / "fq" / "edit_grid.png").size[0] > Image.open(tmp_path / "fp" / "edit_grid.png").size[0]


def test_bad_edit_inputs(tmp_path, capsys):
    np.savez(tmp_path / "small.npz", np.zeros((2, 28, 28, 3), np.uint8))
    (tmp_path / "pngs").mkdir()
    base = ["builtin:mnist-var", "--images", "builtin:mnist", "--max-images", "2"]
    cases = {
        "needs y0 < y1": [*base, "--task", "inpaint", "--box", "0.5,0.2,0.25,0.9"],
        "must be four numbers": [*base, "--task", "inpaint", "--box", "0.1,0.2,0.3"],
        "lies outside the 32x32 images": [*base, "--task", "inpaint", "--box", "0,0,40,40"],
        "pixels must be whole numbers": [*base, "--task", "inpaint", "--box", "0,0,10.5,20"],
        "keeps every token of the 8x8 token grid": [*base, "--task", "inpaint", "--box", "0.3,0.3,0.31,0.31"],
        "regenerates every token": [*base, "--task", "outpaint", "--box", "0.3,0.3,0.31,0.31"],
        "needs --images and --box": ["builtin:mnist-var", "--task", "inpaint", "--box", CENTRE],
        "--images not found": ["builtin:mnist-var", "--task", "inpaint", "--box", CENTRE, "--images", "nope.npz"],
        "holds no .png files": ["builtin:mnist-var", "--task", "inpaint", "--box", CENTRE,
                                "--images", str(tmp_path / "pngs")],
        "VQVAE expects 32x32 images": ["builtin:mnist-var", "--task", "inpaint", "--box", CENTRE,
                                       "--images", str(tmp_path / "small.npz")],
        "--classes applies to --task edit": [*base, "--task", "inpaint", "--box", CENTRE, "--classes", "3"],
        "--task edit needs --classes": [*base, "--task", "edit", "--box", CENTRE],
        "--box needs --task": ["builtin:mnist-var", "--box", CENTRE],
        "implemented for VAR, not llamagen": ["builtin:mnist-gpt", "--task", "inpaint", "--box", CENTRE,
                                              "--images", "builtin:mnist", "--max-images", "1"],
        "--max-images must be at least 1": ["builtin:mnist-var", "--task", "inpaint", "--box", CENTRE,
                                            "--images", "builtin:mnist", "--max-images", "0"],
    }
    out = tmp_path / "o"
    for message, argv in cases.items():
        capsys.readouterr()
        assert main([*argv, "--out", str(out)]) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, (message, err)
        assert not out.exists() and not (tmp_path / "o.partial").exists(), message


def test_masked_psnr_and_edit_scores():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[:, :2] = 10      # rows 0-1 differ by 10 everywhere
    b[1, 3, 3] = 255   # one pixel of image 1, row 3, differs by 255
    top = np.zeros((4, 4), bool)
    top[:2] = True
    assert metrics.masked_psnr(a, b, top) == pytest.approx(10 * np.log10(255 ** 2 / 100))
    # bottom half: 3 channels x 1 pixel of 2 x 8 x 3 values differ by 255 -> MSE 255^2 / 16
    assert metrics.masked_psnr(a, b, ~top) == pytest.approx(10 * np.log10(16))
    assert metrics.masked_psnr(a, a, top) == float("inf")
    assert np.isnan(metrics.masked_psnr(a, b, np.zeros((4, 4), bool)))
    with pytest.raises(ValueError, match="shapes"):
        metrics.masked_psnr(a, b, np.ones((3, 4), bool))
    s = edit_scores(b, a, top)
    assert s["psnr_kept_db"] == pytest.approx(10 * np.log10(255 ** 2 / 100)) and s["class_accuracy"] is None
    # MNIST-size images with labels get the classifier's verdict: real digits are recognised
    digits, labels = heldout_rgb(20)
    d = digits.numpy()
    keep = np.ones((32, 32), bool)
    keep[8:24, 8:24] = False
    right = edit_scores(d, d, keep, labels.numpy())
    wrong = edit_scores(d, d, keep, (labels.numpy() + 1) % 10)
    assert right["class_accuracy"] >= 0.9 and wrong["class_accuracy"] <= 0.1
    assert right["psnr_kept_db"] == float("inf")
    # against FP edits: PSNR / SSIM only where regenerated (a change in the kept region does not count)
    changed = d.copy()
    changed[:, :8] = 255 - changed[:, :8]  # kept rows only
    vs_fp = edit_scores(changed, d, keep, labels.numpy(), fp=d)
    assert vs_fp["psnr_generated_vs_fp_db"] == float("inf") and vs_fp["ssim_generated_vs_fp"] < 1
    assert vs_fp["ssim_generated_vs_fp"] == pytest.approx(metrics.masked_ssim(changed, d, ~keep))
    noisy = np.clip(d.astype(int) + 8 * (np.arange(32) % 2)[:, None, None], 0, 255).astype(np.uint8)
    assert edit_scores(noisy, d, keep, fp=d)["psnr_generated_vs_fp_db"] == pytest.approx(
        metrics.masked_psnr(noisy, d, ~keep)) and 20 < metrics.masked_psnr(noisy, d, ~keep) < 40
    # MNIST-FID against the held-out statistics: 20 real digits score far below 20 blank images
    blank_fid = edit_scores(np.zeros_like(d), d, keep)["mnist_fid"]
    assert 0 < right["mnist_fid"] and 2 * right["mnist_fid"] < blank_fid
