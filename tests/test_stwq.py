"""STWQ: per-token-group scales, their TensorRT-legal lowering, and its exactness."""
import json

import numpy as np
import pytest
import torch

from backends.ort_runner import make_session, run
from backends.qdq_lint import lint
from core import qmath
from core.errors import UserError
from core.numerics import sqnr_db
from core.qmath import Precision
from frontends import load_model, trace
from passes import PassContext, PassManager
from passes.infra import QuantConfig
from tools.compile import main as compile_main

MODELS = "tests/models_generic.py"
STWQ = "canonicalize,observe,stwq,weight-quant,insert-qdq"
STWQ_ACT_ONLY = "canonicalize,observe,stwq,insert-qdq"


def _run(pipeline, bundle=None, a_bits: int = 8, group_maps=None, weight_format: str = "int8", w_bits: int = 8):
    b = bundle or load_model(f"{MODELS}:grouped_block")
    gm = trace(b)
    config = QuantConfig(Precision(f"W{w_bits}A{a_bits}", w_bits, a_bits), group_maps=group_maps or {},
                         weight_format=weight_format)
    ctx = PassContext(config=config, calib_inputs=b.calib_inputs or [b.example_inputs])
    return b, PassManager(pipeline).run(gm, ctx), ctx


def test_group_tables_follow_the_observed_groups():
    _, _, ctx = _run(STWQ)
    qp = ctx.qparams["embed.input"]
    assert qp.granularity == "group" and qp.scale.shape == (3,)
    assert qp.scale[0] > 10 * qp.scale[1]  # the sink token's grid is far coarser
    obs = ctx.stats["embed"]["input"]
    lo, hi = obs.group_min[1].min(), obs.group_max[1].max()
    s, z = qmath.qparams_from_range(lo, hi, 8, symmetric=False)
    assert float(qp.scale[1]) == pytest.approx(float(s)) and int(qp.zero_point[1]) == int(z)


def test_group_map_merges_groups():
    _, _, ctx = _run(STWQ, group_maps={"block.fc2": [0, 1, 1]})
    fc2, qkv = ctx.qparams["block.fc2.input"], ctx.qparams["block.attn.qkv.input"]
    assert fc2.scale[1] == fc2.scale[2]  # merged groups share one grid
    assert qkv.scale[1] != qkv.scale[2]


class _OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)

    def forward(self, x, token_groups):
        return self.lin(x)


