"""``repq`` (RepQ-ViT): per-channel post-norm grids reparameterised into per-tensor ones, and the
log-sqrt(2) quantizer of attention probabilities.

The fold keeps FP outputs; after it, the per-tensor grid quantizes code for code like the
per-channel grid on the original activation (a direct torch computation); the log-sqrt(2) op equals
RepQ-ViT's formula and exports to onnxruntime; the recipe compiles the tiny VAR to ONNX with parity.
"""
from __future__ import annotations

import copy
import json
import math

import models_folding as M
import pytest
import torch
import torch.fx as fx

from backends.onnx_export import export_onnx
from backends.ort_runner import make_session, run
from core import qmath
from core.qmath import QParams
from passes import ops
from passes.infra import PassManager
from tests.test_baselines import _compile, _passes, var_args  # noqa: F401  (fixture)
from tests.test_folding import MODELS, compile_graph, worst_rel_err


@pytest.mark.parametrize("model", ["tiny-block", "var", "rar", "llamagen", "linear-linear"])
def test_repq_reparam_fires_on_norms_and_preserves_outputs(model):
    factory, expected = MODELS[model]
    bundle = factory()
    fp, gm, ctx, _ = compile_graph(bundle, "canonicalize,observe")
    pm = PassManager("repq-reparam")
    gm = pm.run(gm, ctx)
    rec = pm.records[0]
    norms = [sinks for kind, _, sinks in expected if kind != "linear"]
    assert rec["modified"] and rec["stats"]["regions"] == len(norms)
    assert rec["probe_rel_err"] < 1e-5 and worst_rel_err(fp, gm, bundle) < 1e-5
    for sinks in norms:
        for site in sinks:
            qp = ctx.qparams[f"{site}.input"]
            assert qp.granularity == "tensor" and not qp.symmetric
    if model == "linear-linear":  # fc1 -> fc2 is a linear source: not a post-norm activation
        assert "fc2.input" not in ctx.qparams


def test_per_tensor_grid_after_the_fold_is_the_per_channel_grid_code_for_code():
    bundle = M.outlier_mlp()  # LayerNorm with a few huge-gain channels and per-channel offsets
    _, _, observed, _ = compile_graph(M.outlier_mlp(), "canonicalize,observe")
    obs = observed.stats["fc1"]["input"]
    s, z = qmath.qparams_from_range(obs.min, obs.max, 8, symmetric=False)
    assert s.max() / s.min() > 10  # the channels really need their own grids
    _, folded, ctx, _ = compile_graph(bundle, "canonicalize,observe,repq-reparam")
    qp = ctx.qparams["fc1.input"]
    assert float(qp.scale) == pytest.approx(float(s.double().mean()), rel=1e-6)
    assert int(qp.zero_point) == round(float(z.double().mean()))
    gm = PassManager("insert-qdq").run(copy.deepcopy(folded), ctx)
    lo, hi = qmath.qrange(8)
    for inputs in [bundle.example_inputs, *bundle.calib_inputs]:
        with torch.no_grad():
            x = bundle.module.norm(inputs[0])  # fc1's input in the original model
            x_folded = _site_input(folded, "fc1", inputs)  # ...and in the folded graph
        codes_channel = qmath.quantize(x, s, z, -1, lo, hi).int()
        codes_tensor = qmath.quantize(x_folded, qp.scale, qp.zero_point, 0, lo, hi).int()
        # code for code, but for float rounding on a .5 boundary (one code, rarely)
        assert (codes_channel - codes_tensor).abs().max() <= 1
        assert (codes_channel != codes_tensor).float().mean() < 1e-3
    # direct: the original model with fc1's input fake-quantized per channel (s_c, z_c)
    model = copy.deepcopy(bundle.module)
    per_channel = QParams(s, z, 8, False, "channel", -1)
    model.fc1.register_forward_pre_hook(lambda mod, args: (qmath.fake_quant(args[0], per_channel),))
    with torch.no_grad():
        for inputs in [bundle.example_inputs, *bundle.calib_inputs]:
            want, got = model(*inputs), gm(*inputs)
            close = torch.isclose(got, want, rtol=1e-4, atol=1e-4)
            assert close.float().mean() > 0.95  # a flipped code moves one token's row only
            assert not torch.allclose(got, bundle.module(*inputs), rtol=1e-3, atol=1e-3)
    # ...and a per-tensor grid on the unfolded activation is far worse
    _, plain, _, _ = compile_graph(M.outlier_mlp(), "canonicalize,observe,act-quant{symmetric=false},insert-qdq")
    x = bundle.example_inputs[0]
    with torch.no_grad():
        err_repq = (gm(x) - bundle.module(x)).pow(2).mean()
        err_plain = (plain(x) - bundle.module(x)).pow(2).mean()
    assert err_plain > 4 * err_repq


