"""The torch INT8 runner: int8 GEMMs equal the fake-quant graph they replace."""
import copy

import pytest
import torch

from backends import torch_int8
from frontends import load_model, trace
from passes import PassContext, PassManager, ops

MODELS = "tests/models_generic.py"


def _quantized(spec, pipeline):
    b = load_model(spec)
    gm = trace(b)
    ctx = PassContext(calib_inputs=b.calib_inputs or [b.example_inputs])
    return b, PassManager(pipeline).run(gm, ctx)


@pytest.mark.parametrize("spec,pipeline", [
    (f"{MODELS}:block", "canonicalize,observe,act-quant{symmetric=false},weight-quant,insert-qdq"),
    (f"{MODELS}:grouped_block", "canonicalize,observe,stwq,weight-quant,insert-qdq"),
])
def test_int8_gemm_graph_equals_fake_quant(monkeypatch, spec, pipeline):
    b, gm = _quantized(spec, pipeline)
    fake = copy.deepcopy(gm)
    monkeypatch.setattr(torch_int8, "INT_MM_ON_CPU", True)
    calls = []

    # The exact int32 product stands in for torch's CPU ``_int_mm``, which is not exact on every CPU (AVX2's
    # u8*s8 pair sums saturate int16): the test checks the lowering's arithmetic around the GEMM, and that
    # every quantized linear reaches the GEMM with int8 operands.
    def checked_int_mm(a, w):
        calls.append((a.dtype, w.dtype))
        return (a.long() @ w.long()).int()

    monkeypatch.setattr(torch, "_int_mm", checked_int_mm)
    low, counts = torch_int8.lower_to_int8(gm, dtype=torch.float32, min_rows=0)
    assert counts["int8_linears"] == (4 if "grouped" not in spec else 5)
    assert not any(n.target is torch.nn.functional.linear for n in low.graph.nodes)
    with torch.no_grad():
        got, ref = low(*b.example_inputs), fake(*b.example_inputs)
    assert calls == [(torch.int8, torch.int8)] * counts["int8_linears"]  # every quantized linear ran as an int8 GEMM
    # The epilogues differ only in float32 rounding (an asymmetric grid subtracts z * colsum(W) from a large
    # accumulator, in another order). Where that moves a value across a rounding boundary of the next
    # quantizer, one code of that grid propagates along its token's row: allow that in one or two rows.
    diff = (got - ref).abs() / ref.abs().max()
    rows_off = (diff > 1e-5).flatten(0, -2).any(-1)
    assert int(rows_off.sum()) <= 2 and float(diff.max()) < 1e-3


def test_small_row_counts_and_cpu_fall_back_to_float():
    b, gm = _quantized(f"{MODELS}:block", "canonicalize,observe,act-quant,weight-quant,insert-qdq")
    fake = copy.deepcopy(gm)
    low, _ = torch_int8.lower_to_int8(gm, dtype=torch.float32)
    with torch.no_grad():  # CPU: the dequantized float path, same numbers
        torch.testing.assert_close(low(*b.example_inputs), fake(*b.example_inputs), atol=2e-4, rtol=1e-4)


def test_to_device_keeps_scales_float32():
    b, gm = _quantized(f"{MODELS}:block", "canonicalize,observe,act-quant,weight-quant,insert-qdq")
    low, _ = torch_int8.lower_to_int8(gm)
    low = torch_int8.to_device(low, "cpu", torch.bfloat16)
    bufs = dict(low.named_buffers())
    assert bufs["fc1.input_scale"].dtype == torch.float32
    assert bufs["fc1.weight_int8"].dtype == torch.int8
    assert dict(low.named_parameters())["fc1.bias"].dtype == torch.bfloat16


