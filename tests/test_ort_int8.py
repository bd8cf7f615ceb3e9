"""onnxruntime int8: the MatMulIntegerToFloat variant (backends.ort_int8), reduce-range weights, and fast
mode against the reference on every family's tiny model."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.ort_int8 import lower_for_ort
from backends.ort_runner import cpu_has_vnni, make_session
from tests.test_family_compile import FAMILIES
from tools.compile import main

K, N = 96, 48


def _linear_model(w_int8: np.ndarray, w_scale: np.ndarray, x_scale: float, x_zp: int) -> onnx.ModelProto:
    """x -> Q(s, z) -> DQ -> MatMul(., DQ(W_int8, w_scale, axis=1)) -> Add(bias): our export's linear."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(w_int8, "fc.weight_int8"), numpy_helper.from_array(w_scale, "fc.weight_scale"),
             numpy_helper.from_array(np.zeros(N, np.int8), "fc.weight_zero_point"),
             numpy_helper.from_array(np.float32(x_scale), "fc.input_scale"),
             numpy_helper.from_array(np.int8(x_zp), "fc.input_zero_point"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "fc.bias")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "fc.input_scale", "fc.input_zero_point"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "fc.input_scale", "fc.input_zero_point"], ["dq"]),
             helper.make_node("DequantizeLinear", ["fc.weight_int8", "fc.weight_scale", "fc.weight_zero_point"], ["w"], axis=1),
             helper.make_node("MatMul", ["dq", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "fc.bias"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)],
                           ir_version=9)  # opset 19's IR: older onnxruntime builds refuse newer IRs


def _run(model: onnx.ModelProto, x: np.ndarray, tmp_path, name: str, mode: str) -> np.ndarray:
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return make_session(path, mode).run(None, {"x": x})[0]


# (8 bits, u8s8_safe=True) is left out on purpose: it is exact only on CPUs with VNNI, and on the
# others it saturates, which is exactly why compile passes u8s8_safe=False there.
@pytest.mark.parametrize("weight_bits,u8s8_safe", [(8, False), (7, False), (7, True)])
def test_lowered_linear_equals_the_qdq_reference(tmp_path, weight_bits, u8s8_safe):
    """Integer GEMMs accumulate exactly, so the variant equals the Q/DQ reference up to float32 rounding,
    provided it never feeds u8 x s8 kernels weights that can saturate: full-range weights on a CPU without
    VNNI go to the u8u8 kernel."""
    rng = np.random.default_rng(0)
    lim = 2 ** (weight_bits - 1)
    w = rng.integers(-lim, lim, (K, N)).astype(np.int8)
    w[:, 0] = -lim  # extreme weights against all-255 activations: the saturating case of vpmaddubsw
    model = _linear_model(w, rng.uniform(0.01, 0.02, N).astype(np.float32), x_scale=0.05, x_zp=-3)
    x = rng.standard_normal((2, 7, K)).astype(np.float32) * 3
    x[0, 0] = 100.0  # clamps to the top code
    ref = _run(model, x, tmp_path, "ref", "reference")

    counts = lower_for_ort(model, u8s8_safe=u8s8_safe)
    got = _run(model, x, tmp_path, "low", "fast")
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["QuantizeLinear", "MatMulIntegerToFloat"], ops  # the bias Add is folded into the GEMM
    shifted = weight_bits == 8 and not u8s8_safe
    assert counts == {"int8_gemms": 0 if shifted else 1, "u8u8_gemms": 1 if shifted else 0, "float_matmuls": 0,
                      "group_epilogues": 0, "group_quantizers": 0, "cache_writes": 0, "row_gemms": 0, "gelus": 0}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    zp = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == q.input[2]))
    assert zp.dtype == np.uint8 and int(zp) == 125  # int8 zero point -3 shifted by 128
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert rel < 1e-6, f"max relative diff {rel:.2e}"


