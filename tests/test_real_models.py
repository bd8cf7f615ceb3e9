"""Issue 20, real trained models through torch.export: models of the kinds users bring, built here,
exported with ``torch.export`` and compiled as a user would (``model.pt2 --allow-pickle --calib-data``).

- an ``nn.MultiheadAttention`` pixel-GPT (packed ``in_proj_weight``, batch-first transposes);
- a BERT-style post-LN encoder (separate query/key/value; LayerNorm after each residual add) at
  W6A6, where several 6-bit Q nodes read one LayerNorm output;
- the default recipe (ptq4arvg) on a fixed-length model without a ``token_groups`` input;
- folding into post-LN LayerNorms (exact only with the residual restored) and the notes that say
  which regions were not folded and why;
- an exception inside an export ends in one ``error:`` line naming the stage and the module.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.numerics import relative_error, run_outputs
from core.qmath import Precision
from frontends import load_model, trace
from passes.infra import PassContext, PassManager, QuantConfig, get_attr
from tools.compile import main as compile_main

TOKENS, VOCAB, DIM = 16, 16, 32


class MHABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PixelGPT(nn.Module):
    """A causal pixel-GPT of ``nn.MultiheadAttention`` blocks over 16 tokens."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(TOKENS, DIM) * 0.1)
        self.layers = nn.ModuleList([MHABlock() for _ in range(2)])
        self.ln, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(TOKENS))  # -inf above the diagonal

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos
        for layer in self.layers:
            x = layer(x, self.mask)
        return self.head(self.ln(x))


class PostLNLayer(nn.Module):
    """BERT's layer: ``x = LN1(x + attn(x)); x = LN2(x + ffn(x))``, separate query/key/value."""

    def __init__(self, heads=2):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.proj, self.ln1 = nn.Linear(DIM, DIM), nn.LayerNorm(DIM)
        self.fc1, self.fc2, self.ln2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM), nn.LayerNorm(DIM)

    def forward(self, x):
        b, t, c = x.shape

        def split(y):
            return y.reshape(b, t, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        a = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1) @ v
        x = self.ln1(x + self.proj(a.transpose(1, 2).reshape(b, t, c)))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class PostLNEncoder(nn.Module):
    """``inp -> LN -> 2 post-LN layers -> head`` over 12 tokens of 8 features."""

    def __init__(self):
        super().__init__()
        self.inp, self.ln0 = nn.Linear(8, DIM), nn.LayerNorm(DIM)
        self.layers = nn.ModuleList([PostLNLayer() for _ in range(2)])
        self.head = nn.Linear(DIM, 4)

    def forward(self, x):
        x = self.ln0(self.inp(x))
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _encoder_inputs(g):
    x = torch.randn(2, 12, 8, generator=g)
    x[:, 0] *= 30.0  # position 0 is a "sink": a far wider range than the others
    return (x,)


def _export(tmp, name, model, make_inputs, batches=4):
    """``name.pt2`` (torch.export, as a user saves it) and ``name_calib.pt`` beside it."""
    g = torch.Generator().manual_seed(1)
    example = make_inputs(g)
    torch.export.save(torch.export.export(model, example), str(tmp / f"{name}.pt2"))
    torch.save([make_inputs(g) for _ in range(batches)], tmp / f"{name}_calib.pt")
    return str(tmp / f"{name}.pt2"), str(tmp / f"{name}_calib.pt")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    gpt = PixelGPT().eval()
    torch.manual_seed(0)
    enc = PostLNEncoder().eval()
    with torch.no_grad():  # trained LayerNorms have outlier channels: what SmoothQuant is for
        for i, ln in enumerate(m for m in enc.modules() if isinstance(m, nn.LayerNorm)):
            ln.weight[[i, 17 + i]] *= 12.0
    return {"gpt": _export(tmp, "gpt", gpt, lambda g: (torch.randint(0, VOCAB, (2, TOKENS), generator=g),)),
            "encoder": _export(tmp, "encoder", enc, _encoder_inputs)}


