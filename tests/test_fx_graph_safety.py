"""A graph.json is data: ``tools.generate --quantized DIR`` rebuilds only graphs that call the torch
functions, tensor methods and operators a quantized step uses, and refuses every other node before
anything runs (issue 20: crafted chains reached ``os.system`` and ``numpy.tofile``)."""
import copy
import json

import pytest
import torch

from backends import registry
from backends.fx_graph import ALLOWED_FUNCTIONS, ALLOWED_METHODS, FORMAT, check_nodes, load_graph, save_graph
from compiler.driver import quantize
from core.errors import UserError
from frontends import load_model, trace
from tests.test_family_compile import FAMILIES, _var
from tools.generate import main as generate_main


def _node(op, name, target, *args, **kwargs):
    return {"op": op, "name": name, "target": target, "args": {"tuple": list(args)},
            "kwargs": {"dict": [[k, v] for k, v in kwargs.items()]}}


def _n(name):
    return {"node": name}


def _graph(*nodes):
    return {"format": FORMAT, "nodes": [_node("placeholder", "x", "x"), *nodes]}


def _chains(marker):
    """name -> the nodes of a crafted graph; each would create ``marker`` if any of it ran."""
    touch = f"touch {marker}"
    inject = f"__import__('os').system('{touch}')"
    return {
        # the chain: a module's forward -> __func__ -> __globals__ -> torch -> os -> system
        "getattr chain to os.system": [
            _node("get_attr", "blk", "blocks.0"),
            _node("call_function", "f", "builtins:getattr", _n("blk"), "forward"),
            _node("call_function", "fn", "builtins:getattr", _n("f"), "__func__"),
            _node("call_function", "g", "builtins:getattr", _n("fn"), "__globals__"),
            _node("call_method", "t", "get", _n("g"), "torch"),
            _node("call_function", "os_", "builtins:getattr", _n("t"), "os"),
            _node("call_method", "run", "system", _n("os_"), touch),
            _node("output", "output", "output", _n("run"))],
        "tensor.numpy().tofile": [
            _node("call_method", "arr", "numpy", _n("x")),
            _node("call_method", "w", "tofile", _n("arr"), str(marker)),
            _node("output", "output", "output", _n("x"))],
        "builtins.eval": [
            _node("call_function", "e", "builtins:eval", inject),
            _node("output", "output", "output", _n("e"))],
        "torch.load": [
            _node("call_function", "e", "torch.serialization:load", str(marker)),
            _node("output", "output", "output", _n("e"))],
        "torch.save": [
            _node("call_function", "e", "torch:save", _n("x"), str(marker)),
            _node("output", "output", "output", _n("x"))],
        "an aten operator": [
            _node("call_function", "e", "ops:aten.empty.memory_format", [1]),
            _node("output", "output", "output", _n("e"))],
        "a private name in our namespace": [
            _node("call_function", "e", "ops:arvgq.__class__.default", _n("x")),
            _node("output", "output", "output", _n("e"))],
        "a dunder method": [
            _node("call_method", "e", "__reduce_ex__", _n("x"), 2),
            _node("output", "output", "output", _n("e"))],
        # fx writes names, targets and keywords into the Python source of forward: none may carry code
        "code in an input name": [
            _node("placeholder", "y", f"y={inject}"),
            _node("output", "output", "output", _n("x"))],
        "code in a keyword": [
            _node("call_function", "e", "torch:add", _n("x"), _n("x"), **{f"alpha={inject},out": 1}),
            _node("output", "output", "output", _n("e"))],
        "code in an attribute path": [
            _node("get_attr", "e", f'blocks") or {inject} or getattr(self, "x'),
            _node("output", "output", "output", _n("e"))],
        "code in a node name": [
            _node("call_function", f"e = {inject}; f", "torch:add", _n("x"), 1),
            _node("output", "output", "output", _n("x"))],
    }


@pytest.fixture(scope="module")
def var_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("var")
    ckpt, _, tok = _var(tmp)
    return ckpt, tok


def _write(directory, data, tensors=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "graph.json").write_text(json.dumps(data))
    torch.save(tensors or {}, directory / "quantized_state_dict.pt")
    return directory


def test_crafted_chains_are_refused_before_anything_runs(tmp_path, var_model):
    bundle = load_model(var_model[0], tokenizer=var_model[1])
    marker = tmp_path / "pwned"
    for name, nodes in _chains(marker).items():
        qdir = _write(tmp_path / "q", _graph(*nodes))
        with pytest.raises(UserError, match="graph.json") as e:
            load_graph(qdir, copy.deepcopy(trace(bundle)))
        assert "\n" not in str(e.value), name
        assert not marker.exists(), name