def test_group_epilogue_keeps_the_activation_dtype():
    """Regression: float32 per-token scales promoted the rest of the graph (attention) to float32."""
    b, gm = _quantized(f"{MODELS}:grouped_block", "canonicalize,observe,stwq,weight-quant,insert-qdq")
    low, _ = torch_int8.lower_to_int8(gm, dtype=torch.bfloat16)
    low = torch_int8.to_device(low, "cpu", torch.bfloat16)
    seen = {}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target is torch.matmul:
                seen[n.name] = out.dtype
            return out

    x, groups = b.example_inputs
    with torch.no_grad():
        y = Spy(low).run(x.to(torch.bfloat16), groups)
    assert seen and set(seen.values()) == {torch.bfloat16}
    assert y.dtype == torch.bfloat16


def test_to_device_converts_model_parameters_named_like_scales():
    """Regression: VAR's attn.scale_mul_1H11 stayed float32 and promoted attention to float32."""
    from compiler.bench import _var_step_inputs
    from frontends import var as V
    from frontends.generic import ModelBundle

    torch.manual_seed(0)
    model = V.VAR(V.CONFIGS["tiny"]).eval()
    inputs = _var_step_inputs(model, model.num_scales - 1, 2, 0)
    b = ModelBundle("var", V.VARStep(model).eval(), inputs, calib_inputs=[inputs])
    gm = trace(b)
    ctx = PassContext(calib_inputs=[inputs])
    gm = PassManager("canonicalize,observe{histograms=false},stwq,weight-quant,insert-qdq").run(gm, ctx)
    low, _ = torch_int8.lower_to_int8(gm, dtype=torch.bfloat16)
    low = torch_int8.to_device(low, "cpu", torch.bfloat16)
    tensors = dict(low.named_parameters()) | dict(low.named_buffers())
    assert tensors["blocks.0.attn.scale_mul_1H11"].dtype == torch.bfloat16
    assert tensors["blocks.0.attn.mat_qkv.input_group_scale"].dtype == torch.float32
    assert tensors["blocks.0.attn.mat_qkv.weight_scale"].dtype == torch.float32
    seen = set()

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target is torch.matmul:
                seen.add(out.dtype)
            return out

    conv = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        logits = Spy(low).run(*conv)[0]
    assert seen == {torch.bfloat16} and logits.dtype == torch.bfloat16


@pytest.mark.parametrize("workload", ["var-tiny", "gpt-tiny-decode"])
def test_fuse_attention_equals_explicit_attention(workload):
    from compiler.bench import workloads
    from compiler.driver import quantize

    b = workloads()[workload](2)
    calib = b.calib_inputs or [b.example_inputs]
    fp, q, _, _ = quantize(b, "canonicalize,observe{histograms=false},act-quant,weight-quant,insert-qdq", "W8A8", calib)
    layers = len(b.module.blocks if hasattr(b.module, "blocks") else b.module.layers)
    for gm in (fp, q):
        fused, n = torch_int8.fuse_attention(copy.deepcopy(gm))
        assert n == layers  # one SDPA per block, every softmax gone
        assert sum(node.target is torch.nn.functional.scaled_dot_product_attention for node in fused.graph.nodes) == n
        assert not any("softmax" in str(node.target) for node in fused.graph.nodes)
        with torch.no_grad():
            for a, c in zip(gm(*b.example_inputs), fused(*b.example_inputs)):
                torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)


def test_fuse_attention_keeps_quantized_attention_matmuls():
    from compiler.bench import workloads
    from compiler.driver import quantize

    b = workloads()["var-tiny"](2)
    # act-quant on every site, attention matmuls included: their inputs are dequantized
    _, q, _, _ = quantize(b, "canonicalize,observe{histograms=false},act-quant{matmuls=true},weight-quant,insert-qdq",
                          "W8A8", b.calib_inputs)
    quantized_matmuls = sum(n.target is torch.matmul and n.args[0].target is ops.DQ for n in q.graph.nodes)
    _, n = torch_int8.fuse_attention(copy.deepcopy(q))
    assert quantized_matmuls > 0 and n == 0
