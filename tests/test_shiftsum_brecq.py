"""The Shift-and-Sum configuration (recipe ``shiftsum-brecq``): its activation quantizers against direct
computations (split negative/positive scales, per-token groups, per-key grids, log2 attention), the recipe's
pieces firing on a tiny VAR, and the ONNX targets refusing it in one line."""
from __future__ import annotations

import models_folding as M
import torch

from core.qmath import Precision
from frontends import trace
from passes import ops
from passes.infra import PassContext, PassManager, QuantConfig
from passes.recipes import load_recipe
from tests.test_family_compile import _var
from tools.compile import main


def test_split_quantizer_has_separate_negative_and_positive_scales():
    x = torch.tensor([[-0.5, -0.1, 0.0, 0.3, 3.0], [-2.0, 0.2, 0.25, 0.5, 0.7]])
    got = ops.dynamic_fake_quant(x, 4, True, split=True)
    for row, out in zip(x, got):
        pos, neg = row.max() / 7, -row.min() / 8  # 4 bits: [0, 7] above zero, [-8, 0] below
        want = torch.where(row >= 0, torch.round(row / pos).clamp(0, 7) * pos, torch.round(row / neg).clamp(-8, 0) * neg)
        torch.testing.assert_close(out, want)
    # one shared scale would have rounded the small negatives of row 0 to zero
    assert got[0, 1] != 0 and ops.dynamic_fake_quant(x, 4, True)[0, 1] == 0


def test_grouped_and_per_key_grids_are_per_chunk():
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    got = ops.dynamic_fake_quant(x, 4, True, group=4)
    want = torch.cat([ops.dynamic_fake_quant(c, 4, True) for c in x.split(4, dim=-1)], -1)
    torch.testing.assert_close(got, want)
    kt = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(1))  # k^T: one grid per key (column)
    torch.testing.assert_close(ops.dynamic_fake_quant(kt, 4, True, dim=-2),
                               ops.dynamic_fake_quant(kt.transpose(-1, -2), 4, True).transpose(-1, -2))
    assert not torch.equal(ops.dynamic_fake_quant(kt, 4, True, dim=-2), ops.dynamic_fake_quant(kt, 4, True))


def test_log2_quantizer():
    a = torch.tensor([[0.5, 0.25, 0.2, 0.05, 0.0], [0.9, 0.1, 0.001, 0.0, 0.0]])
    got = ops.log2_fake_quant(a, 3)  # levels delta * 2^-q, q in [0, 7]
    d0, d1 = 0.5, 0.9
    want0 = [d0, d0 / 2, d0 * 2 ** -round(-torch.log2(torch.tensor(0.4)).item()), d0 * 2 ** -3, 0.0]
    q = round(-torch.log2(torch.tensor(0.001 / 0.9)).item())  # 10 >= 2^3: zero
    want1 = [d1, d1 * 2 ** -round(-torch.log2(torch.tensor(0.1 / 0.9)).item()), 0.0 if q >= 8 else 1.0, 0.0, 0.0]
    torch.testing.assert_close(got, torch.tensor([want0, want1]))


def test_recipe_pieces_fire_on_a_tiny_var_block():
    bundle = M.var_tiny()
    gm = trace(bundle)
    ctx = PassContext(config=QuantConfig(Precision("W4A4", 4, 4, 16)), calib_inputs=list(bundle.calib_inputs),
                      probe_inputs=bundle.example_inputs)
    pipeline = load_recipe("shiftsum-brecq").pipeline.replace("brecq,", "brecq{iters=5},")
    pm = PassManager(pipeline)
    gm = pm.run(gm, ctx)
    calls = [(n.target, n.args[1:], n.meta.get("created_by")) for n in gm.graph.nodes if n.op == "call_function"]
    # activations: the recipe's groups of 64, shrunk to the width (32) where narrower; fc2 (128 wide): 64, split
    per_token = sorted(args[2:4] for t, args, _ in calls if t is ops.DYNAMIC_GROUP_FQ and args[4] == -1)
    # (0: q of q @ k^T, per token; ada_lin inputs are 16 wide)
    assert per_token == [(0, False)] + [(16, False)] * 2 + [(32, False)] * 4 + [(64, True)]
    assert sum(t is ops.DYNAMIC_GROUP_FQ and args[4] == -2 for t, args, _ in calls) == 1  # k^T per key
    assert sum(t is ops.LOG2_FQ for t, _, _ in calls) == 1
    assert any(getattr(t, "__name__", "") == "shift_sum_values" for t, _, _ in calls)
    stats = {r["name"]: r["stats"] for r in pm.records}
    assert list(stats["brecq"]["per_block"]) == ["block", "head_nm", "head"] and stats["dynamic-act-quant"]["group"] == 64
    w = {k: v for k, v in ctx.qparams.items() if k.endswith(".weight")}
    assert {q.granularity for q in w.values()} == {"block"}  # weights: the precision's groups of 16
    assert {q.scale.shape[1] * 16 for q in w.values()} == {16, 32, 128}


def test_recipe_runs_on_torch_and_onnx_refuses_it(tmp_path, capsys):
    args = [*_var(tmp_path), "--recipe", "shiftsum-brecq", "--calib-samples", "1", "--calib-cache", str(tmp_path / "c"),
            "--pipeline", load_recipe("shiftsum-brecq").pipeline.replace("brecq,", "brecq{iters=3},")]
    assert main([*args, "--target", "torch", "--out", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    assert main([*args, "--target", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "simulation-only" in err[0] and not (tmp_path / "o").exists()