@pytest.mark.parametrize("symmetric,bits", [(False, 8), (True, 8), (False, 6)])
def test_lowering_equals_true_per_token_quantization(symmetric, bits):
    """linear((clamp(round(x/s)+z) - z) * s, W, b) with each token's own s, z: what the lowered graph computes."""
    from frontends.generic import ModelBundle

    torch.manual_seed(0)
    m = _OneLinear().eval()
    groups = torch.tensor([0, 1, 1, 2, 2, 2])
    calib = [(torch.randn(2, 6, 16) * torch.tensor([20.0, 1, 1, 3, 3, 3])[:, None], groups) for _ in range(3)]
    b = ModelBundle("one", m, calib[0], calib_inputs=calib)
    _, gm, ctx = _run(f"canonicalize,observe,stwq{{symmetric={str(symmetric).lower()}}},insert-qdq", bundle=b,
                      a_bits=bits)
    qp = ctx.qparams["lin.input"]
    qmin, qmax = qmath.qrange(bits)
    x = torch.randn(2, 6, 16) * 4  # partly outside the calibrated ranges: clamping must agree
    s, z = qp.scale[groups][:, None], qp.zero_point[groups].float()[:, None]
    xq = (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s
    expected = torch.nn.functional.linear(xq, m.lin.weight, m.lin.bias)
    torch.testing.assert_close(gm(x, groups), expected, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(expected, m(x, groups), atol=1e-3)  # quantization did something


def test_stwq_beats_per_tensor_on_a_sink_token():
    b, stwq_gm, _ = _run(STWQ)
    _, tensor_gm, _ = _run("canonicalize,observe,act-quant{symmetric=false},weight-quant,insert-qdq")
    fp = trace(b)
    x, g = b.example_inputs
    with torch.no_grad():
        ref = fp(x, g)
        s_stwq, s_tensor = sqnr_db(ref, stwq_gm(x, g)), sqnr_db(ref, tensor_gm(x, g))
    assert s_stwq > s_tensor + 6, (s_stwq, s_tensor)


def test_stwq_onnx_is_tensorrt_legal_and_matches_torch(tmp_path):
    out = tmp_path / "o"
    assert compile_main([f"{MODELS}:grouped_block", "--pipeline", STWQ, "--bits", "W6A6", "--out", str(out)]) == 0
    rep = lint(out / "model.onnx")
    assert rep.ok, rep.summary()
    assert set(rep.quantized_gemms) == {"embed", "block.attn.qkv", "block.attn.proj", "block.fc1", "block.fc2"}
    r = json.loads((out / "report.json").read_text())
    assert r["onnx"]["ort_reference_max_abs_diff"] <= 1e-4
    b = load_model(f"{MODELS}:grouped_block")
    # a different token count and group layout runs on the same graph? (static export: same shape here)
    x, g = b.calib_inputs[0]
    got = run(make_session(out / "model.onnx"), (x, g))[0]
    ref_gm = trace(b)
    assert np.isfinite(got).all() and got.shape == tuple(ref_gm(x, g).shape)


def test_stwq_needs_token_groups_or_a_token_axis():
    b = load_model(f"{MODELS}:two_in_two_out")  # [B, C] inputs: no token axis to derive groups from
    with pytest.raises(UserError, match="token_groups input"):
        _run(STWQ, bundle=b)
    _, _, ctx = _run(STWQ, bundle=load_model(f"{MODELS}:block"))  # [B, T, C]: groups from the 8 positions
    assert ctx.qparams["fc1.input"].granularity == "group" and ctx.qparams["fc1.input"].scale.shape == (8,)
    assert "derived from the 8 token positions" in ctx.notes[-1]


def test_observe_without_histograms_is_enough_for_minmax_but_not_mse():
    _, _, ctx = _run("canonicalize,observe{histograms=false},stwq,insert-qdq")
    assert ctx.qparams["embed.input"].granularity == "group"
    obs = ctx.stats["embed"]["input"]
    assert float(obs.hist.counts.sum()) == 0 and float(obs.group_hist.counts.sum()) == 0  # nothing was binned
    with pytest.raises(UserError, match="needs histograms"):
        _run("canonicalize,observe{histograms=false},stwq{method=mse},insert-qdq")


def test_attention_operands_are_never_grouped():
    """Regression: k^T is [..., head_dim, L]; at the scale where T == head_dim it looked grouped."""
    from compiler.bench import _var_step_inputs
    from frontends import var as V
    from frontends.generic import ModelBundle

    torch.manual_seed(0)
    cfg = V.VARConfig(depth=1, width=32, heads=2, vocab_size=16, cvae=4, num_classes=4, patch_nums=(1, 2, 3, 4))
    assert cfg.head_dim == 16 == cfg.patch_nums[-1] ** 2  # the last scale's T equals head_dim
    model = V.VAR(cfg).eval()
    calib = [_var_step_inputs(model, s, 2, seed=s) for s in range(model.num_scales)]
    b = ModelBundle("var", V.VARStep(model).eval(), calib[-1], calib_inputs=calib)
    _, _, ctx = _run("canonicalize,observe{histograms=false},stwq,act-quant{matmuls=true},insert-qdq", bundle=b)
    assert not ctx.stats["blocks.0.attn.matmul1"]["b"].grouped
    assert ctx.stats["blocks.0.attn.mat_qkv"]["input"].grouped


def test_weight_mse_search_beats_minmax_per_row_on_outliers():
    from passes.quantize import PERCENTILES, mse_row_ranges

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4096, generator=g)
    w[:, 0] = 40.0  # one outlier per row: min-max wastes the grid on it
    qmin, qmax = qmath.qrange(4)

    def row_mse(lo, hi):
        s, z = qmath.qparams_from_range(lo, hi, 4, True)
        return (qmath.dequantize(qmath.quantize(w, s, z, 0, qmin, qmax), s, z, 0) - w).pow(2).mean(1)

    lo, hi = mse_row_ranges(w, 4, symmetric=True)
    mse, minmax = row_mse(lo, hi), row_mse(w.amin(1), w.amax(1))
    assert (mse <= minmax + 1e-12).all() and float(mse.mean()) < 0.5 * float(minmax.mean())
    # an independent check of row 3: the chosen range is one of the candidates, the best of them
    cands = [(torch.quantile(w[3], 1 - p), torch.quantile(w[3], p)) for p in PERCENTILES]
    errs = [float(row_mse(torch.full((16,), float(a)), torch.full((16,), float(b)))[3]) for a, b in cands]
    assert float(mse[3]) == pytest.approx(min(errs))


def test_weight_quant_method_option_in_a_pipeline():
    _, _, ctx_mm = _run("canonicalize,observe,stwq,weight-quant{bits=4},insert-qdq")
    _, _, ctx_mse = _run("canonicalize,observe,stwq,weight-quant{bits=4,method=mse},insert-qdq")
    a, b = ctx_mm.qparams["block.fc1.weight"].scale, ctx_mse.qparams["block.fc1.weight"].scale
    assert (b <= a + 1e-9).all() and (b < a).any()  # percentile ranges are never wider than min-max


def test_fp8_weight_grid_in_a_pipeline():
    """``weight_format="fp8"``: per-channel ``amax / 448``, E4M3 codes in the graph, DQ back within E4M3's step."""
    b, gm, ctx = _run("canonicalize,observe,stwq,weight-quant,insert-qdq", weight_format="fp8")
    fp = dict(trace(b).named_parameters())
    qp = ctx.qparams["block.fc1.weight"]
    w = fp["block.fc1.weight"].detach()
    assert qp.fp8 and qp.granularity == "channel" and qp.describe()["format"] == "fp8"
    assert torch.allclose(qp.scale, w.abs().amax(1) / 448)
    codes = dict(gm.named_buffers())["block.fc1.weight_fp8"]
    assert codes.dtype == torch.float8_e4m3fn and float(codes.float().abs().amax()) == 448.0
    assert not any(n.endswith(".weight_int8") for n, _ in gm.named_buffers())
    back = codes.float() * qp.scale[:, None]
    rel = (back - w).abs() / w.abs().clamp(min=1e-6)
    assert float(rel[w.abs() > qp.scale[:, None] * 2 ** -6].max()) <= 2 ** -4 + 1e-6  # E4M3's normals: 3 mantissa bits
    _, _, ctx_mse = _run("canonicalize,observe,stwq,weight-quant{method=mse},insert-qdq", weight_format="fp8")
    assert (ctx_mse.qparams["block.fc1.weight"].scale <= qp.scale + 1e-12).all()  # amax is the widest candidate


def test_fp8_weights_refuse_other_bit_widths():
    with pytest.raises(UserError, match="FP8 weights are 8-bit"):
        _run("canonicalize,observe,stwq,weight-quant,insert-qdq", weight_format="fp8", w_bits=6, a_bits=6)


def test_weight_mse_search_on_the_fp8_grid_keeps_the_best_candidate():
    from passes.quantize import PERCENTILES, mse_row_ranges

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4096, generator=g)

    def row_mse(amax):
        scale = qmath.fp8_scale(amax)
        return ((qmath.fp8_codes(w / scale[:, None]).float() * scale[:, None]) - w).pow(2).mean(1)

    lo, hi = mse_row_ranges(w, 8, True, fp8=True)
    chosen, full = row_mse(torch.maximum(-lo, hi)), row_mse(w.abs().amax(1))
    assert (chosen <= full).all()
    assert (chosen < full).sum() >= 3  # measured: 5 of the 8 rows clip a little (to 96-99 % of amax)
    cands = [torch.maximum(-torch.quantile(w, 1 - p, dim=1), torch.quantile(w, p, dim=1)) for p in PERCENTILES]
    assert torch.allclose(chosen, torch.stack([full] + [row_mse(c) for c in cands]).amin(0))
