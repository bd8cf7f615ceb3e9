"""Issue 19's first baselines: ``os+`` (os-plus), ``dtwq`` (dynamic-act-quant), ``litevar``.

Each new pass fires, a folding pass keeps the float outputs (the PassManager's probe and directly),
each agrees with a direct computation of its formula, and each recipe compiles the tiny VAR with
``--target torch`` (dtwq's ONNX export: tests/test_dtwq_export.py).
"""
from __future__ import annotations

import copy
import json

import models_folding as M
import pytest
import torch

from core import qmath
from core.qmath import QParams
from frontends import trace
from passes import ops
from passes.infra import PassManager, get_attr
from passes.os_plus import search_threshold, threshold_error
from tests.test_family_compile import _llamagen, _var
from tests.test_folding import MODELS, compile_graph, worst_rel_err
from tools.compile import main

# -- os-plus -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-block", "var", "rar", "llamagen", "linear-linear"])
def test_os_plus_fires_and_preserves_outputs(model):
    factory, expected = MODELS[model]
    bundle = factory()
    fp, gm, ctx, _ = compile_graph(bundle, "canonicalize,observe")
    before = copy.deepcopy(gm)
    pm = PassManager("os-plus")
    gm = pm.run(gm, ctx)
    record = pm.records[0]
    assert record["probe_rel_err"] < 1e-5 and record["stats"]["regions"] == len(expected)
    assert worst_rel_err(before, gm, bundle) < 1e-5 and worst_rel_err(fp, gm, bundle) < 1e-5
    for _, _, sinks in expected:
        for site in sinks:  # every sink got the shift's compensation b + W z
            new = get_attr(gm, f"{site}.bias")
            old = dict(before.state_dict()).get(f"{site}.bias", torch.zeros_like(new))
            assert not torch.allclose(new, old), site
            assert ctx.stats[site]["os_plus_scale"].min() >= 1.0


def test_os_plus_shift_and_scale_are_the_formula_on_observed_ranges():
    bundle = M.outlier_mlp()
    fp, _, observed, _ = compile_graph(bundle, "canonicalize,observe")
    fp, _, ctx, _ = compile_graph(M.outlier_mlp(), "canonicalize,observe,os-plus,observe")
    sites = [s for s in ctx.stats if "os_plus_scale" in ctx.stats[s]]
    assert sites
    scaled = 0
    for site in sites:
        obs = observed.stats[site]["input"]
        lo, hi = obs.min.double(), obs.max.double()
        half = (hi - lo) / 2
        t = ctx.stats[site]["os_plus_threshold"]
        w = get_attr(fp, f"{site}.weight").double()
        # t is the search's pick, computed here from the FP graph's weight and ranges
        assert t == pytest.approx(search_threshold(half, w, 8, 8))
        candidates = torch.quantile(half, torch.linspace(0, 1, 32, dtype=torch.float64))
        assert threshold_error(half, w, t, 8, 8) <= min(threshold_error(half, w, float(c), 8, 8) for c in candidates) + 1e-12
        torch.testing.assert_close(ctx.stats[site]["os_plus_shift"].double(), (hi + lo) / 2, rtol=1e-6, atol=1e-6)
        expected_scale = (half / t).clamp(min=1.0)
        torch.testing.assert_close(ctx.stats[site]["os_plus_scale"].double(), expected_scale, rtol=1e-6, atol=1e-6)
        scaled += int((expected_scale > 1).sum())
        # re-observed after the fold: each channel is centred, half-range min(h, t)
        new = ctx.stats[site]["input"]
        torch.testing.assert_close((new.max + new.min).double() / 2, torch.zeros_like(half), rtol=0, atol=1e-4)
        torch.testing.assert_close((new.max - new.min).double() / 2, half.clamp(max=t), rtol=1e-4, atol=1e-5)
    assert scaled > 0  # the outlier channels were squeezed, not only shifted


def test_os_plus_without_scaling_is_the_midpoint_shift():
    _, a, _, _ = compile_graph(M.norm_mlp(), "canonicalize,observe,os-plus{t=1e9}")
    _, b, _, _ = compile_graph(M.norm_mlp(), "canonicalize,observe,sym-shift{formula=midpoint}")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-6)


# -- dynamic-act-quant (dtwq) --------------------------------------------------------------------

