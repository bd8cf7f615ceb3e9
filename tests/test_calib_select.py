"""tools.compile --dgc: DGC selection over self-generated calibration (method.md §5.2) on the tiny VAR."""
import json

import pytest
import torch

import compiler.driver as driver
import tools.compile as compile_tool
from calib.capture import capture
from calib.dgc import dgc_reference
from frontends import load_model
from tests.test_family_compile import _var


@pytest.fixture(scope="module")
def var_runs(tmp_path_factory):
    """Both --dgc methods on the same 4 generations (one capture, shared cache); the rows the observers got."""
    tmp = tmp_path_factory.mktemp("dgc")
    args = _var(tmp)
    seen: dict[str, list[int]] = {}
    real_quantize = driver.quantize

    def recording_quantize(bundle, pipeline, bits, calib, **kw):
        seen[current] = [inputs[0].shape[0] for inputs in calib]  # x [B, T, C]: batch rows of every step
        return real_quantize(bundle, pipeline, bits, calib, **kw)

    reports = {}
    driver.quantize = recording_quantize
    try:
        for current in ("ranked", "reference"):
            out = tmp / current
            assert compile_tool.main([*args, "--recipe", "minmax", "--target", "torch", "--out", str(out),
                                      "--calib-samples", "4", "--calib-cache", str(tmp / "cache"),
                                      "--dgc", current]) == 0
            reports[current] = json.loads((out / "report.json").read_text())
    finally:
        driver.quantize = real_quantize
    return tmp, args, reports, seen


def test_ranked_report_matches_observed_rows(var_runs):
    _, _, reports, seen = var_runs
    cal = reports["ranked"]["calibration"]
    dgc = cal["dgc"]
    assert dgc["method"] == "ledoit-wolf" and "DGC ranked" in cal["source"]
    kept = dgc["kept_cond"] + dgc["kept_uncond"]
    assert kept == 4  # N of the 2N = 8 CFG sequences
    assert dgc["pct"] == pytest.approx(dgc["kept_cond"] / kept)
    rows = seen["ranked"]
    assert len(rows) == cal["batches"] > 0
    assert set(rows) == {kept}  # every step holds exactly the kept sequences (one generation batch of 4)
    assert cal["rows"] == sum(rows)


def test_reference_reproduces_direct_call(var_runs):
    tmp, args, reports, seen = var_runs
    bundle = load_model(args[0], tokenizer=args[2])
    classes = [(i * 37) % bundle.extra["model"].config.num_classes for i in range(4)]
    steps = capture(bundle, classes=classes, seed=0, cache_dir=tmp / "cache")  # the compile's cache: no regeneration
    feats = []
    handle = bundle.module.blocks[-1].register_forward_hook(lambda m, a, out: feats.append(out[0].float().mean(dim=1)))
    with torch.no_grad():
        bundle.module(*steps[len(steps) - 1])  # last step (scale) of the only generation batch: [0:4] cond, [4:8] uncond
    handle.remove()
    (f,) = feats
    expected = dgc_reference(f[:4], f[4:]).summary()
    got = reports["reference"]["calibration"]["dgc"]
    assert got.keys() == expected.keys() | {"kept_cond_samples", "kept_uncond_samples", "origin", "candidates", "feature"}
    assert got["origin"] == "--dgc reference" and got["candidates"] == 8
    assert [s["sample"] for s in got["kept_cond_samples"]] == list(range(got["kept_cond"]))  # the reference keeps the first
    assert [s["class"] for s in got["kept_cond_samples"]] == classes[:got["kept_cond"]]
    for key in ("method", "kept_cond", "kept_uncond", "pct", "reason"):
        assert got[key] == expected[key], key
    for key in ("rho_cond", "rho_uncond"):
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    kept = got["kept_cond"] + got["kept_uncond"]
    assert set(seen["reference"]) == {kept} and len(seen["reference"]) == len(steps)
