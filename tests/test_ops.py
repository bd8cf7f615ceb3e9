"""Q/DQ ops: round-trip numerics against the formulas, and ONNX carries exactly our Q/DQ."""
import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.onnx_export import export_onnx, qdq_census
from backends.ort_runner import make_session, run
from core import qmath
from passes import ops


def test_qrange():
    assert qmath.qrange(8) == (-128, 127)
    assert qmath.qrange(6) == (-32, 31)
    with pytest.raises(ValueError):
        qmath.qrange(9)


def test_per_tensor_symmetric_matches_formula():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.26, 0.74, 1.27, 5.0])
    scale, zp = torch.tensor(0.01), torch.tensor(0, dtype=torch.int8)
    q = ops.quantize(x, scale, zp, 0, -128, 127)
    assert q.dtype == torch.int8
    assert q.tolist() == [-100, -50, 0, 26, 74, 127, 127]  # 1.27/0.01 = 127, 5.0 saturates
    assert torch.allclose(ops.dequantize(q, scale, zp, 0), q.float() * 0.01)


def test_round_half_to_even_like_onnx():
    q = ops.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5]), torch.tensor(1.0), torch.tensor(0, dtype=torch.int8), 0, -128, 127)
    assert q.tolist() == [0, 2, 2, 0]


def test_asymmetric_grid_covers_range_and_zero_is_exact():
    lo, hi = torch.tensor(-0.3), torch.tensor(2.1)
    scale, zp = qmath.qparams_from_range(lo, hi, 8, symmetric=False)
    assert float(scale) == pytest.approx(2.4 / 255)
    x = torch.tensor([-0.3, 0.0, 2.1])
    back = ops.dequantize(ops.quantize(x, scale, zp, 0, -128, 127), scale, zp, 0)
    assert float(back[1]) == 0.0
    assert torch.allclose(back, x, atol=float(scale) / 2 + 1e-7)


def test_per_channel_axis0_and_reduced_bits():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.01, 0.02, -0.04]])
    scale, zp = qmath.qparams_from_range(w.amin(1), w.amax(1), 6, symmetric=True)
    assert scale.tolist() == pytest.approx([2.0 / 31, 0.04 / 31])
    q = ops.quantize(w, scale, zp, 0, -32, 31)
    assert int(q.min()) >= -32 and int(q.max()) <= 31
    assert q[0].tolist() == [round(1.0 / (2 / 31)), -31, round(0.5 / (2 / 31))]
    back = ops.dequantize(q, scale, zp, 0)
    assert ((back - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=2, max_size=64),
       st.integers(2, 8), st.booleans())
def test_fake_quant_error_bounded_by_half_step(values, bits, symmetric):
    x = torch.tensor(values)
    scale, zp = qmath.qparams_from_range(x.min(), x.max(), bits, symmetric)
    qp = qmath.QParams(scale, zp, bits, symmetric)
    err = (qmath.fake_quant(x, qp) - x).abs().max()
    assert float(err) <= float(scale) * 0.5 + 1e-5 * max(1.0, float(x.abs().max()))


def _qdq_graph(bits: int) -> fx.GraphModule:
    """x -> Q/DQ (per-tensor, asymmetric, `bits`) -> linear with a per-channel int8 weight DQ.

    Built node by node as insert-qdq does: fx.symbolic_trace would constant-fold the weight
    DQ (all its inputs are buffers) and hide it from the exporter.
    """
    root = torch.nn.Module()
    torch.manual_seed(0)
    w = torch.randn(5, 8)
    ws, wz = qmath.qparams_from_range(w.amin(1), w.amax(1), 8, True)
    root.register_buffer("w_int8", ops.quantize(w, ws, wz, 0, -128, 127))
    root.register_buffer("w_scale", ws)
    root.register_buffer("w_zp", wz)
    xs, xz = qmath.qparams_from_range(torch.tensor(-2.0), torch.tensor(3.0), bits, False)
    root.register_buffer("x_scale", xs)
    root.register_buffer("x_zp", xz)
    qmin, qmax = qmath.qrange(bits)
    g = fx.Graph()
    x = g.placeholder("x")
    s, z = g.get_attr("x_scale"), g.get_attr("x_zp")
    xd = g.call_function(ops.DQ, (g.call_function(ops.Q, (x, s, z, 0, qmin, qmax)), s, z, 0))
    wd = g.call_function(ops.DQ, (g.get_attr("w_int8"), g.get_attr("w_scale"), g.get_attr("w_zp"), 0))
    g.output(g.call_function(torch.nn.functional.linear, (xd, wd)))
    return fx.GraphModule(root, g)


@pytest.mark.parametrize("bits", [8, 6])
def test_onnx_has_exactly_our_qdq_and_matches_torch(tmp_path, bits):
    gm = _qdq_graph(bits)
    x = torch.randn(3, 8) * 3  # exceeds the calibrated range: saturation must agree too
    path = export_onnx(gm, (x,), tmp_path / "m.onnx", input_names=["x"], output_names=["y"])
    census = qdq_census(onnx.load(str(path)))
    assert census["QuantizeLinear"] == 1
    assert census["DequantizeLinear"] == 2
    assert "DynamicQuantizeLinear" not in census
    model = onnx.load(str(path))
    int8_inits = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert "w_int8" in int8_inits
    got = run(make_session(path, "reference"), (x,))[0]
    np.testing.assert_allclose(got, gm(x).numpy(), atol=1e-5, rtol=0)