def test_float_matmuls_are_left_alone(tmp_path):
    rng = np.random.default_rng(0)
    model = _linear_model(rng.integers(-64, 64, (K, N)).astype(np.int8), np.full(N, 0.01, np.float32), 0.05, 0)
    mm = next(n for n in model.graph.node if n.op_type == "MatMul")
    mm.input[0] = "x"  # activation not quantized: no integer GEMM possible
    counts = lower_for_ort(model, u8s8_safe=False)
    assert counts == {"int8_gemms": 0, "u8u8_gemms": 0, "float_matmuls": 1, "group_epilogues": 0, "group_quantizers": 0,
                      "cache_writes": 0, "row_gemms": 0, "gelus": 0}
    assert "MatMul" in [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in [n.op_type for n in model.graph.node]  # the dead Q is pruned


@pytest.mark.parametrize("u8s8_safe,bias", [(True, True), (False, True), (True, False)])
def test_one_row_linears_become_dynamic_int8_gemms(tmp_path, u8s8_safe, bias):
    """A float Gemm with a constant weight (the exporter's linear on a 2-d input: VAR's AdaLN linears, kept float by
    the recipes) becomes DynamicQuantizeMatMul: int8 weights per output channel (7 bits where u8 x s8 could saturate),
    the rows quantized per call as onnxruntime does it (uint8, min-max per tensor). Same numbers as that arithmetic
    done here in float64, and within the quantization error of the float linear."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)  # torch's [out, in]: Gemm transB=1
    b = rng.standard_normal(N).astype(np.float32)
    inits = [numpy_helper.from_array(w, "ada.weight")] + ([numpy_helper.from_array(b, "ada.bias")] if bias else [])
    g = helper.make_graph([helper.make_node("Gemm", ["x", "ada.weight"] + (["ada.bias"] if bias else []), ["y"], transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    x = rng.standard_normal((4, K)).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)

    counts = lower_for_ort(model, u8s8_safe=u8s8_safe)
    assert counts["row_gemms"] == 1 and counts["int8_gemms"] == 0
    (node,) = model.graph.node
    assert node.op_type == "DynamicQuantizeMatMul" and node.domain == "com.microsoft"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    wq, ws = inits[node.input[1]], inits[node.input[2]]
    assert wq.dtype == np.int8 and wq.shape == (K, N) and ws.shape == (N,)
    top = 127 if u8s8_safe else 63
    assert np.abs(wq).max() == top  # symmetric per channel, the range used
    # onnxruntime's dynamic activation grid: uint8 over [min(x, 0), max(x, 0)]
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    xs = np.float32((hi - lo) / 255)
    xz = np.clip(np.round(-lo / xs), 0, 255)
    xq = np.clip(np.round(x / xs) + xz, 0, 255)
    emulated = ((xq - xz) @ wq.astype(np.float64)) * (float(xs) * ws.astype(np.float64)) + (b if bias else 0)
    onnx.save(model, tmp_path / "low.onnx")
    got = make_session(tmp_path / "low.onnx", "fast").run(None, {"x": x})[0]
    scale = np.abs(exact).max()
    assert np.abs(got - emulated).max() / scale < 1e-5
    assert np.abs(got - exact).max() / scale < (2e-2 if u8s8_safe else 4e-2)  # int8 (7-bit) weights, 8-bit rows


def test_row_gemms_only_where_named():
    """Only Gemms whose module path matches ``row_gemms`` (the family's default exclusions, for the targets) are
    rewritten: a linear a user excluded stays float."""
    w = np.full((N, K), 0.5, np.float32)
    nodes = [helper.make_node("Gemm", ["x", "blocks.0.ada_lin.1.weight"], ["y"], transB=1),
             helper.make_node("Gemm", ["x", "cond_proj.weight"], ["z"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "z")],
                          initializer=[numpy_helper.from_array(w, "blocks.0.ada_lin.1.weight"),
                                       numpy_helper.from_array(w, "cond_proj.weight")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    assert lower_for_ort(model, u8s8_safe=True, row_gemms=())["row_gemms"] == 0
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Gemm"]
    assert lower_for_ort(model, u8s8_safe=True, row_gemms=("blocks.*.ada_lin.1",))["row_gemms"] == 1
    assert sorted((n.op_type, n.output[0]) for n in model.graph.node) == [("DynamicQuantizeMatMul", "y"), ("Gemm", "z")]


def _group_linear_model(*, symmetric: bool, bias: bool, qmax: int, rng) -> onnx.ModelProto:
    """insert-qdq's token-group (STWQ) linear as exported: ``x * inv_s[g] + z[g] -> [Clip] -> Q(1, 0) -> DQ ->
    MatMul(., DQ(W)) * s[g] [- (z s)[g] colsum] [+ bias]``, the tables gathered by ``groups``."""
    G = 3
    s = rng.uniform(0.02, 0.05, G).astype(np.float32)
    z = np.zeros(G, np.float32) if symmetric else rng.integers(-20, 20, G).astype(np.float32)
    w = rng.integers(-128, 128, (K, N)).astype(np.int8)
    ws = rng.uniform(0.01, 0.02, N).astype(np.float32)
    arrays = {"S": s, "INV": (1 / s).astype(np.float32), "Z": z, "W": w, "ws": ws, "wz": np.zeros(N, np.int8),
              "one": np.float32(1), "zero": np.int8(0), "colsum": (w.astype(np.float32) * ws).sum(0),
              "bias": rng.standard_normal(N).astype(np.float32), "ax": np.array([-1], np.int64),
              "lo": np.float32(-qmax - 1), "hi": np.float32(qmax)}
    nodes = []
    for table, out in (("S", "s"), ("INV", "inv"), ("Z", "z")):
        nodes += [helper.make_node("Gather", [table, "groups"], [f"{out}_g"], axis=0),
                  helper.make_node("Unsqueeze", [f"{out}_g", "ax"], [out])]
    nodes += [helper.make_node("Mul", ["x", "inv"], ["xi"]), helper.make_node("Add", ["xi", "z"], ["xs"])]
    if qmax < 127:  # a narrower grid: the export clamps before the 8-bit Q
        nodes.append(helper.make_node("Clip", ["xs", "lo", "hi"], ["xc"]))
    nodes += [helper.make_node("QuantizeLinear", ["xc" if qmax < 127 else "xs", "one", "zero"], ["q"]),
              helper.make_node("DequantizeLinear", ["q", "one", "zero"], ["v"]),
              helper.make_node("DequantizeLinear", ["W", "ws", "wz"], ["w"], axis=1),
              helper.make_node("MatMul", ["v", "w"], ["mm"]), helper.make_node("Mul", ["mm", "s"], ["y1"])]
    y = "y1"
    if not symmetric:
        nodes += [helper.make_node("Mul", ["z", "s"], ["zs"]), helper.make_node("Mul", ["zs", "colsum"], ["corr"]),
                  helper.make_node("Sub", ["y1", "corr"], ["y2"])]
        y = "y2"
    if bias:
        nodes.append(helper.make_node("Add", [y, "bias"], ["y3"]))
        y = "y3"
    nodes.append(helper.make_node("Identity", [y], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", K]),
                                       helper.make_tensor_value_info("groups", TensorProto.INT64, ["t"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in arrays.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


@pytest.mark.parametrize("symmetric,bias,qmax", [(False, True, 127), (True, True, 127), (True, False, 127), (False, True, 31)])
def test_token_group_epilogue_folds_into_the_gemm(tmp_path, symmetric, bias, qmax):
    """The STWQ epilogue folds into MatMulIntegerToFloat, the input grid into one per-row QuantizeLinear. When all
    tokens of a call share a group (every VAR step) the GEMM takes that group's scale as a scalar a_scale and its
    offset (bias minus the zero-point correction) as its bias: no pass after the GEMM. Tokens of several groups
    take the per-row a_scale plus at most one Add of the gathered offsets. Same numbers either way."""
    rng = np.random.default_rng(0)
    model = _group_linear_model(symmetric=symmetric, bias=bias, qmax=qmax, rng=rng)
    x = (rng.standard_normal((2, 7, K)) * 2).astype(np.float32)
    x[0, 0, :4] = [100.0, -100.0, 1e-3, 0.0]  # both clamps and the zero point
    feeds = [{"x": x, "groups": rng.integers(0, 3, 7).astype(np.int64)}, {"x": x, "groups": np.full(7, 2, np.int64)}]
    onnx.save(model, tmp_path / "ref.onnx")
    ref = [make_session(tmp_path / "ref.onnx", "reference").run(None, f)[0] for f in feeds]

    counts = lower_for_ort(model, u8s8_safe=True)
    onnx.save(model, tmp_path / "low.onnx")
    got = [make_session(tmp_path / "low.onnx", "fast").run(None, f)[0] for f in feeds]
    ops = [n.op_type for n in model.graph.node]
    narrow = qmax < 127  # the Clip keeps the exported input side; the output side still folds
    assert counts["group_epilogues"] == 1 and counts["group_quantizers"] == (0 if narrow else 1)
    assert ops.count("If") == 1 and "MatMulIntegerToFloat" not in ops and "Sub" not in ops
    assert ops.count("Add") == (1 if narrow else 0)
    assert ops.count("Mul") == (1 if narrow else 0)  # x * inv_s only where the input side stays
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert (q.input[1] in {i.name for i in model.graph.initializer}) == narrow  # per-row scale: a Gather output
    branch = next(n for n in model.graph.node if n.op_type == "If")
    one, rows = (helper.get_attribute_value(a) for a in sorted(branch.attribute, key=lambda a: a.name != "then_branch"))
    offset = bias or not symmetric
    assert [n.op_type for n in one.node if n.op_type != "Gather"] == ["MatMulIntegerToFloat"]  # bias fused, if any
    assert len(one.node[-1].input) == (7 if offset else 5)
    assert [n.op_type for n in rows.node if n.op_type != "Gather"] == ["MatMulIntegerToFloat"] + ["Add"] * offset
    for r, g in zip(ref, got):
        rel = float(np.abs(g - r).max() / np.abs(r).max())
        assert rel < 1e-6, f"max relative diff {rel:.2e}"


@pytest.mark.parametrize("shared", [False, True])
def test_tanh_gelu_becomes_fast_gelu(tmp_path, shared):
    """torch's tanh GELU as exported (Pow, Mul, Add, Mul, Tanh, Add, Mul, Mul) becomes one FastGelu with the same
    numbers; a chain whose intermediate another node reads stays as it is."""
    c = {"three": 3.0, "cubic": 0.044715, "k": float(np.sqrt(2 / np.pi)), "one": 1.0, "half": 0.5}
    nodes = [helper.make_node("Pow", ["x", "three"], ["p"]), helper.make_node("Mul", ["cubic", "p"], ["m1"]),
             helper.make_node("Add", ["x", "m1"], ["a1"]), helper.make_node("Mul", ["k", "a1"], ["m2"]),
             helper.make_node("Tanh", ["m2"], ["t"]), helper.make_node("Add", ["t", "one"], ["a2"]),
             helper.make_node("Mul", ["half", "a2"], ["m3"]), helper.make_node("Mul", ["x", "m3"], ["y"])]
    outputs = ["y"] + (["a1"] if shared else [])
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", K])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                          initializer=[numpy_helper.from_array(np.float32(v), n) for n, v in c.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    x = (np.random.default_rng(0).standard_normal((2, 7, K)) * 4).astype(np.float32)
    ref = _run(model, x, tmp_path, "ref", "reference")
    assert lower_for_ort(model, u8s8_safe=True)["gelus"] == (0 if shared else 1)
    ops = [n.op_type for n in model.graph.node]
    assert ops == (["Pow", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"] if shared else ["FastGelu"])
    got = _run(model, x, tmp_path, "low", "fast")
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 1e-6


def test_cache_write_transposes_are_folded(tmp_path):
    """The exporter's index_copy along the position axis (Transpose -> ScatterND -> Transpose) becomes one
    ScatterND on the cache's layout: the same cache, bit for bit."""
    B, H, L, D, T = 2, 3, 11, 4, 5
    nodes = [helper.make_node("Transpose", ["cache"], ["tc"], perm=[2, 0, 1, 3]),
             helper.make_node("Unsqueeze", ["pos", "ax"], ["idx"]),
             helper.make_node("Transpose", ["k"], ["tk"], perm=[2, 0, 1, 3]),
             helper.make_node("ScatterND", ["tc", "idx", "tk"], ["sc"]),
             helper.make_node("Transpose", ["sc"], ["out"], perm=[1, 2, 0, 3])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cache", TensorProto.FLOAT, ["b", H, L, D]),
                                       helper.make_tensor_value_info("pos", TensorProto.INT64, ["t"]),
                                       helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", H, "t", D])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(np.array([-1], np.int64), "ax")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    rng = np.random.default_rng(0)
    feed = {"cache": rng.standard_normal((B, H, L, D)).astype(np.float32), "pos": np.array([7, 2, 9, 3, 10]),
            "k": rng.standard_normal((B, H, T, D)).astype(np.float32)}
    expected = feed["cache"].copy()
    expected[:, :, feed["pos"]] = feed["k"]
    assert lower_for_ort(model, u8s8_safe=True)["cache_writes"] == 1
    ops = [n.op_type for n in model.graph.node]
    assert "Transpose" not in ops and ops.count("ScatterND") == 1
    onnx.save(model, tmp_path / "low.onnx")
    assert np.array_equal(make_session(tmp_path / "low.onnx", "fast").run(None, feed)[0], expected)


def test_cache_writes_of_the_same_shape_share_their_indices(tmp_path):
    """k and v written at the same positions with updates of the same (symbolic) shape, as every block of the
    exported step does, share one index tensor; a write of another shape builds its own. The caches stay exact."""
    B, H, L, D, T = 2, 3, 11, 4, 5
    nodes = [helper.make_node("Unsqueeze", ["pos", "ax"], ["idx"])]
    for c, u in (("kc", "k"), ("vc", "v"), ("wc", "w")):
        nodes += [helper.make_node("Transpose", [c], [f"t{c}"], perm=[2, 0, 1, 3]),
                  helper.make_node("Transpose", [u], [f"t{u}"], perm=[2, 0, 1, 3]),
                  helper.make_node("ScatterND", [f"t{c}", "idx", f"t{u}"], [f"s{c}"]),
                  helper.make_node("Transpose", [f"s{c}"], [f"{c}_out"], perm=[1, 2, 0, 3])]
    val = helper.make_tensor_value_info
    inputs = [val("pos", TensorProto.INT64, ["t"])]
    inputs += [val(c, TensorProto.FLOAT, ["b", H, L, D]) for c in ("kc", "vc")] + [val("wc", TensorProto.FLOAT, ["b", 1, L, D])]
    inputs += [val(u, TensorProto.FLOAT, ["b", H, "t", D]) for u in ("k", "v")] + [val("w", TensorProto.FLOAT, ["b", 1, "t", D])]
    g = helper.make_graph(nodes, "g", inputs, [val(f"{c}_out", TensorProto.FLOAT, None) for c in ("kc", "vc", "wc")],
                          initializer=[numpy_helper.from_array(np.array([-1], np.int64), "ax")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    rng = np.random.default_rng(0)
    feed = {"pos": np.array([7, 2, 9, 3, 10])}
    for c, u, h in (("kc", "k", H), ("vc", "v", H), ("wc", "w", 1)):
        feed[c] = rng.standard_normal((B, h, L, D)).astype(np.float32)
        feed[u] = rng.standard_normal((B, h, T, D)).astype(np.float32)
    assert lower_for_ort(model, u8s8_safe=True)["cache_writes"] == 3
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("ScatterND") == 3 and ops.count("Concat") == 2  # k and v share; w (1 head) has its own
    onnx.save(model, tmp_path / "low.onnx")
    got = make_session(tmp_path / "low.onnx", "fast").run(None, feed)
    for out, (c, u) in zip(got, (("kc", "k"), ("vc", "v"), ("wc", "w"))):
        expected = feed[c].copy()
        expected[:, :, feed["pos"]] = feed[u]
        assert np.array_equal(out, expected)


def test_weight_quant_reduce_range_stores_7_bit_weights(tmp_path):
    out = tmp_path / "o"
    assert main(["builtin:tiny-block", "--pipeline", "canonicalize,observe,act-quant,weight-quant{reduce_range=true},insert-qdq",
                 "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    weights = {k: v for k, v in r["qparams"].items() if k.endswith(".weight")}
    assert weights and all(v["bits"] == 7 for v in weights.values())
    assert all(v["bits"] == 8 for k, v in r["qparams"].items() if k.endswith(".input"))
    model = onnx.load(str(out / "model.onnx"))
    ints = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("weight_int8")]
    assert len(ints) == len(weights)
    assert min(int(w.min()) for w in ints) == -64 or max(int(w.max()) for w in ints) == 63  # the range is used
    assert all(w.min() >= -64 and w.max() <= 63 for w in ints)


# Measured on the 2-core AMD EPYC (AVX2, no VNNI), 2 self-generated calibration images, relative to each
# output's largest magnitude, fast vs reference: VAR 2.7e-7, LlamaGen 3.5e-7, PAR 2.2e-7, RAR 2.5e-7 with
# minmax (2.3e-7 to 3.5e-7 with ptq4arvg). The int32 GEMMs are exact, the rest is float32 rounding; such a
# rounding can flip one activation code of a later layer (one quantization step), so 1e-3 leaves room for a
# few flips and is still 90x below the 9 % the saturating u8 x s8 kernels gave with full-range weights.
FAST_TOL = 1e-3
# MAR's step output (the conditioning vectors of its diffusion head) is small: on the GPU machine's CPU (Intel,
# VNNI, full-range weights) one such flip moved it by 2.8e-3 of its largest magnitude, in onnxruntime's QDQ fusion
# and our int8 model alike (2026-12-06, an H200 host). Flips stay rare; the bound stays 180x below the 9 %.
FAST_TOL_FAMILY = {"mar": 5e-3}


def test_target_attention_sites_quantize_only_those_matmuls():
    """``QuantConfig.attention_sites`` (what a target asks for; ``--target ort`` on VNNI: q @ k^T) makes act-quant
    quantize those attention matmuls' operands and no other, whatever the recipe's own act-quant options."""
    from compiler.bench import workloads
    from compiler.driver import quantize

    bundle = workloads()["var-tiny"](1)
    pipeline = "canonicalize,observe{histograms=false},act-quant,weight-quant,insert-qdq"
    for sites, expected in (("", set()), ("*.matmul1", {"blocks.0.attn.matmul1", "blocks.1.attn.matmul1"})):
        ctx = quantize(bundle, pipeline, "W8A8", bundle.calib_inputs[:2], attention_sites=sites).ctx
        quantized = {k.rsplit(".", 1)[0] for k in ctx.qparams if k.endswith((".a", ".b"))}
        assert quantized == expected, (sites, quantized)
        assert all(f"{m}.{r}" in ctx.qparams for m in expected for r in ("a", "b"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_target_ort_fast_mode_matches_reference(tmp_path, family):
    out = tmp_path / "out"
    assert main([*FAMILIES[family](tmp_path), "--target", "ort", "--recipe", "minmax", "--out", str(out), "--calib-samples", "2",
                 "--calib-cache", str(tmp_path / "cache")]) == 0
    o = json.loads((out / "report.json").read_text())["onnx"]
    fast = o["ort_fast"]
    assert fast["reduce_range"] == (not cpu_has_vnni())
    assert o["ort_reference_max_abs_diff"] <= 1e-4  # the reference path stays exact
    variant = fast["int8_model"]
    assert variant["int8_gemms"] >= 8 and variant["u8u8_gemms"] == 0  # every linear on the u8 x s8 kernel
    assert (out / "model.ort.onnx").exists()
    tol = FAST_TOL_FAMILY.get(family, FAST_TOL)
    assert fast["max_rel_diff_vs_reference"] <= tol, f"onnxruntime QDQ fusion: {fast}"
    _assert_lowering_exact(variant, tol)


# The one-row linears quantized per call (DynamicQuantizeMatMul) move the tiny models' outputs by about 1e-2 of
# their largest magnitude; the rest of the lowering stays exact, which the report checks with them in float.
ROW_GEMM_TOL = 5e-2


def _assert_lowering_exact(variant: dict, tol: float) -> None:
    if variant["row_gemms"]:
        assert variant["max_rel_diff_vs_reference_without_row_gemms"] <= tol, f"onnxruntime int8 model: {variant}"
        assert variant["max_rel_diff_vs_reference"] <= ROW_GEMM_TOL, f"onnxruntime int8 model: {variant}"
    else:
        assert "max_rel_diff_vs_reference_without_row_gemms" not in variant
        assert variant["max_rel_diff_vs_reference"] <= tol, f"onnxruntime int8 model: {variant}"


@pytest.mark.parametrize("attention", ["target", "option", "excluded"])
def test_var_ptq4arvg_lowers_to_fused_int8_nodes(tmp_path, attention):
    """The tiny VAR with ptq4arvg (token-group grids on every linear), with q @ k^T as the ort target leaves it
    (int8 on a CPU with VNNI), quantized by the recipe option (``act-quant{matmuls=true,matmul-sites=*.matmul1}``)
    or kept float by ``--exclude``: every linear's epilogue is folded, the cache writes lose their transposes, and
    the lowered model still runs as the Q/DQ reference does."""
    from passes.recipes import load_recipe
    from tests.test_family_compile import FAMILIES

    out = tmp_path / "out"
    pipeline = load_recipe("ptq4arvg").pipeline
    if attention == "option":
        pipeline = pipeline.replace(",act-quant,", ",act-quant{matmuls=true,matmul-sites=*.matmul1},")
    extra = ["--exclude", "*.matmul1"] if attention == "excluded" else []
    assert main([*FAMILIES["var"](tmp_path), "--target", "ort", "--pipeline", pipeline, "--out", str(out), *extra,
                 "--calib-samples", "2", "--calib-cache", str(tmp_path / "cache"), "--no-site-sqnr"]) == 0
    matmuls = attention == "option" or (attention == "target" and cpu_has_vnni())
    o = json.loads((out / "report.json").read_text())["onnx"]
    variant = o["ort_fast"]["int8_model"]
    gemms = sum(o["tensorrt_lint"]["int8_gemms"].values())
    linears = gemms - (2 if matmuls else 0)  # the tiny VAR has 2 blocks
    assert linears == 9  # qkv, proj, fc1, fc2 per block and the head; the AdaLN linears stay float (default exclusions)
    # q @ k^T has an activation as B: u8u8 on a CPU without VNNI (7-bit weights keep the linears u8s8)
    assert variant["int8_gemms"] + variant["u8u8_gemms"] == gemms and variant["float_matmuls"] == (2 if matmuls else 4)
    assert variant["group_epilogues"] == variant["group_quantizers"] == linears
    assert variant["cache_writes"] == 4  # k and v of each block
    assert variant["row_gemms"] == 3  # the AdaLN linears (2 blocks and the head's): one row per image
    ops = [n.op_type for n in onnx.load(str(out / "model.ort.onnx")).graph.node]
    assert "Sub" not in ops and "DequantizeLinear" not in ops and "Gemm" not in ops
    assert ops.count("DynamicQuantizeMatMul") == 3
    assert ops.count("If") == linears  # each linear's one-group branch and per-row branch
    assert variant["gelus"] == ops.count("FastGelu") == 2 and "Tanh" not in ops  # the tanh GELU of each block
    assert ops.count("QuantizeLinear") == linears + (2 * 2 if matmuls else 0)  # one per linear; q and k^T per block
    _assert_lowering_exact(variant, FAST_TOL)
