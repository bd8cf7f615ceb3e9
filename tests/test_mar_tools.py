"""tools.generate and tools.compile on a tiny MAR + KL VAE: images per seed, the quantized step on
every runner (fake-quant torch graph, onnxruntime) stays close to FP in token space."""
import numpy as np
import pytest
import torch

from tools.compile import main as compile_main
from tools.generate import main


@pytest.fixture(scope="module")
def mar_files(tmp_path_factory):
    from frontends.kl_vae import KL_CONFIGS, AutoencoderKL
    from frontends.mar import random_mar

    tmp = tmp_path_factory.mktemp("mar")
    torch.save({"model_ema": random_mar("tiny").state_dict()}, tmp / "mar.pth")
    torch.manual_seed(0)
    torch.save({"model": AutoencoderKL(KL_CONFIGS["tiny"]).state_dict()}, tmp / "kl16.ckpt")
    return tmp


def _tokens(d):
    return torch.load(d / "tokens.pt", weights_only=True)


def test_mar_generates_images_independent_of_the_batch(tmp_path, mar_files):
    common = [str(mar_files / "mar.pth"), "--tokenizer", str(mar_files / "kl16.ckpt"), "--classes", "0,1,2,-1"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    images = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    assert images.shape == (4, 8, 8, 3) and images.std() > 0
    assert main([*common, "--batch-size", "1", "--out", str(tmp_path / "b")]) == 0
    assert torch.allclose(_tokens(tmp_path / "a"), _tokens(tmp_path / "b"), atol=1e-5)
    assert np.abs(np.load(tmp_path / "b" / "samples.npz")["arr_0"].astype(int) - images).max() <= 1


def test_quantized_mar_on_torch_graph_and_onnxruntime(tmp_path, mar_files):
    ckpt, tok = str(mar_files / "mar.pth"), str(mar_files / "kl16.ckpt")
    calib = ["--calib-samples", "2", "--calib-cache", str(tmp_path / "cache"), "--no-site-sqnr"]
    assert compile_main([ckpt, "--recipe", "ptq4arvg", "--target", "torch", "--out", str(tmp_path / "qt"), *calib]) == 0
    assert compile_main([ckpt, "--recipe", "ptq4arvg", "--out", str(tmp_path / "qo"), *calib]) == 0
    common = [ckpt, "--tokenizer", tok, "--classes", "0,1,2", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "fp")]) == 0
    assert main([*common, "--quantized", str(tmp_path / "qt"), "--out", str(tmp_path / "ft")]) == 0
    assert main([*common, "--quantized", str(tmp_path / "qo"), "--out", str(tmp_path / "fo")]) == 0
    fp, ft, fo = (_tokens(tmp_path / d).flatten(1) for d in ("fp", "ft", "fo"))
    cos = torch.nn.functional.cosine_similarity(fp, ft)
    assert (cos > 0.98).all() and not torch.equal(fp, ft)  # W8A8 moves the continuous tokens a little
    # onnxruntime runs the same quantized step: equal up to float rounding, which the 10 denoising steps of a
    # random (untrained) head amplify (a trained head predicts the noise; a random one's x0 estimate is large)
    assert (torch.nn.functional.cosine_similarity(ft, fo) > 0.9999).all()
    assert (ft - fo).abs().max() <= 1e-2 * fp.abs().max()


def test_continuous_token_fidelity_closed_form():
    from evaluation.metrics import continuous_token_fidelity

    r = continuous_token_fidelity(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    assert r["token_cosine"] == pytest.approx((2 ** -0.5 + 1) / 2, abs=1e-12)
    assert r["token_rel_mse"] == pytest.approx(1.0, abs=1e-12)  # mean (0, 1, 0, 1) over mean (1, 0, 0, 1)
    with pytest.raises(ValueError, match="shapes differ"):
        continuous_token_fidelity(torch.zeros(2, 3), torch.zeros(3, 3))


def test_evaluate_scores_continuous_tokens(tmp_path, mar_files):
    import json

    args = [str(mar_files / "mar.pth"), "--tokenizer", str(mar_files / "kl16.ckpt"), "--recipe", "minmax",
            "--calib-samples", "2", "--calib-cache", str(tmp_path / "cache"), "--no-site-sqnr",
            "--evaluate", "3", "--compare", "minmax:W6A6", "--out", str(tmp_path / "o")]
    assert compile_main(args) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "o" / "report.json").read_text())["quality"]["rows"]}
    assert "token_cosine" not in rows["FP"] and "token_agreement" not in rows["minmax W6A6"]
    w8, w6 = rows["minmax W8A8, compiled"], rows["minmax W6A6"]
    assert 0.9 < w6["token_cosine"] < w8["token_cosine"] < 1.0 and w8["token_rel_mse"] < w6["token_rel_mse"]


def test_calib_iterations_option(tmp_path, mar_files, capsys):
    import json

    from tests.test_family_compile import _rar

    common = [str(mar_files / "mar.pth"), "--recipe", "minmax", "--calib-samples", "2", "--no-site-sqnr",
              "--calib-cache", str(tmp_path / "cache")]
    reports = {}
    for it in ("last", "all"):
        assert compile_main([*common, "--calib-iterations", it, "--out", str(tmp_path / it)]) == 0
        reports[it] = json.loads((tmp_path / it / "report.json").read_text())["calibration"]
    assert reports["last"]["iterations"] == "last" and reports["all"]["iterations"] == "all"
    assert reports["last"]["batches"] == 1 and reports["all"]["batches"] == 4  # tiny: 4 iterations, one batch
    capsys.readouterr()
    assert compile_main([*_rar(tmp_path), "--calib-iterations", "all", "--out", str(tmp_path / "r")]) == 2
    assert "applies to MAR" in capsys.readouterr().err