def _compile(capsys, tmp_path, model, calib, *args):
    out = tmp_path / "out"
    rc = compile_main([model, "--allow-pickle", "--calib-data", calib, "--out", str(out), "--no-site-sqnr", *args])
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text()) if rc == 0 else None
    return rc, err, report, out


def _assert_deployable(report, gemms):
    onnx_ = report["onnx"]
    assert onnx_["tensorrt_lint"]["ok"], onnx_["tensorrt_lint"]["violations"]
    assert set(gemms) <= set(onnx_["tensorrt_lint"]["int8_gemms"])
    assert onnx_["ort_reference_max_abs_diff"] < 1e-4  # onnxruntime runs what torch ran


# -- 1. nn.MultiheadAttention -----------------------------------------------------------------------

def test_multihead_attention_quantizes_and_exports(exported, capsys, tmp_path):
    rc, err, report, _ = _compile(capsys, tmp_path, *exported["gpt"])
    assert rc == 0, err
    for site in ("layers.0.attn.in_proj", "layers.0.attn.out_proj", "layers.1.attn.in_proj"):
        assert report["sites"][site]["quantized"] == ["input", "weight"]
    assert report["sites"]["layers.0.attn.in_proj"]["out"] == 3 * DIM  # the packed q/k/v weight
    _assert_deployable(report, ["layers.0.attn.in_proj", "layers.0.attn.out_proj", "layers.1.fc2", "head"])
    assert report["fidelity"]["min_sqnr_db"] > 25


def test_packed_in_proj_is_a_folding_sink_through_the_batch_first_transpose(exported):
    """MHA transposes batch-first inputs before in_proj; the transpose keeps the channel axis."""
    b = load_model(exported["gpt"][0], allow_pickle=True)
    ctx = PassContext(probe_inputs=b.example_inputs)
    pm = PassManager("canonicalize,find-regions")
    pm.run(trace(b), ctx)
    table = {r["source"]: r["sinks"] for r in pm.records[1]["stats"]["table"]}
    assert table["layers.0.ln1"] == ["layers.0.attn.in_proj"] and table["layers.1.ln2"] == ["layers.1.fc1"]
    assert table["ln"] == ["head"]


def test_sequence_first_inputs_are_never_position_grouped_even_when_batch_equals_tokens(exported):
    """In MHA, in_proj sees [T, B, C]: with a batch of 16 = T its axis -2 looks like a token axis."""
    from passes.canonicalize import Canonicalize
    from passes.position_groups import token_axis_sites

    torch.manual_seed(0)
    square = (torch.randint(0, VOCAB, (TOKENS, TOKENS)),)  # batch 16 of 16 tokens
    ep = torch.export.export(PixelGPT().eval(), square)
    ctx = PassContext()
    gm = Canonicalize()(ep.module(), ctx).gm
    tokens, sites = token_axis_sites(gm, square, set(ctx.sites))
    assert tokens == TOKENS
    assert sorted(sites) == ["head", "layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2"]


# -- 2. W6A6 on a BERT-style encoder ------------------------------------------------------------------

def test_w6a6_post_ln_encoder_is_valid_onnx_and_notes_every_unfolded_region(exported, capsys, tmp_path):
    """Several 6-bit Q nodes read one LayerNorm (query, key, value): the exported model loads in
    onnxruntime and matches torch. SmoothQuant cannot fold into the post-LN LayerNorms, and the
    report says so for each of them (part 4b)."""
    rc, err, report, out = _compile(capsys, tmp_path, *exported["encoder"], "--recipe", "smoothquant", "--bits", "W6A6")
    assert rc == 0, err
    _assert_deployable(report, ["layers.0.query", "layers.0.key", "layers.0.value", "layers.1.fc1"])
    unfolded = {"ln0": "layers.0.query, layers.0.key, layers.0.value", "layers.0.ln1": "layers.0.fc1",
                "layers.0.ln2": "layers.1.query, layers.1.key, layers.1.value", "layers.1.ln1": "layers.1.fc1"}
    md = (out / "report.md").read_text()
    for source, sinks in unfolded.items():
        note = next(n for n in report["notes"] if n.startswith(f"{source}: cannot fold into {sinks}: output also feeds add"))
        assert "compensate=true" in note and note in md
    smooth = next(p for p in report["passes"] if p["name"] == "smooth")
    assert list(smooth["stats"]["smooth_scale"]) == ["layers.1.ln2 -> head"]  # the one plain fold possible


