"""tools.compile --evaluate N --task inpaint|outpaint|edit: every row edits the same inputs with the
same seeds, scored against the FP edits where regenerated; bad task options are one error line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compiler import quality
from compiler.config import EditTaskConfig
from evaluation import metrics
from frontends import load_model
from tools.compile import main as compile_main


def _inputs(tmp_path, n=3):
    g = torch.Generator().manual_seed(3)
    images = (torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear")
              .clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "in.npz", images)
    return str(tmp_path / "in.npz")


def test_compile_scores_an_inpainting_task(tmp_path):
    from tests.test_family_compile import _var

    args = [*_var(tmp_path), "--recipe", "minmax", "--target", "onnx", "--calib-samples", "2", "--no-site-sqnr",
            "--calib-cache", str(tmp_path / "cache"), "--evaluate", "3", "--task", "inpaint",
            "--images", _inputs(tmp_path), "--box", "0.25,0,1,0.75", "--compare", "minmax:W6A6"]
    assert compile_main([*args, "--out", str(tmp_path / "out")]) == 0
    q = json.loads((tmp_path / "out" / "report.json").read_text())["quality"]
    assert q["task"] == {"task": "inpaint", "box": [0.25, 0, 1, 0.75], "images": str(tmp_path / "in.npz"),
                         "classes": None} and q["images"] == 3
    fp, w8, w6 = q["rows"]
    assert "psnr_generated_vs_fp_db" not in fp and "psnr_db" not in fp
    # the kept region is the input's tokens for every model: close to the reconstruction, whatever the bits
    for row in (fp, w8, w6):
        assert row["psnr_kept_db"] > row["psnr_generated_db"] and row["mnist_fid"] > 0
    assert abs(w8["psnr_kept_db"] - fp["psnr_kept_db"]) < 3
    assert 0 < w6["ssim_generated_vs_fp"] <= w8["ssim_generated_vs_fp"] <= 1
    from PIL import Image

    # 3 inputs x (input, FP, W8A8, W6A6), 32 px + 2 px padding each
    assert Image.open(tmp_path / "out" / quality.EDIT_GRID).size == (4 * 34 + 2, 3 * 34 + 2)
    assert "inpaint edits of" in (tmp_path / "out" / "report.md").read_text()


def test_edit_rows_score_against_fp():
    """Two rows of the FP step pair exactly (inf PSNR, SSIM 1 where regenerated); class accuracy is the
    classifier's on the edited digits against the target classes."""
    from evaluation.images import mnist_extractor

    bundle = load_model("builtin:mnist-var")
    run = quality.edit_run(bundle, EditTaskConfig("edit", classes=[3, 7]), 3)
    assert run.labels.tolist() == [3, 7, 3] and run.job.recorded == [3, 7, 3] and len(run.job.inputs) == 3
    rows = [quality.Row("FP", None, None, "torch fp32", None), quality.Row("FP again", None, None, "torch fp32", None)]
    table, samples = quality.evaluate_rows(bundle, rows, 3, 0, lambda x, **k: x, run)
    assert table[1]["psnr_generated_vs_fp_db"] == float("inf") and table[1]["ssim_generated_vs_fp"] == pytest.approx(1)
    assert table[1]["psnr_kept_db"] == table[0]["psnr_kept_db"] > 15
    probs = mnist_extractor()(samples["FP"].images)[1]
    assert table[0]["class_accuracy"] == pytest.approx(metrics.class_accuracy(probs, np.array([3, 7, 3])))


def test_bad_task_options(tmp_path, capsys):
    cases = {
        "--task inpaint needs --evaluate N": ["--evaluate", "0", "--task", "inpaint"],
        "--images needs --task": ["--evaluate", "2", "--images", "builtin:mnist"],
        "--task edit needs --classes": ["--evaluate", "2", "--task", "edit"],
        "--classes applies to --task edit": ["--evaluate", "2", "--task", "outpaint", "--classes", "1"],
        "implemented for VAR, not llamagen": ["builtin:mnist-gpt", "--evaluate", "2", "--task", "inpaint"],
        "must be four numbers": ["--evaluate", "2", "--task", "inpaint", "--box", "0.1,0.2"],
    }
    out = tmp_path / "o"
    for message, argv in cases.items():
        capsys.readouterr()
        assert compile_main([*argv, "--out", str(out), "--calib-cache", str(tmp_path / "cache")]) == 2, message
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], (message, errors)  # progress lines may precede it
        assert not out.exists(), message
