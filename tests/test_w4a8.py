"""--bits W4A8 end to end on a tiny VAR: 4-bit weights in int8 containers, 8-bit activations,
TensorRT-legal ONNX that onnxruntime (reference mode) runs like the torch fake-quant graph."""
import json

import onnx
from onnx import numpy_helper

from tests.test_family_compile import _var
from tools.compile import main


def test_var_w4a8_exports_4bit_weights_and_8bit_activations(tmp_path):
    out = tmp_path / "out"
    rc = main([*_var(tmp_path), "--recipe", "ptq4arvg", "--bits", "W4A8", "--out", str(out),
               "--calib-samples", "1", "--calib-cache", str(tmp_path / "cache")])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    bits = {k: v["bits"] for k, v in r["qparams"].items()}
    assert {b for k, b in bits.items() if k.endswith(".weight")} == {4}
    assert {b for k, b in bits.items() if k.endswith(".input")} == {8}
    assert r["onnx"]["tensorrt_lint"]["ok"], r["onnx"]["tensorrt_lint"]["violations"]
    assert r["onnx"]["ort_reference_max_abs_diff"] <= 1e-4
    model = onnx.load(str(out / "model.onnx"))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("weight_int8")}
    assert len(weights) == sum(k.endswith(".weight") for k in bits) >= 8
    for name, w in weights.items():
        assert str(w.dtype) == "int8" and -8 <= int(w.min()) and int(w.max()) <= 7, name  # the 4-bit grid
    assert any(int(w.min()) == -8 or int(w.max()) == 7 for w in weights.values())  # and all of it used
    assert r["fidelity"]["min_sqnr_db"] > 10  # coarse but far from garbage (21 dB measured)