@pytest.mark.parametrize("bits", [6, 4])
def test_reduced_bit_q_nodes_sharing_an_input_export_to_loadable_onnx(tmp_path, bits):
    """The exporter's optimizer named the bounds of a scalar Min(Max(x)) '<x>_min' per Q node; three on
    one tensor collided and the renamed ones were never emitted. Per-tensor bounds are a Clip now."""
    import numpy as np
    import torch.fx as fx

    from backends.onnx_export import export_onnx
    from backends.ort_runner import make_session, run
    from core import qmath
    from passes import ops

    root = nn.Module()
    g = fx.Graph()
    x = g.placeholder("x")
    h = g.call_function(torch.relu, (x,))
    qmin, qmax = qmath.qrange(bits)
    outs = []
    for i, (lo, hi) in enumerate([(-1.0, 2.0), (-1.0, 2.0), (-3.0, 1.0)]):
        s, z = qmath.qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits, False)
        root.register_buffer(f"s{i}", s)
        root.register_buffer(f"z{i}", z)
        sa, za = g.get_attr(f"s{i}"), g.get_attr(f"z{i}")
        outs.append(g.call_function(ops.DQ, (g.call_function(ops.Q, (h, sa, za, 0, qmin, qmax)), sa, za, 0)))
    g.output(tuple(outs))
    gm = fx.GraphModule(root, g)
    inp = torch.randn(3, 8) * 4
    path = export_onnx(gm, (inp,), tmp_path / "m.onnx")
    got = run(make_session(path, "reference"), (inp,))
    for a, b in zip(got, gm(inp)):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-6)


# -- 3. the default recipe on a generic fixed-length model --------------------------------------------

def test_default_recipe_derives_token_groups_from_positions(exported, capsys, tmp_path):
    rc, err, report, _ = _compile(capsys, tmp_path, *exported["encoder"], "--recipe", "ptq4arvg")
    assert rc == 0, err
    note = next(n for n in report["notes"] if n.startswith("stwq: the model has no token_groups input"))
    assert "derived from the 12 token positions" in note and "same octave" in note
    stwq = next(p for p in report["passes"] if p["name"] == "stwq")
    groups = stwq["stats"]["position_groups"]
    assert groups["inp"] == "{0}, {1-11}"  # the sink position gets its own grid
    assert len(groups) == stwq["stats"]["token_wise"] == 14  # every linear has the token axis
    assert report["qparams"]["inp.input"]["granularity"] == "group"
    _assert_deployable(report, ["inp", "layers.0.query", "head"])


def test_family_token_groups_are_kept():
    b = load_model("tests/models_generic.py:grouped_block")
    ctx = PassContext(calib_inputs=b.calib_inputs)
    PassManager("canonicalize,observe,stwq,insert-qdq").run(trace(b), ctx)
    assert ctx.qparams["embed.input"].scale.shape == (3,)  # the model's 3 groups, not its 9 positions
    assert not any("derived from" in n for n in ctx.notes)


def test_one_grid_per_position_on_request(exported):
    b = load_model(exported["encoder"][0], allow_pickle=True)
    calib = torch.load(exported["encoder"][1])
    ctx = PassContext(calib_inputs=calib, probe_inputs=b.example_inputs)
    PassManager("canonicalize,observe,stwq{max-position-groups=0},insert-qdq").run(trace(b), ctx)
    scales = ctx.qparams["layers.0.fc1.input"].scale
    assert scales.shape == (12,) and scales.unique().numel() == 12
    assert "one grid per position" in ctx.notes[-1]


