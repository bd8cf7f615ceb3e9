"""``dtwq`` exported to ONNX: per-token dynamic Q/DQ (computed scales) and DynamicQuantizeLinear.

onnxruntime runs both and equals the torch simulation; the TensorRT Q/DQ lint flags them
(run-time scales, a forbidden op); the dtwq recipe compiles the tiny VAR to ONNX with parity.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx

from backends.onnx_export import export_onnx, qdq_census
from backends.ort_runner import make_session, run
from backends.qdq_lint import lint
from core.errors import UserError
from passes import ops
from tests.test_baselines import _compile, _direct_per_token, _passes, var_args  # noqa: F401  (fixture)
from tests.test_folding import compile_graph
import models_folding as M


class _TokenFQ(torch.nn.Module):
    def __init__(self, bits, symmetric):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric

    def forward(self, x):
        return ops.dynamic_token_fake_quant(x, self.bits, self.symmetric) * 2.0


class _TensorFQ(torch.nn.Module):
    def forward(self, x):
        return ops.dynamic_tensor_fake_quant_u8(x) * 2.0


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 16, generator=g)
    x[0, 3] *= 50  # an outlier token
    x[1, 2] = x[1, 2].abs() + 1  # all positive: the range is widened to contain 0
    return x


def _export(module, x, tmp_path, name):
    gm = fx.symbolic_trace(module)
    path = export_onnx(gm, (x,), tmp_path / f"{name}.onnx", input_names=["x"], output_names=["y"],
                       dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("t")},))
    return path


@pytest.mark.parametrize("bits,symmetric", [(8, True), (6, True), (8, False), (4, False)])
def test_per_token_export_matches_torch_on_onnxruntime_and_is_flagged_by_the_lint(tmp_path, bits, symmetric):
    x = _inputs()
    path = _export(_TokenFQ(bits, symmetric), x, tmp_path, f"tok{bits}{symmetric}")
    want = (_direct_per_token(x, bits, symmetric) * 2.0).numpy()
    sess = make_session(path, "reference")
    for xi in (x, x[:1, :4] * 3, torch.randn(3, 5, 16)):  # other batch/token counts: the graph is dynamic
        got = run(sess, (xi,))[0]
        torch.testing.assert_close(torch.as_tensor(got), _direct_per_token(xi, bits, symmetric) * 2.0, rtol=0, atol=1e-5)
    assert abs(run(sess, (x,))[0] - want).max() <= 1e-5
    rep = lint(str(path))
    assert not rep.ok and {v.rule for v in rep.violations} == {"constant-scale"}
    census = qdq_census(__import__("onnx").load(str(path)))
    assert census["QuantizeLinear"] == 1 and census["ReduceMax"] == 1 and census["ReduceMin"] == 1


def test_dynamic_quantize_linear_matches_its_onnx_definition_on_onnxruntime(tmp_path):
    x = _inputs()
    path = _export(_TensorFQ(), x, tmp_path, "u8")
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255
    zp = min(max(round(-lo / scale), 0), 255)
    direct = ((torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale) * 2.0
    torch.testing.assert_close(_TensorFQ()(x), direct, rtol=0, atol=1e-5)
    got = torch.as_tensor(run(make_session(path, "reference"), (x,))[0])
    torch.testing.assert_close(got, direct, rtol=0, atol=1e-5)
    assert not torch.allclose(direct, x * 2.0, atol=1e-3)
    rules = {v.rule for v in lint(str(path)).violations}
    assert "forbidden-op" in rules


def test_tensor_granularity_is_dynamic_quantize_linear_and_refuses_other_grids():
    _, gm, _, pm = compile_graph(M.norm_mlp(), "canonicalize,dynamic-act-quant{granularity=tensor,symmetric=false}")
    assert pm.records[1]["stats"]["activations"] == 3
    assert sum(n.target is ops.DYNAMIC_TENSOR_FQ_U8 for n in gm.graph.nodes) == 3
    with pytest.raises(UserError, match="DynamicQuantizeLinear.*8 bits and symmetric=false"):
        compile_graph(M.norm_mlp(), "canonicalize,dynamic-act-quant{granularity=tensor}")
    with pytest.raises(UserError, match="DynamicQuantizeLinear"):
        compile_graph(M.norm_mlp(), "canonicalize,dynamic-act-quant{granularity=tensor,symmetric=false}", a_bits=6)


def test_dtwq_recipe_exports_the_tiny_var_to_onnx_with_parity(var_args):
    rc, out = _compile(var_args, "dtwq", "onnx")
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    onnx_r = r["onnx"] if "onnx" in r else r["export"]["onnx"]
    assert onnx_r["ort_reference_max_abs_diff"] < 1e-3
    lint_r = onnx_r["tensorrt_lint"]
    assert not lint_r["ok"]
    flagged = {v.split("(")[1].split(")")[0] for v in lint_r["violations"] if "[constant-scale]" in v}
    assert len([v for v in lint_r["violations"] if "[constant-scale]" in v]) == 2 * 9  # Q and DQ of 9 linears
    assert _passes(r)["dynamic-act-quant"]["stats"]["activations"] == 9
    assert flagged  # findings carry a module name
