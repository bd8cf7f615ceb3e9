"""DGC as part of the ptq4arvg recipe (issue 20): the recipe's [calibration] table, --dgc overriding
it, the report's DGC line, and a VAR feature on which unconditional samples differ."""
import json

import pytest
import torch

from calib.capture import capture, dgc_features, last_block_token0
from calib.dgc import dgc_ranked, dgc_reference
from compiler.config import CalibrationConfig, CompileConfig
from compiler.driver import Compiler
from core.errors import UserError
from frontends import load_model
from passes.recipes import RecipeCalibration, load_recipe
from tests.test_family_compile import _var

CLASSES = [0, 7, 4, 1]


@pytest.fixture(scope="module")
def var_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dgc_default")
    args = _var(tmp)
    return tmp, args


def _recipe(tmp_path, table: str):
    path = tmp_path / "r.toml"
    path.write_text(f'pipeline = "canonicalize,observe,act-quant,insert-qdq"\n{table}')
    return load_recipe(str(path))


def test_recipe_calibration_table(tmp_path):
    assert load_recipe("ptq4arvg").calibration == RecipeCalibration("reference", 2.0)
    assert load_recipe("minmax").calibration == RecipeCalibration("none", 2.0)  # no table: no DGC
    r = _recipe(tmp_path, '[calibration]\ndgc = "ranked"\ncandidates = 4\n')
    assert r.calibration == RecipeCalibration("ranked", 4.0)
    for table, words in [('[calibration]\ndgc = "best"\n', "calibration.dgc must be one of none, reference, ranked"),
                         ("[calibration]\ncandidates = 1\n", "calibration.candidates must be a number from 2"),
                         ("[calibration]\ncandidates = true\n", "calibration.candidates must be a number from 2"),
                         ('[calibration]\ncandidates = "2"\n', "calibration.candidates must be a number from 2"),
                         ('[calibration]\nkeep = 3\n', "unknown field(s) in [calibration]: keep"),
                         ("calibration = 3\n", "[calibration] must be a table")]:
        with pytest.raises(UserError) as e:
            _recipe(tmp_path, table)
        assert words in str(e.value) and "r.toml" in str(e.value), (table, str(e.value))


def test_var_feature_differs_between_unconditional_samples(var_model):
    """Token 0 of the first step has seen the class token only: every unconditional sample had the
    same feature, and the reference kept conditional sequences only. The last step's mean differs
    per sample, so both sets rank and the reference keeps both kinds."""
    tmp, args = var_model
    bundle = load_model(args[0], tokenizer=args[2])
    steps = capture(bundle, classes=CLASSES, seed=0, cache_dir=tmp / "cache", batch=2)  # two generation batches
    cond, uncond, sizes = dgc_features(bundle, steps)
    assert sizes == [2, 2] and cond.shape == uncond.shape == (4, bundle.extra["model"].config.width)

    # the old feature: identical unconditional rows (and the reference then keeps no uncond sequence)
    old = torch.cat([last_block_token0(bundle.module, steps[s])[2:] for s in (0, steps.counts[0])])
    assert torch.equal(old, old[:1].expand_as(old))

    # the feature is the last block's output on each batch's last step, averaged over its tokens
    last = steps.counts[0] - 1
    seen = []
    handle = bundle.module.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[0].mean(dim=1)))
    with torch.no_grad():
        bundle.module(*steps[last])
    handle.remove()
    torch.testing.assert_close(cond[:2], seen[0][:2])
    torch.testing.assert_close(uncond[:2], seen[0][2:])
    for feats in (cond, uncond):
        dist = torch.cdist(feats, feats)[~torch.eye(4, dtype=torch.bool)]
        assert dist.min() > 1e-3 * feats.norm(dim=1).mean(), dist  # every pair of samples differs

    ranked = dgc_ranked(cond, uncond)
    for rho in (ranked.rho_cond, ranked.rho_uncond):
        assert rho.min() > 0 and rho.std() > 1e-4 * rho.mean(), rho  # the ranking has something to rank
    ref = dgc_reference(cond, uncond)
    assert ref.pct == 0.5 and len(ref.cond) == len(ref.uncond) == 2  # N < D: the reference's 50/50, not cond-only


def _calibrate(args, tmp, **calibration):
    config = CompileConfig(model=args[0], tokenizer=args[2], target="torch",
                           calibration=CalibrationConfig(cache=str(tmp / "cache"), **calibration))
    return Compiler(config, say=lambda msg: None).calibrate()


def test_candidates_and_skip(var_model):
    tmp, args = var_model
    cal = _calibrate(args, tmp, samples=2, dgc_candidates=4)  # keep 2 of 4 images' 8 sequences
    d = cal.extra["dgc"]
    assert len(cal.extra["classes"]) == 4 and d["candidates"] == 8 and d["kept_cond"] + d["kept_uncond"] == 2
    assert d["origin"] == "recipe ptq4arvg" and cal.extra["rows"] == 2 * len(cal.inputs)
    one = _calibrate(args, tmp, samples=1)  # the recipe's DGC cannot compare one image per set: skipped
    assert one.extra["dgc"]["method"] == "none" and one.extra["dgc"]["origin"].startswith("recipe ptq4arvg, skipped")
    with pytest.raises(UserError, match="--dgc ranked needs at least 2 generated images"):
        _calibrate(args, tmp, samples=1, dgc="ranked")  # asked for on the command line: an error
    with pytest.raises(UserError, match="--dgc must be one of"):
        _calibrate(args, tmp, dgc="best")
    with pytest.raises(UserError, match="DGC candidates must be from 2 to 64"):
        _calibrate(args, tmp, dgc_candidates=1.5)


def test_default_compile_runs_dgc_and_reports_it(var_model):
    """The default recipe selects with DGC and report.md says so; --dgc none turns it off."""
    import tools.compile as compile_tool

    tmp, args = var_model
    common = [*args, "--target", "torch", "--no-site-sqnr", "--calib-samples", "4", "--calib-cache", str(tmp / "cache")]
    reports = {}
    for name, extra in (("default", []), ("off", ["--dgc", "none"])):
        assert compile_tool.main([*common, *extra, "--out", str(tmp / name)]) == 0
        reports[name] = (json.loads((tmp / name / "report.json").read_text()), (tmp / name / "report.md").read_text())
    cal, md = reports["default"][0]["calibration"], reports["default"][1]
    assert reports["default"][0]["recipe"] == "ptq4arvg"
    d = cal["dgc"]
    assert d["method"] == "reference" and d["origin"] == "recipe ptq4arvg" and d["candidates"] == 8
    assert d["kept_cond"] + d["kept_uncond"] == 4 and d["kept_uncond"] > 0  # the new feature: not cond-only
    assert cal["rows"] == 4 * cal["batches"] and "DGC reference" in cal["source"]
    assert (f"DGC (`reference`, set by recipe ptq4arvg) kept {d['kept_cond']} conditional and "
            f"{d['kept_uncond']} unconditional of 8 generated sequences") in md
    assert "last step of each generation" in md
    off, off_md = reports["off"][0]["calibration"], reports["off"][1]
    assert off["dgc"] == {"method": "none", "origin": "--dgc none"} and "DGC" not in off["source"]
    assert off["batches"] == cal["batches"] and "DGC: off (set by --dgc none)" in off_md