def test_generate_refuses_a_crafted_graph_with_one_error_line(tmp_path, var_model, capsys):
    marker = tmp_path / "pwned"
    for name in ("getattr chain to os.system", "tensor.numpy().tofile"):
        qdir = _write(tmp_path / "q", _graph(*_chains(marker)[name]))
        out = tmp_path / "out"
        rc = generate_main([var_model[0], "--tokenizer", var_model[1], "--quantized", str(qdir), "--classes", "0",
                            "--out", str(out)])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert rc == 2 and len(err) == 1 and "refusing to load it" in err[0], (name, err)
        assert not marker.exists() and not out.exists() and not (tmp_path / "out.partial").exists(), name


def test_nodes_the_model_does_not_have_are_refused(tmp_path, var_model):
    """A module the step never calls, an attribute that is no tensor, a tensor stored over a method."""
    bundle = load_model(var_model[0], tokenizer=var_model[1])
    cases = {
        "which the model's own step does not call": (_graph(
            _node("call_module", "m", "blocks.0", _n("x")), _node("output", "output", "output", _n("m"))), {}),
        "which is no tensor": (_graph(
            _node("get_attr", "a", "blocks.0.attn"), _node("output", "output", "output", _n("a"))), {}),
        "which is not a tensor of the model": (_graph(_node("output", "output", "output", _n("x"))),
                                               {"blocks.0.forward": torch.zeros(1)}),
        "which is not a module of the model": (_graph(_node("output", "output", "output", _n("x"))),
                                               {"blocks.0.forward.x": torch.zeros(1)}),
    }
    for needle, (data, tensors) in cases.items():
        qdir = _write(tmp_path / "q", data, tensors)
        with pytest.raises(UserError, match=needle):
            load_graph(qdir, copy.deepcopy(trace(bundle)))


def test_malformed_graphs_are_user_errors():
    bad = [
        {"format": FORMAT},
        {"format": FORMAT, "nodes": [{"op": "placeholder"}]},
        _graph(_node("output", "output", "output", _n("nope"))),
        _graph(_node("call_function", "a", "torch:add", {"node": "x", "float": "1"}),
               _node("output", "output", "output", _n("a"))),
        _graph(_node("call_function", "a", "torch:add", _n("x"), {"float": "one"}),
               _node("output", "output", "output", _n("a"))),
        _graph(_node("call_function", "a", "torch:add", _n("x"), {"torch": "load"}),
               _node("output", "output", "output", _n("a"))),
        _graph(_node("call_function", "a", "torch:add", _n("x"), 1)),  # no output
        _graph(_node("output", "output", "output", _n("x")), _node("call_function", "a", "torch:add", _n("x"), 1)),
        _graph(_node("call_function", "x", "torch:add", _n("x"), 1), _node("output", "output", "output", _n("x"))),
    ]
    for data in bad:
        with pytest.raises(UserError):
            check_nodes(data)


def test_allow_lists_are_short_and_hold_no_escape_hatch():
    assert "builtins:getattr" not in ALLOWED_FUNCTIONS and not any(k.startswith("builtins:") for k in ALLOWED_FUNCTIONS)
    assert {"numpy", "tofile", "get", "system", "__class__", "__reduce_ex__"}.isdisjoint(ALLOWED_METHODS)
    assert len(ALLOWED_METHODS) < 25 and len(ALLOWED_FUNCTIONS) < 30


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("lowering", ["", "fuse-attention,lower-cuda"])
def test_every_family_graph_round_trips(tmp_path, family, lowering):
    """The saved step graph of every family (torch target, and lowered as --target cuda) rebuilds under the
    allow-lists and gives the compiled graph's outputs bit for bit."""
    registry.targets()
    args = FAMILIES[family](tmp_path)
    bundle = load_model(args[0], **({"tokenizer": args[2]} if len(args) > 2 else {}))
    pipeline = "canonicalize,observe,act-quant,weight-quant,insert-qdq" + (f",{lowering}" if lowering else "")
    _, gm, _, _ = quantize(bundle, pipeline, "W8A8", [bundle.example_inputs])
    save_graph(gm, tmp_path, "weights.safetensors" if lowering else "quantized_state_dict.pt")
    loaded = load_graph(tmp_path, trace(load_model(args[0], **({"tokenizer": args[2]} if len(args) > 2 else {}))))
    with torch.no_grad():
        for a, b in zip(gm(*bundle.example_inputs), loaded(*bundle.example_inputs)):
            assert torch.equal(a, b)