def _site_input(gm, site, inputs):
    """The first argument of the linear named ``site`` when ``gm`` runs on ``inputs``."""
    seen = {}

    class Grab(fx.Interpreter):
        def run_node(self, n):
            if n.meta.get("site") == site and n.op == "call_function":
                seen["x"] = self.env[n.args[0]]
            return super().run_node(n)

    Grab(gm).run(*inputs)
    return seen["x"]


def _repq_log_sqrt2(x, delta, bits):
    """RepQ-ViT's LogSqrt2Quantizer.quantize, as published (odd-code form)."""
    x_int = torch.round(-1 * (x / delta).log2() * 2)
    mask = x_int >= 2 ** bits
    x_q = torch.clamp(x_int, 0, 2 ** bits - 1)
    odd = (x_q % 2) * (math.sqrt(2) - 1) + 1
    out = 2 ** (-1 * torch.ceil(x_q / 2)) * odd * delta
    out[mask] = 0
    return out


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_log_sqrt2_op_equals_repq_vits_formula_and_onnxruntime(tmp_path, bits):
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(2, 3, 5, 40, generator=g) * 4, dim=-1)
    x[0, 0, 0, :3] = 0.0  # exact zeros (masked keys) -> 0
    delta = torch.tensor(float(x.max()))
    got = ops.log_sqrt2_fake_quant(x, delta, bits)
    torch.testing.assert_close(got, _repq_log_sqrt2(x, delta, bits), rtol=1e-6, atol=1e-7)
    kept = x >= delta * 2 ** (-(2 ** bits - 1) / 2)  # inside the grid: relative error <= 2^(1/4) - 1
    assert ((got[kept] - x[kept]).abs() / x[kept]).max() <= 2 ** 0.25 - 1 + 1e-6
    assert torch.equal(got[0, 0, 0, :3], torch.zeros(3))

    class M_(torch.nn.Module):
        def forward(self, p):
            return ops.log_sqrt2_fake_quant(p, delta, bits) * 3.0

    path = export_onnx(fx.symbolic_trace(M_()), (x,), tmp_path / "log.onnx", input_names=["p"], output_names=["y"])
    out = torch.as_tensor(run(make_session(path, "reference"), (x,))[0])
    torch.testing.assert_close(out, got * 3.0, rtol=1e-5, atol=1e-7)


def test_log2_softmax_fires_on_the_attention_probabilities_and_notes_when_absent():
    _, gm, ctx, pm = compile_graph(M.tiny_block(), "canonicalize,observe,act-quant{matmuls=true},log2-softmax,insert-qdq")
    stats = pm.records[3]["stats"]
    assert stats["matmuls"] == 1 and list(stats["delta"]) == ["attn.matmul2"]
    assert "attn.matmul2.a" not in ctx.qparams and "attn.matmul2.b" in ctx.qparams
    assert "attn.matmul1.a" in ctx.qparams  # q @ k^T keeps its uniform grids
    assert sum(n.target is ops.LOG_SQRT2_FQ for n in gm.graph.nodes) == 1
    _, _, ctx2, pm2 = compile_graph(M.norm_mlp(), "canonicalize,observe,log2-softmax")
    assert not pm2.records[2]["modified"] and any("log2-softmax" in n for n in ctx2.notes)


def test_repq_recipe_exports_the_tiny_var_to_onnx(var_args):
    rc, out = _compile(var_args, "repq", "onnx")
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    p = _passes(r)
    assert p["repq-reparam"]["stats"]["regions"] == 5 and p["repq-reparam"]["probe_rel_err"] < 1e-5
    assert p["log2-softmax"]["stats"]["matmuls"] == 2  # blocks.{0,1}.attn.matmul2
    assert r["onnx"]["ort_reference_max_abs_diff"] < 1e-3
    rules = {v.split("]")[0][1:] for v in r["onnx"]["tensorrt_lint"]["violations"]}
    assert rules <= {"gemm-fusion"}  # only attn @ V, whose probabilities are log-quantized in float
    assert r["fidelity"]["min_sqnr_db"] > 10
