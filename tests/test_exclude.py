"""Exclusions: module-path globs and op types, the `exclude` pass, the CLI flags and the family defaults."""
import json

import onnx
import pytest

from compiler.driver import quantize
from core.errors import UserError
from frontends import load_model, trace
from passes.exclude import match_patterns, with_exclude_pass
from passes.infra import PassContext, PassManager
from tools.compile import main

MODELS = "tests/models_generic.py"
SITES = {"attn.qkv", "attn.proj", "fc1", "fc2", "attn.matmul1", "attn.matmul2"}


@pytest.fixture(scope="module")
def sites():
    ctx = PassContext()
    PassManager("canonicalize").run(trace(load_model(f"{MODELS}:block")), ctx)
    assert set(ctx.sites) == SITES
    return ctx.sites


def test_glob_and_op_type_matching(sites):
    m = match_patterns(["attn.*", "fc?", "op:matmul", "op:linear", "fc2"], sites)
    assert set(m["attn.*"]) == {"attn.qkv", "attn.proj", "attn.matmul1", "attn.matmul2"}
    assert set(m["fc?"]) == {"fc1", "fc2"}
    assert set(m["op:matmul"]) == {"attn.matmul1", "attn.matmul2"}
    assert set(m["op:linear"]) == {"attn.qkv", "attn.proj", "fc1", "fc2"}
    assert m["fc2"] == ["fc2"]
    assert match_patterns(["FC2"], sites, strict=False) == {"FC2": []}  # case-sensitive, like module paths


def test_unmatched_pattern_is_an_error_with_a_hint(sites):
    with pytest.raises(UserError, match=r"'attn' .*'attn\.\*'"):
        match_patterns(["attn"], sites)
    with pytest.raises(UserError, match=r"'blocks\.\*\.ada_lin\.1' matches no quantization site.*fc1"):
        match_patterns(["blocks.*.ada_lin.1"], sites)
    with pytest.raises(UserError, match="unknown op type"):
        match_patterns(["op:conv"], sites)


def test_pipeline_gets_exclude_after_canonicalize():
    assert with_exclude_pass("canonicalize,observe,insert-qdq") == "canonicalize,exclude,observe,insert-qdq"
    assert with_exclude_pass("canonicalize,exclude,observe") == "canonicalize,exclude,observe"


def test_excluded_sites_get_no_qdq_in_the_graph():
    bundle = load_model(f"{MODELS}:block")
    pipeline = "canonicalize,observe,act-quant{matmuls=true},weight-quant,insert-qdq"
    _, gm, ctx, pm = quantize(bundle, pipeline, "W8A8", [bundle.example_inputs], exclude=["fc2", "op:matmul"])
    assert "exclude" in str(pm).split(",")
    assert {n: s.excluded_by for n, s in ctx.sites.items() if s.excluded_by} == {
        "fc2": "fc2", "attn.matmul1": "op:matmul", "attn.matmul2": "op:matmul"}
    assert not any(k.startswith(("fc2.", "attn.matmul")) for k in ctx.qparams)
    assert "fc1.input" in ctx.qparams and "attn.qkv.weight" in ctx.qparams
    record = next(r for r in pm.records if r["name"] == "exclude")
    assert record["stats"]["matches"]["op:matmul"] == ["attn.matmul1", "attn.matmul2"]
    assert "exclude 'fc2' matched 1 site: fc2" in ctx.notes
    qdq_names = {n.name for n in gm.graph.nodes if n.op == "call_function" and n.name.endswith(("_q", "_dq"))}
    assert not any(n.startswith(("fc2_", "attn_matmul")) for n in qdq_names)
    assert any(n.startswith("fc1_") for n in qdq_names)
    assert hasattr(gm.get_submodule("fc2"), "weight") and not hasattr(gm.get_submodule("fc2"), "weight_int8")


