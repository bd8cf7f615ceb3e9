"""`python -m tools.compile` end to end on generic modules, and its handling of bad input."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from backends.ort_runner import make_session, run
from frontends import load_model
from tools.compile import main

MODELS = "tests/models_generic.py"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "out"
    assert main([f"{MODELS}:block", "--target", "onnx", "--out", str(out)]) == 0
    return out


def test_outputs_written(compiled):
    assert (compiled / "model.onnx").is_file()
    assert (compiled / "report.md").is_file()
    assert (compiled / "dumps" / "manifest.json").is_file()
    assert (compiled / "dumps" / "004_insert-qdq.txt").is_file()
    assert not list(compiled.parent.glob(".out.tmp-*"))


def test_onnx_matches_torch_fake_quant(compiled):
    report = json.loads((compiled / "report.json").read_text())
    assert report["onnx"]["ort_reference_max_abs_diff"] <= 1e-5
    assert report["onnx"]["QuantizeLinear"] == 4  # qkv, proj, fc1, fc2 inputs
    assert report["onnx"]["DequantizeLinear"] == 8  # + their int8 weights
    model = onnx.load(str(compiled / "model.onnx"))
    names = {i.name for i in model.graph.initializer}
    assert {"attn.qkv.input_scale", "fc1.weight_int8", "fc2.weight_scale"} <= names  # module paths survive


def test_fast_mode_within_int8_error(compiled):
    r = json.loads((compiled / "report.json").read_text())["onnx"]["ort_fast"]
    assert isinstance(r["cpu_vnni"], bool)
    assert 0 <= r["max_rel_diff_vs_reference"] < 0.05  # fused kernels: rounding-level differences only


def test_report_fidelity_is_real(compiled):
    r = json.loads((compiled / "report.json").read_text())
    # 8-bit quantization of a random block: noticeably noisy but far from garbage
    assert 10 < r["fidelity"]["min_sqnr_db"] < 60
    assert r["size_bytes"]["quantized"] < r["size_bytes"]["fp"] / 2.5
    assert set(r["sites"]) == {"attn.qkv", "attn.proj", "fc1", "fc2", "attn.matmul1", "attn.matmul2"}
    assert r["sites"]["fc1"]["quantized"] == ["input", "weight"]
    assert r["sites"]["attn.matmul1"]["quantized"] == []
    md = (compiled / "report.md").read_text()
    assert "onnxruntime (QDQ fusion disabled) vs torch fake-quant" in md


def test_input_and_output_order_kept(tmp_path):
    out = tmp_path / "o"
    assert main([f"{MODELS}:two_in_two_out", "--out", str(out)]) == 0
    sess = make_session(out / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == ["first", "second"]
    b = load_model(f"{MODELS}:two_in_two_out")
    got = run(sess, b.example_inputs)
    with torch.no_grad():
        ref = b.module(*b.example_inputs)
    assert got[0].shape == (3, 4) and got[1].shape == (3, 8)  # b(second) first, relu(a(first)) second
    np.testing.assert_allclose(got[1], ref[1].numpy(), atol=0.1)  # int8 of the FP output
    assert (got[1] >= 0).all()


def test_calib_data_file(tmp_path):
    torch.manual_seed(3)
    data = [(torch.randn(2, 8, 32) * 4,) for _ in range(3)]
    torch.save(data, tmp_path / "calib.pt")
    out = tmp_path / "o"
    assert main([f"{MODELS}:block", "--calib-data", str(tmp_path / "calib.pt"), "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["calibration"] == {"source": str(tmp_path / "calib.pt"), "batches": 3, "device": "cpu"}


def test_stop_after_and_disable(tmp_path):
    out = tmp_path / "o"
    assert main([f"{MODELS}:block", "--stop-after", "canonicalize", "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in r["passes"]] == ["canonicalize"]
    assert r["onnx"]["QuantizeLinear"] == 0
    out2 = tmp_path / "o2"
    assert main([f"{MODELS}:block", "--disable-pass", "weight-quant", "--out", str(out2)]) == 0
    r = json.loads((out2 / "report.json").read_text())
    assert r["onnx"]["DequantizeLinear"] == 4  # activations only


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.compile", *args], capture_output=True, text=True)


def test_bad_input_exit_2_one_line_nothing_written(tmp_path):
    out = tmp_path / "o"
    cases = [
        (["missing.pt"], "file not found"),
        ([f"{MODELS}:untraceable"], "cannot trace module 'body'"),
        ([f"{MODELS}:block", "--recipe", "nope"], "unknown recipe"),
        ([f"{MODELS}:block", "--pipeline", "canonicalize,bogus"], "unknown pass 'bogus'"),
    ]
    for args, needle in cases:
        err = main([*args, "--out", str(out)])
        assert err == 2, args
        assert not out.exists(), args
        assert not list(tmp_path.glob(".o.tmp-*")), args
    p = _cli(f"{MODELS}:block", "--target", "tensorflow", "--out", str(out))
    assert p.returncode == 2 and "invalid choice: 'tensorflow'" in p.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    p = _cli(str(bad), "--out", str(out))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: cannot read")
    assert len([ln for ln in p.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert not out.exists()


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "o"
    assert main([f"{MODELS}:two_in_two_out", "--out", str(out)]) == 0
    first = (out / "model.onnx").stat().st_mtime_ns
    assert main([f"{MODELS}:two_in_two_out", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([f"{MODELS}:two_in_two_out", "--out", str(out), "--force"]) == 0  # its own output: replaced
    assert (out / "model.onnx").stat().st_mtime_ns != first
    assert not list(tmp_path.glob(".o.tmp-*"))
