"""Pass infrastructure: pipeline text, manager behaviour, verification, provenance, dumps."""
import json
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx

from core.errors import PassError, UserError
from frontends import trace
from frontends.examples import tiny_block
from passes import PassContext, PassManager, PassResult, format_pipeline, parse_pipeline
from passes.dump import DumpInstrument
from passes.infra import Pass, register


@register
@dataclass
class _Scale(Pass):
    """Test pass: multiplies the first linear's weight; claims (falsely, if factor != 1) to preserve numerics."""

    name = "test-scale"
    preserves_numerics = True
    factor: float = 1.0

    def __call__(self, gm, ctx):
        for n in gm.graph.nodes:
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.Linear):
                with torch.no_grad():
                    gm.get_submodule(n.target).weight.mul_(self.factor)
                return PassResult(gm, self.factor != 1.0, {"scaled": n.target})
        return PassResult(gm, False)


@register
@dataclass
class _AddNode(Pass):
    """Test pass: appends a no-op node (x * 1.0) before the output."""

    name = "test-add-node"

    def __call__(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.mul, (out.args[0], 1.0))
        out.args = (new,)
        gm.recompile()
        return PassResult(gm, True, {"added": 1})


def _setup():
    b = tiny_block(dim=16, tokens=4)
    return trace(b), PassContext(calib_inputs=b.calib_inputs[:2], probe_inputs=b.example_inputs)


@pytest.mark.parametrize("text", [
    "canonicalize,observe,act-quant,weight-quant,insert-qdq",
    "canonicalize,act-quant{bits=6,symmetric=false,granularity=channel},insert-qdq",
    "test-scale{factor=2.5},test-add-node",
])
def test_pipeline_text_round_trips(text):
    """Options print in declaration order, so canonical text reads back to itself."""
    passes = parse_pipeline(text)
    assert format_pipeline(passes) == text
    assert format_pipeline(parse_pipeline(format_pipeline(passes))) == text


def test_pipeline_options_are_typed():
    (p,) = parse_pipeline("act-quant{bits=6,symmetric=false}")
    assert p.bits == 6 and p.symmetric is False
    assert parse_pipeline("act-quant{symmetric=true}")[0].spec() == "act-quant"  # defaults are not printed


@pytest.mark.parametrize("text,needle", [
    ("canonicalize,nope", "unknown pass 'nope'"),
    ("act-quant{bitz=6}", "has no option 'bitz'"),
    ("act-quant{bits=six}", "expected an integer"),
    ("act-quant{bits}", "key=value"),
])
def test_pipeline_errors_name_the_problem(text, needle):
    with pytest.raises(UserError, match=needle):
        parse_pipeline(text)


def test_stop_after_and_disable_pass():
    gm, ctx = _setup()
    pm = PassManager("test-scale{factor=1.0},test-add-node,test-add-node", stop_after="test-scale")
    pm.run(gm, ctx)
    assert [r["name"] for r in pm.records] == ["test-scale"]
    gm, ctx = _setup()
    pm = PassManager("test-scale,test-add-node", disabled=["test-add-node"])
    gm = pm.run(gm, ctx)
    assert pm.records[1]["skipped"] == "disabled"
    assert not any(n.target is torch.mul for n in gm.graph.nodes)
    with pytest.raises(UserError, match="not in the pipeline"):
        PassManager("test-scale", stop_after="insert-qdq")


def test_numeric_verification_catches_a_pass_that_lies():
    gm, ctx = _setup()
    with pytest.raises(PassError, match="must not change outputs"):
        PassManager("test-scale{factor=3.0}").run(gm, ctx)
    gm, ctx = _setup()
    pm = PassManager("test-scale{factor=1.0}")
    pm.run(gm, ctx)
    assert pm.records[0]["probe_rel_err"] == 0.0


def test_sqnr_recorded_for_quantizing_passes():
    gm, ctx = _setup()
    pm = PassManager("canonicalize,observe,act-quant,weight-quant,insert-qdq")
    pm.run(gm, ctx)
    rec = {r["name"]: r for r in pm.records}
    assert rec["canonicalize"]["probe_rel_err"] < 1e-6
    assert 5 < rec["insert-qdq"]["probe_sqnr_db"] < 60  # quantization noise: finite, not garbage


def test_pass_exception_names_pipeline_position():
    gm, ctx = _setup()
    ctx.calib_inputs = [(torch.randn(2, 4, 99),)]  # wrong width
    with pytest.raises(PassError, match=r"pass 'observe' failed after \['canonicalize'\]"):
        PassManager("canonicalize,observe").run(gm, ctx)


def test_provenance_and_dumps(tmp_path):
    gm, ctx = _setup()
    dumps = DumpInstrument(tmp_path)
    gm = PassManager("canonicalize,observe,act-quant,weight-quant,insert-qdq", instruments=[dumps]).run(gm, ctx)
    created = {n.name: n.meta["created_by"] for n in gm.graph.nodes}
    assert created["x"] == "trace"
    assert created["attn_qkv_input_q"] == "insert-qdq"
    assert created["fc1_weight_dq"] == "insert-qdq"
    assert any(v == "canonicalize" for v in created.values())
    # only passes that changed the graph are dumped
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["000_canonicalize.json", "000_canonicalize.txt", "004_insert-qdq.json", "004_insert-qdq.txt",
                     "manifest.json"]
    text = (tmp_path / "004_insert-qdq.txt").read_text()
    assert "## quantization parameters (by site)" in text
    assert "attn.qkv.input" in text and "fc2.weight" in text
    assert "attn_qkv_input_q" in text and "insert-qdq" in text
    doc = json.loads((tmp_path / "004_insert-qdq.json").read_text())
    assert doc["qparams"]["fc1.weight"]["granularity"] == "channel"
    assert doc["qparams"]["fc1.weight"]["n_scales"] == 64
    assert {n["name"]: n["created_by"] for n in doc["nodes"]}["fc1_input_q"] == "insert-qdq"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["pipeline"] == "canonicalize,observe,act-quant,weight-quant,insert-qdq"
    assert [p["modified"] for p in manifest["passes"]] == [True, False, False, False, True]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_graph_lint_catches_dangling_attr():
    @register
    @dataclass
    class _Broken(Pass):
        name = "test-broken"

        def __call__(self, gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                a = gm.graph.get_attr("does.not.exist")
                added = gm.graph.call_function(torch.add, (out.args[0], a))
            out.args = (added,)
            return PassResult(gm, True)

    gm, ctx = _setup()
    ctx.probe_inputs = None
    with pytest.raises(PassError, match="invalid graph"):
        PassManager("test-broken").run(gm, ctx)


def test_canonicalize_handles_torch_export_linears():
    b = tiny_block(dim=16, tokens=4)
    ep = torch.export.export(b.module, b.example_inputs)
    gm = ep.module()
    ctx = PassContext(probe_inputs=b.example_inputs)
    PassManager("canonicalize").run(gm, ctx)
    assert {s for s, v in ctx.sites.items() if v.kind == "linear"} == {"attn.qkv", "attn.proj", "fc1", "fc2"}
    assert isinstance(gm, fx.GraphModule)


def test_canonicalize_names_attention_matmuls():
    gm, ctx = _setup()
    PassManager("canonicalize").run(gm, ctx)
    assert {s for s, v in ctx.sites.items() if v.kind == "matmul"} == {"attn.matmul1", "attn.matmul2"}