def test_compile_exclude_fc2(tmp_path, capsys):
    base, excl = tmp_path / "base", tmp_path / "excl"
    assert main([f"{MODELS}:block", "--out", str(base)]) == 0
    capsys.readouterr()
    assert main([f"{MODELS}:block", "--out", str(excl), "--exclude", "fc2"]) == 0
    err = capsys.readouterr().err
    assert "exclude 'fc2' matched 1 site: fc2" in err
    assert err.index("matched 1 site") < err.index("[2/4]")  # shown before calibration
    r0, r1 = (json.loads((d / "report.json").read_text()) for d in (base, excl))
    assert r1["sites"]["fc2"]["excluded_by"] == "fc2" and r1["sites"]["fc2"]["quantized"] == []
    assert r1["sites"]["fc1"]["excluded_by"] is None and r1["sites"]["fc1"]["quantized"] == ["input", "weight"]
    assert r1["onnx"]["QuantizeLinear"] == r0["onnx"]["QuantizeLinear"] - 1
    assert r1["onnx"]["DequantizeLinear"] == r0["onnx"]["DequantizeLinear"] - 2  # input and weight
    names = {i.name for i in onnx.load(str(excl / "model.onnx")).graph.initializer}
    assert "fc1.weight_int8" in names and not any(n.startswith("fc2.") and "scale" in n for n in names)
    md = (excl / "report.md").read_text()
    assert "| `fc2` | linear | - | fc2 |" in md and "- exclude 'fc2' matched 1 site: fc2" in md


def test_unmatched_pattern_exits_2(tmp_path, capsys):
    rc = main([f"{MODELS}:block", "--out", str(tmp_path / "o"), "--exclude", "fc1", "--exclude", "mlp.*"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'mlp.*' matches no quantization site" in err
    assert not (tmp_path / "o").exists()


def test_exclude_file_with_comments(tmp_path):
    f = tmp_path / "excl.txt"
    f.write_text("# keep the attention in float\nattn.*   # all of it\n\n  # nothing here\nop:matmul\n")
    out = tmp_path / "o"
    assert main([f"{MODELS}:block", "--out", str(out), "--exclude-file", str(f)]) == 0
    r = json.loads((out / "report.json").read_text())
    by = {n: s["excluded_by"] for n, s in r["sites"].items()}
    assert by == {"attn.qkv": "attn.*", "attn.proj": "attn.*", "attn.matmul1": "attn.*", "attn.matmul2": "attn.*",
                  "fc1": None, "fc2": None}
    assert r["exclude"]["op:matmul"] == ["attn.matmul1", "attn.matmul2"]
    assert r["onnx"]["QuantizeLinear"] == 2
    missing = main([f"{MODELS}:block", "--out", str(tmp_path / "p"), "--exclude-file", str(tmp_path / "nope.txt")])
    assert missing == 2


@pytest.fixture(scope="module")
def tiny_var(tmp_path_factory):
    from tests.test_family_compile import _var

    tmp = tmp_path_factory.mktemp("var")
    return tmp, [*_var(tmp), "--recipe", "minmax", "--calib-samples", "2", "--calib-cache", str(tmp / "cache")]


ADA = {"blocks.0.ada_lin.1", "blocks.1.ada_lin.1", "head_nm.ada_lin.1"}


def test_var_family_defaults(tiny_var, capsys):
    tmp, args = tiny_var
    assert main([*args, "--out", str(tmp / "d")]) == 0
    assert "(family default; --no-default-exclude to quantize)" in capsys.readouterr().err
    r = json.loads((tmp / "d" / "report.json").read_text())
    excluded = {n for n, s in r["sites"].items() if s["excluded_by"]}
    assert excluded == ADA
    assert all(r["sites"][n]["quantized"] == [] for n in ADA)
    assert r["sites"]["head_nm.ada_lin.1"]["excluded_by"] == "head_nm.ada_lin.1"
    assert r["onnx"]["tensorrt_lint"]["ok"]

    # --target torch: the ONNX side of exclusion is checked above; this keeps the test fast
    assert main([*args, "--out", str(tmp / "n"), "--no-default-exclude", "--target", "torch"]) == 0
    n = json.loads((tmp / "n" / "report.json").read_text())
    assert not any(s["excluded_by"] for s in n["sites"].values())
    assert all(n["sites"][s]["quantized"] == ["input", "weight"] for s in ADA)
    assert set(n["qparams"]) - set(r["qparams"]) == {f"{s}.{role}" for s in ADA for role in ("input", "weight")}
