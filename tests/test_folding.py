"""Scale-folding regions and the passes that fold into them: smooth, sym-shift, gps.

Each fold is checked three ways (style.md §5e): the regions found are the expected ones, the
weights really changed (the test is not vacuous), and the float outputs did not (relative
error below 1e-5, checked by the PassManager's probe and again directly here).
"""
from __future__ import annotations

import copy
import math

import models_folding as M
import pytest
import torch

from calib.observers import FoldedObserver, TensorObserver
from core.errors import UserError
from core.numerics import relative_error, run_outputs, sqnr_db
from core.qmath import Precision
from frontends import trace
from passes import gps, regions, smooth, sym_shift  # noqa: F401  (registers the passes)
from passes.infra import PassContext, PassManager, QuantConfig, get_attr

# model -> (factory, expected regions as (kind, source, sinks))
MODELS = {
    "tiny-block": (M.tiny_block, [("layernorm", "norm1", ["attn.qkv"]), ("layernorm", "norm2", ["fc1"])]),
    "llamagen": (M.llama_block, [("rmsnorm", "attention_norm", ["wqkv"]), ("rmsnorm", "ffn_norm", ["w1", "w3"])]),
    # VAR: gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_lin(cond).view(-1, 1, 6, C).unbind(2), C = 32
    "var": (M.var_tiny, [("adaln", "block.ada_lin.1[scale 64:96, shift 128:160]", ["block.mat_qkv"]),
                         ("adaln", "block.ada_lin.1[scale 96:128, shift 160:192]", ["block.fc1"]),
                         ("adaln", "head_nm.ada_lin.1[scale 0:32, shift 32:64]", ["head"])]),
    # RAR: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaLN_modulation(c).chunk(6, -1)
    "rar": (M.rar_tiny, [("adaln", "block.adaLN_modulation.1[scale 32:64, shift 0:32]", ["block.qkv"]),
                         ("adaln", "block.adaLN_modulation.1[scale 128:160, shift 96:128]", ["block.fc1"]),
                         ("adaln", "final.adaLN_modulation.1[scale 0:32, shift 32:64]", ["final.linear"])]),
    "linear-linear": (M.norm_mlp, [("layernorm", "norm", ["fc1"]), ("linear", "fc1", ["fc2"])]),
    "functional-norms": (M.mixed_norms, [("layernorm", "layer_norm", ["fc_a"]), ("rmsnorm", "rms", ["fc_b"])]),
}

# each folding pass, the statistic it records per sink, and what it must change in a sink
FOLDS = [("smooth", "smooth_scale", "weight"), ("sym-shift", "sym_shift", "bias"), ("gps", "gps_scale", "weight")]



def compile_graph(bundle, pipeline: str, w_bits: int = 8, a_bits: int = 8):
    """(FP graph, folded graph, ctx, manager); the manager checks preserves_numerics on the probe."""
    gm = trace(bundle)
    fp = copy.deepcopy(gm)
    ctx = PassContext(config=QuantConfig(Precision(f"W{w_bits}A{a_bits}", w_bits, a_bits)), calib_inputs=list(bundle.calib_inputs),
                      probe_inputs=bundle.example_inputs)
    pm = PassManager(pipeline)
    return fp, pm.run(gm, ctx), ctx, pm


def worst_rel_err(fp, gm, bundle) -> float:
    return max(relative_error(run_outputs(fp, x), run_outputs(gm, x)) for x in [bundle.example_inputs, *bundle.calib_inputs])


def op_count(gm) -> int:
    return sum(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes)


# -- regions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_regions_found(model):
    factory, expected = MODELS[model]
    _, _, ctx, pm = compile_graph(factory(), "canonicalize,find-regions")
    table = pm.records[1]["stats"]["table"]
    assert [(r["kind"], r["source"], r["sinks"]) for r in table] == expected
    assert not ctx.notes


def test_region_feeding_a_residual_add_is_rejected_with_reason():
    bundle = M.residual_norm()
    fp, gm, ctx, pm = compile_graph(bundle, "canonicalize,observe,smooth,sym-shift,gps")
    assert ctx.notes == [("norm: cannot fold into fc1: output also feeds add (add), which a fold would change "
                          "(compensate=true folds it with a per-channel multiply-add restoring that input)")]  # once
    assert not any(r["modified"] for r in pm.records[2:])
    assert torch.equal(get_attr(gm, "fc1.weight"), get_attr(fp, "fc1.weight"))


