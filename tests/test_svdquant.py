"""``svd-lowrank`` / the ``svdquant`` recipe: SVDQuant's float low-rank branch + quantized residual.

It fires on every linear, leaves the FP outputs unchanged, splits W = L1 L2 + R exactly with L1 L2
the truncated SVD, the quantized graph equals a direct torch computation of the two branches, a
low-rank outlier weight quantizes better with the branch, and the recipe exports the tiny VAR to
ONNX that matches onnxruntime and passes the TensorRT lint.
"""
from __future__ import annotations

import copy
import json

import models_folding as M
import pytest
import torch
import torch.nn.functional as F

from core import qmath
from core.errors import UserError
from core.numerics import sqnr_db
from passes.infra import get_attr
from passes.svdquant import low_rank_split
from tests.test_baselines import _compile, _passes, var_args  # noqa: F401  (fixture)
from tests.test_folding import MODELS, compile_graph, worst_rel_err


@pytest.mark.parametrize("model", ["tiny-block", "var", "llamagen", "linear-linear"])
def test_svd_lowrank_fires_and_preserves_outputs(model):
    bundle = MODELS[model][0]()
    fp, before, ctx, _ = compile_graph(bundle, "canonicalize,observe,smooth")
    smoothed = {n: get_attr(before, s.weight or f"{n}.weight").detach().clone().double() for n, s in ctx.sites.items()
                if s.kind == "linear"}
    from passes.infra import PassManager
    pm = PassManager("svd-lowrank{rank=3}")
    gm = pm.run(copy.deepcopy(before), ctx)
    rec = pm.records[0]
    assert rec["modified"] and rec["probe_rel_err"] < 1e-5 and worst_rel_err(fp, gm, bundle) < 1e-5
    assert set(rec["stats"]["sites"]) == set(smoothed)
    for site, w in smoothed.items():
        l1 = get_attr(gm, f"{site}.lowrank_up").double()
        l2 = get_attr(gm, f"{site}.lowrank_down").double()
        r = get_attr(gm, ctx.sites[site].weight or f"{site}.weight").double()
        assert l1.shape == (w.shape[0], 3) and l2.shape == (3, w.shape[1])
        torch.testing.assert_close(l1 @ l2 + r, w, rtol=0, atol=1e-5)  # W = L1 L2 + R
        s = torch.linalg.svdvals(w)
        # Eckart-Young: the residual holds exactly the singular values past the rank
        assert r.pow(2).sum().item() == pytest.approx(s[3:].pow(2).sum().item(), rel=1e-4)
        torch.testing.assert_close(torch.linalg.svdvals(l1 @ l2)[:3], s[:3], rtol=1e-5, atol=1e-6)


def _outlier_weight_bundle():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.05
    w += 3.0 * torch.outer(torch.randn(48, generator=g), (torch.rand(64, generator=g) < 0.05).float())  # rank-1 outliers
    xs = [torch.randn(4, 8, 64, generator=g) for _ in range(4)]
    return M.identity_then_linear(xs, w)


def test_quantized_graph_is_the_two_branches_computed_directly():
    bundle = _outlier_weight_bundle()
    fp, gm, ctx, _ = compile_graph(bundle, "canonicalize,observe,svd-lowrank{rank=2},act-quant,weight-quant,insert-qdq",
                                   w_bits=4, a_bits=8)
    x = bundle.example_inputs[0]

    def direct_linear(inp, lin, site):  # quantized residual on the quantized input + the float branch
        l1, l2, r = low_rank_split(lin.weight, 2)
        return (F.linear(qmath.fake_quant(inp, ctx.qparams[f"{site}.input"]),
                         qmath.fake_quant(r.float(), ctx.qparams[f"{site}.weight"]), lin.bias)
                + F.linear(F.linear(inp, l2.float()), l1.float()))

    l1, _, _ = low_rank_split(bundle.module.fc.weight, 2)
    torch.testing.assert_close(get_attr(gm, "fc.lowrank_up"), l1.float())
    direct = direct_linear(direct_linear(x, bundle.module.src, "src"), bundle.module.fc, "fc")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), direct, rtol=1e-5, atol=1e-5)
        # the branch absorbed the outliers: the 4-bit residual is far closer to FP than 4-bit W
        _, plain, _, _ = compile_graph(_outlier_weight_bundle(), "canonicalize,observe,act-quant,weight-quant,insert-qdq",
                                       w_bits=4, a_bits=8)
        ref = fp(x)
        assert sqnr_db(ref, gm(x)) > sqnr_db(ref, plain(x)) + 6.0


def test_rank_must_be_positive():
    with pytest.raises(UserError, match="rank must be at least 1"):
        compile_graph(M.norm_mlp(), "canonicalize,svd-lowrank{rank=0}")


def test_svdquant_recipe_exports_the_tiny_var_to_onnx(var_args):
    rc, out = _compile(var_args, "svdquant", "onnx")
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    svd = _passes(r)["svd-lowrank"]
    assert svd["modified"] and svd["stats"]["linears"] == 9 and svd["probe_rel_err"] < 1e-5
    onnx_r = r["onnx"]
    assert onnx_r["ort_reference_max_abs_diff"] < 1e-3
    assert onnx_r["tensorrt_lint"]["ok"], onnx_r["tensorrt_lint"]["violations"]
    assert onnx_r["tensorrt_lint"]["float_gemms"] >= 2 * 9  # the branches stay float
    assert r["fidelity"]["min_sqnr_db"] > 10
