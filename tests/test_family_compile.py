"""tools.compile on every family's checkpoint: detection, self-generated calibration, every recipe,
TensorRT-legal ONNX that onnxruntime runs like the torch fake-quant graph."""
import json

import pytest
import torch

from tools.compile import main


def _var(tmp):
    from frontends.var import CONFIGS, VAR
    from frontends.var_vqvae import VQVAE, VQVAE_CONFIGS

    torch.manual_seed(0)
    torch.save(VAR(CONFIGS["tiny"]).state_dict(), tmp / "var.pth")
    torch.save(VQVAE(VQVAE_CONFIGS["tiny"]).state_dict(), tmp / "vae.pth")
    return [str(tmp / "var.pth"), "--tokenizer", str(tmp / "vae.pth")]


def _llamagen(tmp, par=False):
    from frontends.llamagen import CONFIGS, Transformer
    from frontends.par import PAR_CONFIGS, PARTransformer
    from tests.test_frontend_llamagen import random_model

    model = random_model(PARTransformer, PAR_CONFIGS["tiny"]) if par else random_model(Transformer, CONFIGS["tiny"])
    path = tmp / ("par.pt" if par else "gpt.pt")
    torch.save({"model": model.state_dict()}, path)
    return [str(path)]


def _rar(tmp):
    from frontends.rar import random_rar

    torch.save(random_rar("tiny").state_dict(), tmp / "rar.bin")
    return [str(tmp / "rar.bin")]


def _mar(tmp):
    from frontends.mar import random_mar

    torch.save({"model_ema": random_mar("tiny").state_dict()}, tmp / "mar.pth")  # main_mar.py's checkpoint layout
    return [str(tmp / "mar.pth")]


FAMILIES = {"var": _var, "llamagen": _llamagen, "par": lambda t: _llamagen(t, par=True), "rar": _rar, "mar": _mar}



def compile_family(tmp_path, family: str, recipe: str) -> dict:
    """``tools.compile`` of the family's tiny checkpoint with ``recipe`` (2 calibration images); its report."""
    args = FAMILIES[family](tmp_path)
    out = tmp_path / "out"
    rc = main([*args, "--recipe", recipe, "--out", str(out), "--calib-samples", "2",
               "--calib-cache", str(tmp_path / "cache")])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("recipe", ["ptq4arvg", "smoothquant", "minmax"])
def test_family_compiles_to_legal_onnx(tmp_path, family, recipe):
    r = compile_family(tmp_path, family, recipe)
    assert r["family"] == family  # detected from the checkpoint's keys
    assert "self-generated" in r["calibration"]["source"] and r["calibration"]["batches"] > 0
    assert r["onnx"]["tensorrt_lint"]["ok"], r["onnx"]["tensorrt_lint"]["violations"]
    # onnxruntime equals torch, except where a CPU's float rounding moves a value across a quantizer's
    # rounding boundary (seen on an AVX-512 CPU): one code's change then reaches a few outputs, while a wrong
    # export (a scale, a zero point, a missing node) drops the SQNR far below 50 dB.
    o = r["onnx"]
    assert o["ort_reference_max_abs_diff"] <= 1e-4 or o["ort_reference_sqnr_db"] >= 50, o
    assert sum(r["onnx"]["tensorrt_lint"]["int8_gemms"].values()) >= 8
    assert r["fidelity"]["min_sqnr_db"] > 10
    if recipe == "ptq4arvg":
        granularity = {k: v["granularity"] for k, v in r["qparams"].items()}
        assert "group" in granularity.values()  # STWQ took the family's token groups
        applied = {p["name"] for p in r["passes"] if p.get("modified") or p["name"] in ("gps", "smooth")}
        assert {"gps", "smooth", "insert-qdq"} <= applied


def test_calibration_cache_resumes(tmp_path):
    args = _var(tmp_path)
    common = [*args, "--recipe", "minmax", "--calib-samples", "2", "--calib-cache", str(tmp_path / "cache")]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    cached = sorted((tmp_path / "cache").rglob("*.pt"))
    assert cached
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    assert main([*common, "--out", str(tmp_path / "b")]) == 0  # second run reads, does not regenerate
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    a = json.loads((tmp_path / "a" / "report.json").read_text())["qparams"]
    b = json.loads((tmp_path / "b" / "report.json").read_text())["qparams"]
    assert a == b


def test_unknown_checkpoint_names_the_problem(tmp_path, capsys):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "x.pt")
    assert main([str(tmp_path / "x.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "matches no known family" in capsys.readouterr().err