def test_region_with_a_tied_sink_weight_is_rejected_with_reason():
    bundle = M.tied_sink()
    _, _, ctx, pm = compile_graph(bundle, "canonicalize,observe,smooth")
    assert ctx.notes == ["norm: cannot fold into a: a.weight is shared with another part of the model"]
    assert pm.records[2]["stats"]["regions"] == 0


def test_modulation_whose_rows_feed_something_else_is_rejected_with_reason():
    _, _, ctx, pm = compile_graph(M.shared_shift(), "canonicalize,find-regions")
    assert pm.records[1]["stats"]["regions"] == 0
    assert len(ctx.notes) == 1 and ctx.notes[0].startswith("ada[scale 16:32, shift 0:16]: cannot fold into fc: its "
                                                           "modulation rows unsqueeze")
    assert "overlap rows used by" in ctx.notes[0]


# -- fold invariance and proof that each pass fired ------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_each_fold_preserves_outputs_and_fires(model):
    """smooth, sym-shift, gps run one after the other (observe between the shift and GPS, as
    the method does); each is checked against the graph just before it, and the chain
    against the FP graph: directly here, and by the manager's probe (preserves_numerics)."""
    factory, expected = MODELS[model]
    bundle = factory()
    fp, gm, ctx, _ = compile_graph(bundle, "canonicalize,observe")
    for fold, stat_key, changes in FOLDS:
        before = copy.deepcopy(gm)
        pm = PassManager(f"{fold},observe")
        gm = pm.run(gm, ctx)
        assert worst_rel_err(before, gm, bundle) < 1e-5, fold
        assert pm.records[0]["probe_rel_err"] < 1e-5 and pm.records[0]["stats"]["regions"] == len(expected), fold
        for _, _, sinks in expected:
            for site in sinks:
                assert ctx.stats[site][stat_key].shape == (get_attr(gm, f"{site}.weight").shape[1],)
                new = get_attr(gm, f"{site}.{changes}")
                old = dict(before.state_dict()).get(f"{site}.{changes}", torch.zeros_like(new))  # zeros: bias created
                assert not torch.allclose(new, old), (fold, site)
    assert worst_rel_err(fp, gm, bundle) < 1e-5


def test_folds_leave_no_runtime_op_except_new_per_channel_buffers():
    # AdaLN: the constant 1 of (1 + scale) becomes the buffer kappa; no op is added.
    fp, gm, _, _ = compile_graph(M.var_tiny(), "canonicalize,observe,smooth,sym-shift,observe,gps")
    assert op_count(gm) == op_count(fp)
    assert get_attr(gm, "block.mat_qkv.input_kappa").shape == (32,)
    assert get_attr(gm, "head.input_kappa").shape == (32,)
    assert get_attr(gm, "block.mat_qkv.bias").shape == (96,)  # created for the shift, as in the reference
    # RMSNorm gains a bias (one add each) when a shift is folded; scales add nothing.
    fp, gm, _, _ = compile_graph(M.llama_block(), "canonicalize,observe,smooth,gps")
    assert op_count(gm) == op_count(fp)
    fp, gm, _, _ = compile_graph(M.llama_block(), "canonicalize,observe,smooth,sym-shift,observe,gps")
    assert op_count(gm) == op_count(fp) + 2
    assert {"attention_norm.bias", "ffn_norm.bias", "wqkv.bias", "w1.bias", "w3.bias"} <= dict(gm.named_buffers()).keys()


# -- the formulas ------------------------------------------------------------------------------------