def _direct_per_token(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = []
    for row in rows:
        scale, zp = qmath.qparams_from_range(row.min(), row.max(), bits, symmetric)
        out.append(qmath.fake_quant(row, QParams(scale, zp, bits, symmetric)))
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (6, True), (8, False), (4, False)])
def test_dynamic_token_fake_quant_equals_a_direct_per_token_computation(bits, symmetric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, generator=g)
    x[0, 3] *= 50  # an outlier token: only its own grid widens
    x[1, 2] = x[1, 2].abs() + 1  # an all-positive token: the range is widened to contain 0
    got = ops.dynamic_token_fake_quant(x, bits, symmetric)
    assert torch.equal(got, _direct_per_token(x, bits, symmetric))
    assert not torch.equal(got, x)


def test_dynamic_act_quant_pass_fires_and_matches_hooks_on_the_module():
    bundle = M.norm_mlp()
    _, gm, _, pm = compile_graph(bundle, "canonicalize,dynamic-act-quant", w_bits=8, a_bits=6)
    stats = pm.records[1]["stats"]
    assert pm.records[1]["modified"] and stats["activations"] == 3 and stats["bits"] == 6
    model = copy.deepcopy(bundle.module)
    for lin in (model.fc1, model.fc2, model.fc3):
        lin.register_forward_pre_hook(lambda mod, args: (_direct_per_token(args[0], 6, True),))
    with torch.no_grad():
        for inputs in [bundle.example_inputs, *bundle.calib_inputs]:
            torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-6, atol=1e-6)
            assert not torch.allclose(gm(*inputs), bundle.module(*inputs), rtol=1e-4, atol=1e-4)


# -- the recipes on the tiny VAR -------------------------------------------------------------------

@pytest.fixture(scope="module")
def var_args(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    return tmp, [*_var(tmp), "--calib-samples", "2", "--calib-cache", str(tmp / "cache")]


def _compile(var_args, recipe, target="torch"):
    tmp, args = var_args
    out = tmp / f"{recipe}-{target}"
    rc = main([*args, "--recipe", recipe, "--target", target, "--out", str(out)])
    return rc, out


def _passes(report):
    return {p["name"]: p for p in report["passes"]}


def test_litevar_keeps_the_post_gelu_fc_in_float(var_args):
    rc, out = _compile(var_args, "litevar")
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    fc2 = ["blocks.0.ffn.fc2", "blocks.1.ffn.fc2"]
    assert r["exclude"]["*.fc2"] == fc2
    assert not any(k.startswith(tuple(fc2)) for k in r["qparams"])
    assert "blocks.0.ffn.fc1.input" in r["qparams"]
    assert r["fidelity"]["min_sqnr_db"] > 10


def test_os_plus_recipe_compiles_the_tiny_var(var_args):
    rc, out = _compile(var_args, "os+")
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    assert r["recipe"] == "os+"
    os_plus = _passes(r)["os-plus"]
    assert os_plus["modified"] and os_plus["stats"]["regions"] == 5  # 2 blocks x (qkv, fc1) + head
    assert os_plus["probe_rel_err"] < 1e-5
    assert r["fidelity"]["min_sqnr_db"] > 10


def test_dtwq_recipe_compiles_for_torch(var_args):
    from backends.fx_graph import load_graph
    from frontends import load_model

    rc, out = _compile(var_args, "dtwq")
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    dyn = _passes(r)["dynamic-act-quant"]
    assert dyn["modified"] and dyn["stats"]["activations"] == 9  # 2 blocks x 4 linears + head (ada_lin excluded)
    assert not any(k.endswith(".input") for k in r["qparams"])  # no static activation grid
    assert r["fidelity"]["min_sqnr_db"] > 10
    _, args = var_args
    bundle = load_model(args[0], tokenizer=args[2])
    loaded = load_graph(out, trace(load_model(args[0], tokenizer=args[2])))  # graph.json rebuilds with the op
    assert any(n.target is ops.DYNAMIC_TOKEN_FQ for n in loaded.graph.nodes)
    with torch.no_grad():
        loaded(*bundle.example_inputs)


def test_litevar_on_a_swiglu_family_is_an_error_naming_the_pattern(tmp_path, capsys):
    args = _llamagen(tmp_path)
    rc = main([*args, "--recipe", "litevar", "--target", "torch", "--out", str(tmp_path / "out"),
               "--calib-samples", "2", "--calib-cache", str(tmp_path / "cache")])
    assert rc != 0
    assert "'*.fc2' matches no quantization site" in capsys.readouterr().err
