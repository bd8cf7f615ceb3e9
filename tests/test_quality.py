"""tools.compile --evaluate/--compare: the same seeds through FP, the compiled model and baselines."""
import json

import numpy as np
import pytest

from compiler import quality
from evaluation.images import Samples
from tests.test_family_compile import _var
from tools.compile import main


def test_evaluate_scores_every_model_on_the_same_images(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([*_var(tmp_path), "--target", "ort", "--recipe", "minmax", "--calib-samples", "2",
               "--calib-cache", str(tmp_path / "cache"), "--evaluate", "4", "--compare", "minmax:W8A8,minmax:W4A8",
               "--no-site-sqnr", "--out", str(out)])
    assert rc == 0
    q = json.loads((out / "report.json").read_text())["quality"]
    names = [r["name"] for r in q["rows"]]
    assert names == ["FP", "minmax W8A8, compiled", "minmax W8A8", "minmax W4A8"]
    fp, compiled, w8, w4 = q["rows"]
    assert "token_agreement" not in fp  # FP against itself says nothing
    for r in (compiled, w8, w4):
        assert 0 <= r["token_agreement"] <= 1 and 0 <= r["identical_images"] <= 1
    # 4-bit weights on a random model move more tokens than 8-bit ones (same images, same seeds)
    assert w4["token_agreement"] < w8["token_agreement"], (w4, w8)
    assert q["speed"]["int8_speedup"] > 0 and q["speed"]["onnx_bytes"]["int8"] < q["speed"]["onnx_bytes"]["fp32"]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(q["grids"][n].split("/")[1] for n in names)
    md = (out / "report.md").read_text()
    assert "## Image quality" in md and "minmax W4A8" in md
    assert "image quality, 4 images" in capsys.readouterr().out  # the summary table


def test_a_baseline_that_cannot_apply_is_a_row_with_its_error(tmp_path, capsys):
    # litevar keeps the post-GELU fc2 in FP: LlamaGen's SwiGLU has none, so the pattern matches nothing
    out = tmp_path / "out"
    rc = main(["builtin:mnist-gpt", "--target", "torch", "--recipe", "minmax", "--calib-samples", "1",
               "--calib-cache", str(tmp_path / "cache"), "--evaluate", "2", "--compare", "litevar:W8A8,minmax:W6A6",
               "--no-site-sqnr", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "report.json").read_text())["quality"]["rows"]
    assert [r["name"] for r in rows] == ["FP", "minmax W8A8, compiled", "litevar W8A8", "minmax W6A6"]
    assert "*.fc2" in rows[2]["error"] and "token_agreement" not in rows[2]
    assert "error" not in rows[3] and 0 <= rows[3]["token_agreement"] <= 1
    assert "error: " in (out / "report.md").read_text()
    printed = capsys.readouterr()
    assert "litevar W8A8 not compared: error:" in printed.out + printed.err


def test_score_pairs_images_with_their_fp_twin():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    b = a.copy()
    b[:3] = np.clip(b[:3].astype(int) + 10, 0, 255)  # three images change, three stay identical
    fp, q = Samples(None, a, np.arange(6) % 10), Samples(None, b, np.arange(6) % 10)
    r = quality.score(fp, q)
    mse = ((a.astype(float) - b.astype(float)) ** 2).mean()
    assert r["psnr_db"] == pytest.approx(10 * np.log10(255 ** 2 / mse))
    assert r["identical_images"] == 0.5
    assert 0 <= r["class_accuracy"] <= 1 and r["mnist_fid"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--compare", "minmax:W8A8", "--evaluate", "0"], "--compare needs --evaluate"),
    (["--compare", "minmax", "--evaluate", "2"], "RECIPE:BITS"),
    (["--compare", "nope:W8A8", "--evaluate", "2"], "nope"),
    (["--evaluate", "2"], "--evaluate needs a family model"),
])
def test_bad_quality_options_fail_early(tmp_path, capsys, argv, message):
    assert main(["builtin:tiny-block", *argv, "--out", str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last
    assert not (tmp_path / "o").exists()