def test_smooth_scale_is_the_smoothquant_formula():
    fp, gm, ctx, _ = compile_graph(M.tiny_block(), "canonicalize,observe,smooth{alpha=0.6}")
    _, _, ref_ctx, _ = compile_graph(M.tiny_block(), "canonicalize,observe")  # max|X| of the FP graph
    x_max = ref_ctx.stats["fc1"]["input"].absmax().double().clamp(min=1e-6)
    w_max = get_attr(fp, "fc1.weight").abs().amax(0).double().clamp(min=1e-6)
    expected = (x_max**0.6 / w_max**0.4).clamp(min=1e-5)
    torch.testing.assert_close(ctx.stats["fc1"]["smooth_scale"].double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(get_attr(gm, "fc1.weight").double(), get_attr(fp, "fc1.weight").double() * expected)
    assert str(PassManager("smooth{alpha=0.6},smooth,sym-shift{formula=midpoint},gps")) == \
        "smooth{alpha=0.6},smooth,sym-shift{formula=midpoint},gps"


def _gps_reference(x: torch.Tensor, w: torch.Tensor, a_bits: int, w_bits: int) -> torch.Tensor:
    """method.md §3.2 written out: channel k's asymmetric min-max grid (range widened to hold 0,
    signed integers) for every channel, symmetric per-row min-max weights."""
    x, w = x.double(), w.double()
    rx = x.amax(0) - x.amin(0)
    rw = w.amax(0) - w.amin(0)
    k = int(rx.argmax())
    s_k = math.sqrt(rx[k] / rw[k])
    lo, hi = min(float(x[:, k].min()), 0.0), max(float(x[:, k].max()), 0.0)
    qmin, qmax = -(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1
    step = torch.tensor((hi - lo) / (qmax - qmin), dtype=torch.float32)
    zero = torch.clamp(torch.round(qmin - torch.tensor(lo, dtype=torch.float32) / step), qmin, qmax)
    xq = ((torch.clamp(torch.round(x.float() / step) + zero, qmin, qmax) - zero) * step).double()
    w_step = (w.float().abs().amax(1) / (2 ** (w_bits - 1) - 1))[:, None]
    wq = (torch.clamp(torch.round(w.float() / w_step), -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1) * w_step).double()
    a = x.pow(2).sum(0) * (w - wq).pow(2).sum(0)
    b = (x - xq).pow(2).sum(0) * wq.pow(2).sum(0)
    s = torch.ones_like(rx)
    for c in range(x.shape[1]):
        if c == k:
            s[c] = s_k
        elif b[c] != 0:
            s[c] = s_k * (a[c] / b[c]) ** 0.25
    return s


def test_gps_scales_match_an_independent_evaluation_of_the_formula():
    g = torch.Generator().manual_seed(3)
    channel_scale = torch.tensor([1.0, 2.0, 0.5, 8.0, 1.0, 3.0, 0.0, 1.5])  # channel 6 is all zeros: B = 0 -> s = 1
    channel_shift = torch.tensor([0.0, 1.0, -0.5, 2.0, 0.0, 0.0, 0.0, -3.0])
    batches = [torch.randn(3, 16, 8, generator=g) * channel_scale + channel_shift * (channel_scale > 0) for _ in range(2)]
    w = torch.randn(12, 8, generator=g)
    w[:, 2] *= 6.0
    bundle = M.identity_then_linear(batches, w)
    _, gm, ctx, pm = compile_graph(bundle, "canonicalize,observe,gps", a_bits=6, w_bits=6)

    expected = _gps_reference(torch.cat([b.reshape(-1, 8) for b in batches]), w, a_bits=6, w_bits=6)
    got = ctx.stats["fc"]["gps_scale"].double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    assert got[6] == 1.0 and pm.records[2]["stats"]["regions"] == 1
    # folded: the sink's columns are multiplied by s, the source's rows divided by it
    torch.testing.assert_close(get_attr(gm, "fc.weight").double(), w.double() * expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(get_attr(gm, "src.weight").double(), torch.diag(1 / expected), rtol=1e-4, atol=1e-6)


def test_sym_shift_is_the_reference_formula_and_centres_each_channel():
    bits = 8
    bundle = M.norm_mlp()
    _, _, before, _ = compile_graph(M.norm_mlp(), "canonicalize,observe")
    obs = before.stats["fc1"]["input"]
    step = (obs.max - obs.min).double() / (2**bits - 1)
    expected = step * (2 ** (bits - 1) - 1 - torch.round(-obs.min.double() / step))
    midpoint = (obs.max + obs.min).double() / 2
    assert bool(((midpoint - expected) >= -1e-6).all() and ((midpoint - expected) <= step * (1 + 1e-6)).all())

    _, _, ctx, _ = compile_graph(bundle, "canonicalize,observe,sym-shift,observe")
    torch.testing.assert_close(ctx.stats["fc1"]["sym_shift"].double(), expected, rtol=1e-5, atol=1e-6)
    after = ctx.stats["fc1"]["input"]  # re-observed: [-(2^(b-1)-1) step, 2^(b-1) step] up to rounding
    assert bool((after.min.double() >= -(2 ** (bits - 1) - 0.5) * step - 1e-5).all())
    assert bool((after.max.double() <= (2 ** (bits - 1) + 0.5) * step + 1e-5).all())

    _, _, mid, _ = compile_graph(M.norm_mlp(), "canonicalize,observe,sym-shift{formula=midpoint},observe")
    torch.testing.assert_close(mid.stats["fc1"]["input"].max, -mid.stats["fc1"]["input"].min, rtol=1e-4, atol=1e-5)


def test_folded_statistics_equal_a_new_observation():
    _, _, ctx, _ = compile_graph(M.tiny_block(), "canonicalize,observe,smooth")
    folded = ctx.stats["fc1"]["input"]
    _, _, fresh, _ = compile_graph(M.tiny_block(), "canonicalize,observe,smooth,observe")
    new = fresh.stats["fc1"]["input"]
    assert isinstance(folded, FoldedObserver) and isinstance(folded, TensorObserver)
    for a, b in ((folded.min, new.min), (folded.max, new.max), (folded.sumsq, new.sumsq)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="run 'observe' again"):
        folded.search_range(8, True)

    _, _, ctx, _ = compile_graph(M.tiny_block(), "canonicalize,observe,sym-shift")
    assert ctx.stats["fc1"]["input"].sumsq is None  # unknown after a shift; gps streams its own


def test_gps_without_observation_is_a_user_error():
    with pytest.raises(UserError, match="run 'observe' before 'gps'"):
        compile_graph(M.tiny_block(), "canonicalize,gps")


# -- the ordering claim: minmax < SmoothQuant < GPS, and where GPS's premise fails ------------------

QUANT = ",act-quant,weight-quant,insert-qdq"
ORDERING = {
    "minmax": "canonicalize,observe" + QUANT,
    "smoothquant": "canonicalize,observe,smooth,observe" + QUANT,
    "gps": "canonicalize,observe,smooth,sym-shift,observe,gps,observe" + QUANT,
}


def ordering_sqnr(bundle, held_out, pipelines: dict[str, str], **options) -> dict[str, float]:
    """Output SQNR (dB) against FP on ``held_out`` for each pipeline, each on a fresh copy."""
    sqnr = {}
    for name, pipeline in pipelines.items():
        fp, gm, _, _ = compile_graph(copy.deepcopy(bundle), pipeline, **options)
        ref = torch.cat([run_outputs(fp, x)[0].flatten() for x in held_out])
        got = torch.cat([run_outputs(gm, x)[0].flatten() for x in held_out])
        sqnr[name] = sqnr_db(ref, got)
    return sqnr


@pytest.mark.parametrize("bits", ["W8A8", "W6A6"])
def test_one_dominant_outlier_channel_orders_minmax_smoothquant_gps(bits, record_property):
    """The done-means of the passes: min-max < SmoothQuant < GPS by output SQNR, on the case
    GPS is derived for (method.md §3.3): ONE LayerNorm channel of gain 30 sets the per-tensor
    activation step (channel k) and the other 63 channels' gains spread over [1/4, 4]. fc2 is
    kept in float (its input has no foldable source, so every recipe quantizes it alike and it
    only dilutes the difference); per-tensor symmetric activations, per-channel symmetric
    weights; 8 calibration batches, 8 held-out batches, six seeds.

    Measured, GPS minus SmoothQuant: seeds 0-5 (asserted) W8A8 +0.4..+2.8 dB, mean +1.3,
    W6A6 +1.4..+2.5, mean +1.9; seeds 6-17 (a check run) W8A8 wins 11 of 12, mean +1.1,
    W6A6 wins all, mean +1.7. The one loss (seed 11, -1.5 dB) is range estimation, not the
    formula: held-out values pass the calibrated limit of channel k by 13 % after GPS against
    2 % after SmoothQuant, and on the calibration data itself GPS is +2.0 dB ahead. Min-max
    trails SmoothQuant by about 10 dB.

    The premises hold here and are checked: after GPS channel k still has the largest range
    (Remark 1). Where they fail GPS loses its edge: with four outliers of equal gain it ties
    (next test), and at W4A8 (not asserted; measured 20-22 dB for GPS and SmoothQuant, 22-25 dB
    for the symmetric shift alone) the 4-bit weight error makes the formula scale ordinary
    channels ~2.6x more than k, they take over the weight rows' maxima (rows set by column k
    drop from 50 % to 8 %) and every row's step grows, which the formula assumes does not happen.
    """
    w_bits, a_bits = int(bits[1]), int(bits[3])
    gains, losses = [], 0
    for seed in range(6):
        bundle = M.dominant_outlier_mlp(seed)
        g = torch.Generator().manual_seed(1000 + seed)
        held_out = [(torch.rand(4, 16, 64, generator=g) * 2 - 1,) for _ in range(8)]
        pipelines = {k: p.replace("canonicalize,", "canonicalize,exclude{patterns=[fc2]},") for k, p in ORDERING.items()}
        sqnr = ordering_sqnr(bundle, held_out, pipelines, w_bits=w_bits, a_bits=a_bits)
        for name, value in sqnr.items():
            record_property(f"sqnr_db_{name}_seed{seed}", round(value, 2))
        assert sqnr["minmax"] + 5 < sqnr["smoothquant"], (seed, sqnr)
        gains.append(sqnr["gps"] - sqnr["smoothquant"])
        losses += gains[-1] <= 0
    mean_gain = sum(gains) / len(gains)
    record_property("gps_minus_smoothquant_mean_db", round(mean_gain, 2))
    assert mean_gain > (0.75 if bits == "W8A8" else 1.0), gains
    assert losses <= (1 if bits == "W8A8" else 0), gains


def test_gps_keeps_channel_k_the_widest_on_the_dominant_outlier_case():
    """Remark 1 of method.md §3.3, the premise the ordering test relies on: after GPS the
    channel that had the largest range still has it (measured 9.6 vs at most 5.0)."""
    bundle = M.dominant_outlier_mlp(0)
    before, after = (compile_graph(copy.deepcopy(bundle), p)[2].stats["fc1"]["input"] for p in
                     ("canonicalize,observe,smooth,sym-shift,observe", "canonicalize,observe,smooth,sym-shift,observe,gps,observe"))
    k = int(torch.argmax(before.max - before.min))
    ranges = after.max - after.min
    assert int(torch.argmax(ranges)) == k
    assert ranges[k] > 1.5 * torch.cat([ranges[:k], ranges[k + 1:]]).max()


def test_four_equal_outliers_minmax_loses_and_gps_ties_smoothquant(record_property):
    """Where GPS's premise fails: four LayerNorm channels of gain 30 and offsets in [0, 2],
    Gaussian inputs, the whole block quantized at W8A8; SQNR on 8 held-out batches.

    Measured: minmax 29.4 dB, SmoothQuant 34.5 dB, GPS (smooth, sym-shift, gps) 34.0 dB; with
    16 calibration batches 34.36 vs 34.34, at W6A6 23.05 vs 22.93. After SmoothQuant the four
    outliers have near-equal ranges, GPS scales the three that are not k by its formula and
    the largest ``Rx_c / s_c`` ends up about 1.5x ``Rx_k / s_k``, so the per-tensor step grows
    (Remark 1 fails). Only what the runs show is asserted: minmax is clearly last, GPS stays
    within 1 dB of SmoothQuant.
    """
    g = torch.Generator().manual_seed(7)
    held_out = [(torch.randn(4, 16, 64, generator=g),) for _ in range(8)]
    bundle = M.outlier_mlp()
    bundle.calib_inputs = [(torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(100 + i)),)
                           for i in range(8)]
    sqnr = ordering_sqnr(bundle, held_out, ORDERING)
    for name, value in sqnr.items():
        record_property(f"sqnr_db_{name}", round(value, 2))
    assert sqnr["minmax"] + 3 < sqnr["smoothquant"], sqnr
    assert sqnr["minmax"] + 3 < sqnr["gps"], sqnr
    assert sqnr["gps"] > sqnr["smoothquant"] - 1.0, sqnr