# -- 4. folding into post-LN LayerNorms ----------------------------------------------------------------

COMPENSATED = "canonicalize,observe,smooth{compensate=true},sym-shift{compensate=true},observe,gps{compensate=true}"


def test_compensated_folds_into_post_ln_layer_norms_keep_fp_outputs(exported):
    b = load_model(exported["encoder"][0], allow_pickle=True)
    calib = torch.load(exported["encoder"][1])
    fp = trace(b)
    ctx = PassContext(config=QuantConfig(Precision("W6A6", 6, 6)), calib_inputs=calib, probe_inputs=b.example_inputs)
    pm = PassManager(COMPENSATED)
    gm = pm.run(copy.deepcopy(fp), ctx)
    for record in pm.records:
        if record["name"] in ("smooth", "sym-shift", "gps"):
            assert record["stats"]["regions"] == 5, record  # 4 post-LN LayerNorms (restored) + ln2 -> head
            assert record["probe_rel_err"] < 1e-5
    assert max(relative_error(run_outputs(fp, x), run_outputs(gm, x)) for x in [b.example_inputs, *calib]) < 1e-5
    assert not torch.allclose(get_attr(gm, "layers.0.query.weight"), get_attr(fp, "layers.0.query.weight"))
    restore = get_attr(gm, "layers.0.query.input_restore_scale")
    assert restore.shape == (DIM,) and not torch.allclose(restore, torch.ones(DIM))
    restores = [n for n in gm.graph.nodes if n.target is torch.addcmul]
    assert len(restores) == 4  # one per compensated region, updated by each later fold
    assert sum("with a per-channel multiply-add restoring the input of add" in n for n in ctx.notes) == 4


def test_compensated_folds_export_and_quantize(exported, capsys, tmp_path):
    pipeline = COMPENSATED + ",observe,stwq{method=mse},act-quant,weight-quant{method=mse},insert-qdq"
    rc, err, report, _ = _compile(capsys, tmp_path, *exported["encoder"], "--pipeline", pipeline, "--bits", "W6A6")
    assert rc == 0, err
    _assert_deployable(report, ["layers.0.query", "layers.1.fc1"])


# -- 5. an exception inside an export -----------------------------------------------------------------

def test_export_exception_is_one_error_line_naming_stage_and_module(exported, capsys, tmp_path, monkeypatch):
    """onnxruntime refusing the written model (as it did for issue 20's W6A6 export) is a bug of ours:
    one line naming the stage, the module and the cause; the partial output is kept."""
    import backends.ort_runner

    def refuse(path, mode):
        raise RuntimeError(f"Load model from {path} failed:Invalid model. Node input 'layer_norm_1_min_1' "
                           "is not a graph input, initializer, or output of a previous node.")

    monkeypatch.setattr(backends.ort_runner, "make_session", refuse)
    rc, err, _, _ = _compile(capsys, tmp_path, *exported["encoder"], "--bits", "W6A6")
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: export (--target onnx) failed at module layers.0.ln1 (node layer_norm_1): "
                               "RuntimeError: Load model from")
    assert (tmp_path / "out.failed" / "model.onnx").exists()


def test_pass_exception_names_the_pass_and_the_module(exported, capsys, tmp_path, monkeypatch):
    """The issue's MHA crash came out of weight-quant; any such bug names the pass and the module."""
    import passes.insert_qdq

    def boom(w, qp):
        raise RuntimeError("cannot quantize this weight")

    monkeypatch.setattr(passes.insert_qdq, "quantized_weight", boom)
    rc, err, _, _ = _compile(capsys, tmp_path, *exported["gpt"])
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: pass 'insert-qdq' failed after ['canonicalize', 'observe', 'act-quant', "
                               "'weight-quant'] at module layers.0.attn.in_proj (node linear): cannot quantize")
