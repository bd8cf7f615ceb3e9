"""``--bits W4A6`` and ``W4A4``: 4-bit tensors with one scale per group of input channels (Shift-and-Sum's
groups of 128; ``qmath.group_size`` for narrow layers).

Weights: ``weight-quant`` gives each group of a row its own min-max grid (blocked scales ``[out, in/g]``);
activations at 4 bits: ``act-quant`` gives each group of input channels its own range. Both equal a direct
per-group computation, the ONNX export (per-axis DequantizeLinear on the reshaped codes, opset 19) matches
torch on onnxruntime, and the targets that cannot take groups refuse them in one line.
"""
from __future__ import annotations

import json

import models_folding as M
import onnx
import pytest
import torch

from backends.onnx_export import export_onnx
from backends.ort_runner import make_session, run
from core import qmath
from core.numerics import run_outputs
from core.qmath import PRECISIONS, Precision
from frontends import trace
from passes.infra import PassContext, PassManager, QuantConfig, get_attr
from tests.test_family_compile import _var
from tools.compile import main


def test_group_size_is_the_largest_divisor_up_to_the_group():
    assert qmath.group_size(384, 128) == 128 and qmath.group_size(96, 128) == 96
    assert qmath.group_size(80, 32) == 20 and qmath.group_size(64, 16) == 16 and qmath.group_size(7, 4) == 1
    assert PRECISIONS["W4A4"].groups(4) == 128 and PRECISIONS["W4A6"].groups(6) == 0
    assert PRECISIONS["W4A8"].groups(4) == 0  # W4A8 keeps per-channel weights


def _grouped(pipeline: str, precision: Precision):
    bundle = M.norm_mlp()
    gm = trace(bundle)
    ctx = PassContext(config=QuantConfig(precision), calib_inputs=list(bundle.calib_inputs), probe_inputs=bundle.example_inputs)
    fp = PassManager("canonicalize").run(trace(bundle), PassContext())
    return bundle, fp, PassManager(pipeline).run(gm, ctx), ctx


def test_grouped_weights_and_activations_are_direct_per_group_grids():
    precision = Precision("W4A4", 4, 4, 8)
    _, _, gm, ctx = _grouped("canonicalize,observe,act-quant,weight-quant", precision)
    linears = [s for s, site in ctx.sites.items() if site.kind == "linear"]
    assert linears
    for site in linears:
        w = get_attr(gm, f"{site}.weight").detach().float()
        g = qmath.group_size(w.shape[1], 8)
        qp = ctx.qparams[f"{site}.weight"]
        assert qp.granularity == "block" and qp.axis == 1 and tuple(qp.scale.shape) == (w.shape[0], w.shape[1] // g)
        expected = w.reshape(w.shape[0], -1, g).abs().amax(-1) / 7
        torch.testing.assert_close(qp.scale, expected.clamp(min=1e-8))
        back = qmath.dequantize(qmath.quantize(w, qp.scale, qp.zero_point, 1, -8, 7), qp.scale, qp.zero_point, 1)
        direct = (torch.clamp(torch.round(w.reshape(w.shape[0], -1, g) / expected[..., None]), -8, 7)
                  * expected[..., None]).reshape(w.shape)
        torch.testing.assert_close(back, direct)
        aq = ctx.qparams[f"{site}.input"]
        obs = ctx.stats[site]["input"]
        amax = torch.maximum(obs.min.neg(), obs.max).clamp(min=0).reshape(-1, g).amax(1)
        assert aq.bits == 4 and aq.granularity == "channel"
        torch.testing.assert_close(aq.scale, (amax / 7).repeat_interleave(g))
        assert aq.scale.reshape(-1, g).unique(dim=1).shape[1] == 1  # constant within each group
    assert any(ctx.qparams[f"{s}.weight"].scale.shape[1] > 1 for s in linears)  # several groups per row


def test_grouped_onnx_matches_torch_on_onnxruntime(tmp_path):
    bundle, fp, gm, _ = _grouped("canonicalize,observe,act-quant,weight-quant,insert-qdq", Precision("W4A4", 4, 4, 8))
    path = export_onnx(gm, bundle.example_inputs, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {19}
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) >= 2
    got = run(make_session(path), bundle.example_inputs)
    ref = run_outputs(gm, bundle.example_inputs)
    assert max(float((torch.as_tensor(a) - b).abs().max()) for a, b in zip(got, ref)) <= 1e-4
    # and it is quantized, coarse: 4-bit grids move the output
    assert float((ref[0] - run_outputs(fp, bundle.example_inputs)[0]).abs().max()) > 1e-3


def _compile(tmp_path, bits, target="onnx", recipe="minmax"):
    out = tmp_path / f"out_{bits}_{target}"
    rc = main([*_var(tmp_path), "--recipe", recipe, "--bits", bits, "--target", target, "--out", str(out),
               "--calib-samples", "1", "--calib-cache", str(tmp_path / "cache")])
    return rc, out


def test_var_w4a4_and_w4a6_compile_and_match_onnxruntime(tmp_path):
    for bits, act in (("W4A4", 4), ("W4A6", 6)):
        rc, out = _compile(tmp_path, bits)
        assert rc == 0
        r = json.loads((out / "report.json").read_text())
        q = r["qparams"]
        assert {v["bits"] for k, v in q.items() if k.endswith(".weight")} == {4}
        assert {v["granularity"] for k, v in q.items() if k.endswith(".weight")} == {"block"}
        assert {v["bits"] for k, v in q.items() if k.endswith(".input")} == {act}
        assert {v["granularity"] for k, v in q.items() if k.endswith(".input")} == ({"channel"} if act == 4 else {"tensor"})
        assert r["onnx"]["ort_reference_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("target", ["ort", "trt", "cuda"])
def test_targets_without_groups_refuse_w4a4(tmp_path, target, capsys):
    rc, out = _compile(tmp_path, "W4A4", target)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    line = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "W4A4" in line[0] and "group" in line[0], err


def test_torch_int8_lowering_keeps_grouped_weights_exact():
    """``lower_to_int8`` (the torch-int8 runner) leaves group-wise linears in float, dequantized per group."""
    import copy

    from backends.torch_int8 import lower_to_int8

    bundle, _, gm, _ = _grouped("canonicalize,observe,act-quant,weight-quant,insert-qdq", Precision("W4A6", 4, 6, 8))
    lowered, counts = lower_to_int8(copy.deepcopy(gm), dtype=torch.float32)
    assert counts["int8_linears"] == 0 and counts["float_linears"] >= 2
    for x in [bundle.example_inputs, *bundle.calib_inputs]:
        for a, b in zip(run_outputs(gm, x), run_outputs(lowered, x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
