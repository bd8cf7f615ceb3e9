"""tools.sensitivity on builtin:tiny-block, and the data behind the report's plots."""
import json

import pytest
import torch

import tools.compile as compile_tool
from calib.observers import TensorObserver
from compiler.driver import quantize
from frontends import load_model
from passes.analysis import (
    PreQDQSnapshot,
    StatsHistory,
    channel_absmax,
    group_absmax,
    output_sqnr_db,
    site_sqnr,
)
from passes.infra import PassContext
from tools.sensitivity import main


def test_outlier_fed_sites_rank_worst_and_excluding_them_raises_sqnr(tmp_path, capsys):
    listing = tmp_path / "exclude.txt"
    assert main(["builtin:tiny-block", "--recipe", "minmax", "--out", str(listing), "--top", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    ranked = [line.split()[1] for line in table[1:]]
    assert set(ranked[:2]) == {"attn.qkv", "fc1"}  # the LayerNorm outputs with the 20x channels feed these two
    sites = [line.split("#")[0].strip() for line in listing.read_text().splitlines() if line.split("#")[0].strip()]
    assert sites == ranked[:2]

    sqnr = {}
    for name, extra in (("all", []), ("excluded", ["--exclude-file", str(listing)])):
        out = tmp_path / name
        assert compile_tool.main(["builtin:tiny-block", "--recipe", "minmax", "--target", "torch", "--out", str(out), "--no-site-sqnr", *extra]) == 0
        sqnr[name] = json.loads((out / "report.json").read_text())["fidelity"]["min_sqnr_db"]
    assert sqnr["excluded"] > sqnr["all"] + 6, sqnr  # measured: 16.2 -> 35.7 dB on the calibration batches


def test_site_sqnr_equals_a_compile_that_quantizes_only_that_site():
    bundle = load_model("builtin:tiny-block")
    snap = PreQDQSnapshot()
    fp_gm, _, ctx, _ = quantize(bundle, "canonicalize,observe,act-quant,weight-quant,insert-qdq", "W8A8",
                                             bundle.calib_inputs, instruments=[snap])
    batches = [bundle.example_inputs]
    sens = site_sqnr(fp_gm, snap.gm, ctx, batches)
    others = [s for s in ctx.sites if s != "fc1"]
    _, only_fc1, _, _ = quantize(bundle, "canonicalize,observe,act-quant,weight-quant,insert-qdq", "W8A8",
                                              bundle.calib_inputs, exclude=others)
    with torch.no_grad():
        ref = [[fp_gm(*batches[0])]]  # tiny-block has one output
    assert sens["fc1"]["only"] == pytest.approx(output_sqnr_db(ref, only_fc1, batches), abs=1e-6)
    _, all_but_fc1, _, _ = quantize(bundle, "canonicalize,observe,act-quant,weight-quant,insert-qdq", "W8A8",
                                                 bundle.calib_inputs, exclude=["fc1"])
    assert sens["fc1"]["all_but"] == pytest.approx(output_sqnr_db(ref, all_but_fc1, batches), abs=1e-6)
    assert set(sens) == {"attn.qkv", "attn.proj", "fc1", "fc2"}


def test_plot_data_equals_observer_statistics():
    bundle = load_model("builtin:tiny-block")
    history = StatsHistory()
    seen: dict[str, TensorObserver] = {}

    class Keep:  # the first observers of fc1, before smoothing replaces them
        def start(self, pipeline):
            pass

        def after_pass(self, index, pass_, result, ctx: PassContext, record):
            if pass_.name == "observe" and "first" not in seen:
                seen["first"] = ctx.stats["fc1"]["input"]

        def finish(self, *a):
            pass

    _, _, ctx, _ = quantize(bundle, "canonicalize,observe,smooth,observe,act-quant,weight-quant,insert-qdq",
                                         "W8A8", bundle.calib_inputs, instruments=[history, Keep()])
    data = channel_absmax(history, "fc1")
    first, last = seen["first"], ctx.stats["fc1"]["input"]
    assert first is not last
    torch.testing.assert_close(data["before"], torch.maximum(first.min.abs(), first.max.abs()).float())
    torch.testing.assert_close(data["after"], torch.maximum(last.min.abs(), last.max.abs()).float())
    # the inputs themselves: max |x| per channel of fc1's input over the calibration batches, unfolded
    block = bundle.module
    with torch.no_grad():
        direct = torch.stack([block.norm2(x + block.attn(block.norm1(x))).abs().amax(dim=(0, 1))
                              for (x,) in bundle.calib_inputs]).amax(0)
    torch.testing.assert_close(data["before"], direct, rtol=1e-4, atol=1e-5)
    assert float(data["before"].max() / data["before"].median()) > 3 * float(data["after"].max() / data["after"].median())
    assert group_absmax(history) == {}  # tiny-block has no token groups


def test_compile_report_has_counts_plots_and_site_sqnr(tmp_path):
    out = tmp_path / "out"
    assert compile_tool.main(["builtin:tiny-block", "--recipe", "smoothquant", "--target", "torch", "--out", str(out), "--exclude", "fc2"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["quantized_counts"] == {"linear": {"W8A8": 3, "fp": 1}, "matmul": {"fp": 2}}  # recipe keeps attention FP
    assert set(r["site_sqnr_db"]) == {"attn.qkv", "attn.proj", "fc1"}
    assert min(r["site_sqnr_db"].values()) > r["fidelity"]["min_sqnr_db"] - 1  # one site alone hurts less than all
    assert r["plots"] == {"Per-channel activation ranges before/after folding": "channel_ranges.png",
                          "Per-site SQNR": "site_sqnr.png"}  # no token groups in tiny-block: no group plot
    md = (out / "report.md").read_text()
    for name in r["plots"].values():
        assert (out / name).stat().st_size > 10_000 and f"]({name})" in md
    assert "`fc2`" in md.split("## Exclusions")[1].split("##")[0]
