"""QDQ linter: TensorRT rules on exported models and on hand-built violations."""
import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from backends.qdq_lint import lint
from tools.compile import main as compile_main
from tools.inspect import main as inspect_main

MODELS = "tests/models_generic.py"


def test_default_recipe_is_tensorrt_legal(tmp_path, capsys):
    out = tmp_path / "o"
    assert compile_main([f"{MODELS}:block", "--out", str(out)]) == 0
    rep = lint(out / "model.onnx")
    assert rep.ok, rep.summary()
    assert rep.quantized_gemms == {"attn.qkv": 1, "attn.proj": 1, "fc1": 1, "fc2": 1}
    assert len(rep.float_gemms) == 2  # the attention matmuls stay in float by default
    capsys.readouterr()
    assert inspect_main([str(out / "model.onnx"), "--lint", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_asymmetric_and_per_channel_activations_are_flagged(tmp_path, capsys):
    out = tmp_path / "o"
    pipe = "canonicalize,observe,act-quant{symmetric=false,granularity=channel},weight-quant,insert-qdq"
    assert compile_main([f"{MODELS}:block", "--pipeline", pipe, "--out", str(out)]) == 0
    rep = lint(out / "model.onnx")
    rules = {(v.rule, v.module) for v in rep.violations}
    assert ("per-tensor-activation", "fc1.input") in rules
    assert ("symmetric", "attn.qkv.input") in rules
    assert not any(v.module.endswith(".weight") for v in rep.violations)  # per-channel weights are legal
    capsys.readouterr()
    assert inspect_main([str(out / "model.onnx"), "--lint"]) == 1
    assert "per-tensor-activation" in capsys.readouterr().out


def _model(nodes, inits, inputs=("x",)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, [2, 4]) for i in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)],
                           ir_version=9)  # opset 19's IR: older onnxruntime builds refuse newer IRs


def test_forbidden_ops_runtime_scales_and_half_quantized_gemm():
    m = _model([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"], name="dyn"),
                helper.make_node("Abs", ["x"], ["s2"], name="abs"),
                helper.make_node("QuantizeLinear", ["x", "s2"], ["q2"], name="q_runtime"),
                helper.make_node("DequantizeLinear", ["w_int8", "w_scale"], ["w"], name="w_dq"),
                helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
               {"w_int8": np.ones((4, 3), np.int8), "w_scale": np.array([0.1, 0.2, -0.3], np.float32)})
    rep = lint(m)
    got = {(v.rule, v.node) for v in rep.violations}
    assert ("forbidden-op", "dyn") in got
    assert ("constant-scale", "q_runtime") in got
    assert ("positive-scale", "w_dq") in got
    assert ("gemm-fusion", "mm") in got
    assert rep.float_gemms == ["mm"]
    onnx.checker.check_model(m)


def test_weight_dq_feeds_matmul_directly(tmp_path):
    """The export stores int8 weights transposed so no Transpose sits between DQ and MatMul."""
    out = tmp_path / "o"
    assert compile_main([f"{MODELS}:block", "--out", str(out)]) == 0
    m = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    weight_dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_int8")]
    assert len(weight_dqs) == 4
    for dq in weight_dqs:
        users = [n for n in m.graph.node if dq.output[0] in n.input]
        assert [u.op_type for u in users] == ["MatMul"], dq.name
        w = numpy_helper.to_array(inits[dq.input[0]])
        k = next(u for u in users).input[0]
        assert {a.name: a.i for a in dq.attribute}["axis"] == 1  # output channels are now the columns
        assert w.shape[1] == numpy_helper.to_array(inits[dq.input[1]]).size
        assert k in producer
