"""The Triton kernels of backends/cuda against their contract, backends/cuda/reference.py.

Without CUDA every kernel runs under Triton's interpreter on tiny, odd shapes (masks, several K steps, several
groups); with CUDA the same tests run compiled, plus comparisons at moderate sizes.
"""
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRET = not CUDA
# Triton decides between compiling and interpreting when a function is decorated with triton.jit, its
# own helpers (tl.sum, tl.sigmoid...) included: TRITON_INTERPRET must be set before triton is first
# imported. If an earlier test module imported it without, this file runs itself in a fresh process
# instead (test_in_subprocess).
# (tests/conftest.py imports it so, ahead of every test module.)
SUBPROCESS = (INTERPRET and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
              and not getattr(sys.modules["triton"], "arvgq_interpreted", False))
_saved = os.environ.get("TRITON_INTERPRET")
if INTERPRET and not SUBPROCESS:
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules.pop("backends.cuda.kernels", None)
try:
    pytest.importorskip("triton", reason="triton is not installed")
    from backends.cuda import kernels, ops
    from backends.cuda import reference as ref
finally:
    # Restored: later test modules keep calling the reference on CPU tensors (ops reads it at each call).
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved


if SUBPROCESS:  # defined only when needed, so the usual run reports no skip for it
    def test_in_subprocess():
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                             env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                             timeout=600, check=False)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.fixture(autouse=True)
def _interpreter(request, monkeypatch):
    if SUBPROCESS and request.node.name != "test_in_subprocess":
        pytest.skip("triton was imported without TRITON_INTERPRET: run by test_in_subprocess")
    if INTERPRET:  # the interpreter reads it again at launch
        monkeypatch.setenv("TRITON_INTERPRET", "1")


DEV = "cuda" if CUDA else "cpu"
# Hopper's FP8 MMA keeps about 14 bits within each BLOCK_K chunk before the fp32 promotion.
FP8_RTOL = 2e-4 if CUDA else 1e-5
# Compiled kernels take tanh-GELU's tanh from the special-function unit (relative error 2**-11).
GELU_RTOL = 1e-3 if CUDA else 1e-5
SM90 = CUDA and torch.cuda.get_device_capability()[0] >= 9
FP8_OK = CUDA and torch.cuda.get_device_capability() >= (8, 9)
FP8_GEMM = pytest.mark.skipif(CUDA and not FP8_OK, reason="FP8 needs sm89+")
# Triton's interpreter casts float32 to float8e4nv without round-to-nearest-even (31.56 -> 16,
# 1.0625 -> 1.125).
FP8_CODES = pytest.mark.skipif(not FP8_OK, reason="FP8 codes: Triton's interpreter rounds float32 -> "
                               "float8e4nv wrongly; needs a GPU of sm89+")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp

T, GROUPS = 8, torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _codes(shape, gen, dtype=torch.int8):
    if dtype == torch.int8:
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    return (torch.randn(shape, generator=gen) * 8).to(dtype)


def _gemm_args(M, K, N, gen, dtype=torch.int8):
    """Operands and a three-group STWQ grid (int8: with zero points; fp8: zero points 0)."""
    a, w = _codes((M, K), gen, dtype), _codes((N, K), gen, dtype)
    a_zero = torch.tensor([-3.0, 0.0, 5.0]) if dtype == torch.int8 else torch.zeros(3)
    return {"a": a, "w": w, "w_scale": torch.rand(N, generator=gen) * 0.01 + 1e-3, "colsum": w.float().sum(1),
            "a_scale": torch.rand(3, generator=gen) * 0.1 + 0.01, "a_zero": a_zero,
            "bias": torch.randn(N, generator=gen), "groups": GROUPS, "tokens": T}


def _to(args, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _close(out, expected, rtol=1e-5):
    """Float outputs: relative to each value, with an absolute floor at rtol times the largest."""
    out, expected = out.float().cpu(), expected.float().cpu()
    torch.testing.assert_close(out, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _assert_codes(out, fn, *args, tol=1e-4, **kwargs):
    """Codes of ``out`` equal ``fn``'s (a reference function), except where the reference's value before
    rounding lies within ``tol`` (relative, floor 1) of the midpoint between the two codes (float rounding
    may tip it either way)."""
    real, seen = ref.quantize_codes, {}

    def capture(y, inv_scale, zero, g, qmin, qmax, fp8=False):
        v = y.float() * inv_scale.float()[g][:, None]
        seen["v"] = v if fp8 else (v + zero.float()[g][:, None]).clamp(qmin, qmax)
        return real(y, inv_scale, zero, g, qmin, qmax, fp8)

    with mock.patch.object(ref, "quantize_codes", capture):
        expected = fn(*args, **kwargs)
    out, expected, v = out.cpu().float(), expected.cpu().float(), seen["v"].cpu()
    assert out.shape == expected.shape
    assert expected.unique().numel() > 10, "degenerate test: too few distinct codes"
    differ = out != expected
    near = (v - (out + expected) / 2).abs() <= tol * v.abs().clamp(min=1)
    assert bool((~differ | near).all()), f"{int((differ & ~near).sum())} codes differ off a rounding boundary"
    assert differ.float().mean() < 1e-2


# ---------------------------------------------------------------------------------- qgemm, tiny shapes

VARIANTS = [None, kernels.tile_config(16, 32, 32, 4, 2, persistent=True)]
if not CUDA or SM90:
    VARIANTS += [kernels.tile_config(32, 16, 32, 4, 2, tma=True),
                 kernels.tile_config(16, 32, 32, 4, 2, persistent=True, tma=True)]


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: "autotuned" if c is None else
                         f"P{int(c.kwargs['PERSISTENT'])}T{int(c.kwargs['TMA'])}")
@pytest.mark.parametrize("K", [48, 64])
def test_qgemm_int32_accumulation_exact(config, K):
    gen = _gen(1)
    M, N = 24, 37
    a, w = _codes((M, K), gen), _codes((N, K), gen)
    a[0], w[0] = -128, -128  # the extreme product, K times
    a_zero = torch.tensor([7.0])
    ones = torch.ones(N, device=DEV)
    out = kernels.qgemm(a.to(DEV), w.to(DEV), ones, w.float().sum(1).to(DEV), torch.ones(1, device=DEV),
                        a_zero.to(DEV), out_dtype=torch.float32, config=config)
    exact = a.long() @ w.long().t() - 7 * w.long().sum(1)  # |values| < 2**24: exact in float32
    assert torch.equal(out.cpu().double(), exact.double())


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_qgemm_epilogue(gelu, out_dtype):
    args = _gemm_args(24, 40, 45, _gen(2))
    out = kernels.qgemm(**_to(args, DEV), gelu=gelu, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    expected = ref.qgemm(**args, gelu=gelu, out_dtype=out_dtype)
    _close(out, expected, rtol=max(1e-5 if out_dtype == torch.float32 else 1e-3, GELU_RTOL if gelu else 0))


@pytest.mark.skipif(CUDA and not SM90, reason="TMA stores need a Hopper GPU (or the interpreter)")
@pytest.mark.parametrize("out", ["float32", "float16", "codes"])
def test_qgemm_tma_store_equals_the_plain_store(out):
    """The same tile with its output stored by TMA: rows past M (40 of 2 x 32) dropped, values identical."""
    args = _gemm_args(40, 64, 64, _gen(21))
    grid = {"out_inv_scale": torch.tensor([40.0, 25.0, 60.0]), "out_zero": torch.tensor([2.0, -5.0, 0.0])}
    kw = {"gelu": True, **(grid if out == "codes" else {"out_dtype": getattr(torch, out)})}
    plain, stored = (kernels.tile_config(32, 32, 32, 4, 2, persistent=True, tma=True, tma_store=s)
                     for s in (False, True))
    got = kernels.qgemm(**_to(args, DEV), **_to(kw, DEV), config=stored)
    assert got.shape == (40, 64)
    assert torch.equal(got, kernels.qgemm(**_to(args, DEV), **_to(kw, DEV), config=plain))
    if out == "codes":
        _assert_codes(got.cpu(), ref.qgemm, **args, **kw, tol=GELU_RTOL)
    else:
        _close(got, ref.qgemm(**args, **kw), rtol=max(GELU_RTOL, 1e-3 if out == "float16" else 1e-5))


@pytest.mark.parametrize("quant", [False, True])
def test_qgemm_int64_offsets_store_the_same(monkeypatch, quant):
    """Outputs of 2**31 elements or more are addressed with int64 offsets (int32 ones take fewer instructions):
    forced here, the same values land in the same places."""
    args = _gemm_args(40, 64, 72, _gen(22))
    kw = {"out_inv_scale": torch.tensor([40.0, 25.0, 60.0]), "out_zero": torch.tensor([2.0, -5.0, 0.0])} if quant \
        else {"out_dtype": torch.float32}
    int32 = kernels.qgemm(**_to(args, DEV), **_to(kw, DEV), gelu=True)
    assert not kernels._offs64({"M": 40, "N": 72})
    assert kernels._offs64({"M": 2**31 // 1024, "N": 1024}) and not kernels._offs64({"M": 2**21 - 512, "N": 1024})
    monkeypatch.setattr(kernels, "OFFS64_FROM", 0)
    assert kernels._offs64({"M": 40, "N": 72})
    assert torch.equal(kernels.qgemm(**_to(args, DEV), **_to(kw, DEV), gelu=True), int32)


@pytest.mark.parametrize("gelu", [False, True])
def test_qgemm_quantized_output(gelu):
    args = _gemm_args(24, 64, 48, _gen(3))
    q = {"out_inv_scale": torch.tensor([40.0, 25.0, 60.0]), "out_zero": torch.tensor([2.0, -5.0, 0.0]),
         "qmin": -100, "qmax": 90}
    out = kernels.qgemm(**_to(args, DEV), gelu=gelu, **_to(q, DEV))
    assert out.dtype == torch.int8
    _assert_codes(out, ref.qgemm, **args, gelu=gelu, **q, tol=GELU_RTOL if gelu else 1e-4)


@pytest.mark.parametrize("quant_out", [False, True])
@pytest.mark.parametrize("config", [None, kernels.tile_config(16, 32, 32, 4, 2, persistent=True)],
                         ids=["autotuned", "persistent"])
def test_qgemm_swiglu_epilogue(quant_out, config):
    """Rows of w are gate and up interleaved: the kernel writes ``silu(gate) * up`` (N / 2 columns), or its codes."""
    args = _gemm_args(24, 40, 46, _gen(16))
    q = {"out_inv_scale": torch.tensor([4.0, 2.5, 6.0]), "out_zero": torch.tensor([2.0, -5.0, 0.0])} if quant_out else {}
    out = kernels.qgemm(**_to(args, DEV), swiglu=True, out_dtype=torch.float32, config=config, **_to(q, DEV))
    assert out.shape == (24, 23)
    if quant_out:
        _assert_codes(out, ref.qgemm, **args, swiglu=True, **q)
    else:
        expected = ref.qgemm(**args, swiglu=True, out_dtype=torch.float32)
        y = ref.qgemm(**args, out_dtype=torch.float32)  # the contract, spelled out: pairs of columns
        torch.testing.assert_close(expected, torch.nn.functional.silu(y[:, 0::2]) * y[:, 1::2])
        _close(out, expected)
    with pytest.raises(ValueError, match="swiglu needs"):
        ops.qgemm(**{**args, "w": args["w"][:45], "w_scale": args["w_scale"][:45], "colsum": args["colsum"][:45],
                     "bias": None}, swiglu=True)


@pytest.mark.parametrize("fp16", [False, True])
def test_qgemm_quantizes_a_float_input(fp16):
    """``a_inv_scale``: ``a`` is float and the kernel quantizes it on its grid (odd K: masked columns) exactly
    as ``act_quant`` would, then the GEMM equals the one on those codes."""
    args = _gemm_args(24, 41, 40, _gen(17))
    x = torch.randn(24, 41, generator=_gen(18)) * 20
    x = x.half() if fp16 else x
    inv = 1 / args["a_scale"]
    codes = ref.act_quant(x, act="none", inv_scale=inv, zero=args["a_zero"], groups=GROUPS, tokens=T, qmin=-100, qmax=110)
    assert codes.min() == -100 and codes.max() == 110  # both bounds reached
    fused = kernels.qgemm(**_to({**args, "a": x}, DEV), a_inv_scale=inv.to(DEV), in_qmin=-100, in_qmax=110,
                          out_dtype=torch.float32)
    plain = kernels.qgemm(**_to({**args, "a": codes}, DEV), out_dtype=torch.float32)
    torch.testing.assert_close(fused.cpu(), plain.cpu(), rtol=0, atol=0)
    _close(fused, ref.qgemm(**{**args, "a": x}, a_inv_scale=inv, in_qmin=-100, in_qmax=110, out_dtype=torch.float32))
    with pytest.raises(ValueError, match="must be float with a_inv_scale"):
        ops.qgemm(**args, a_inv_scale=inv)


@pytest.mark.parametrize("normalize,gain,heads_per_tile", [(True, True, 1), (False, False, 1), (True, True, 2)])
def test_qgemm_writes_q_and_the_kv_caches(normalize, gain, heads_per_tile):
    """The qkv epilogue: k and v land in the caches at the tokens' positions (the other rows untouched), q comes
    back normalized and scaled per head, all as ``reference.qgemm`` with ``qkv`` (``qkv_heads`` after the GEMM).
    A tile holds one head (the interpreter's tile) or two (Hopper's 128 columns at D = 64)."""
    B, H, D, L = 3, 4, 16, 12
    config = kernels.tile_config(32, heads_per_tile * D, 32, 4, 1) if heads_per_tile > 1 else None
    args = _gemm_args(B * T, 40, 3 * H * D, _gen(19))
    caches = [torch.randn(B, H, L, D, generator=_gen(20 + i)) for i in range(2)]
    index, head_gain = torch.arange(3, 3 + T), torch.rand(H, generator=_gen(22)) + 1 if gain else None
    ours = [c.clone().to(DEV) for c in caches]
    expected_caches = [c.clone() for c in caches]
    q = kernels.qgemm(**_to(args, DEV), qkv=(*ours, index.to(DEV), None if head_gain is None else head_gain.to(DEV), D,
                                             normalize, 1e-12), config=config)
    expected = ref.qgemm(**args, qkv=(*expected_caches, index, head_gain, D, normalize, 1e-12))
    assert q.shape == (B * T, H * D) and q.dtype == caches[0].dtype
    _close(q, expected)
    if normalize:  # unit norm per head, times the head's gain
        norms = q.cpu().view(B * T, H, D).norm(dim=-1)
        torch.testing.assert_close(norms, head_gain.expand(B * T, H), rtol=1e-5, atol=1e-5)
    for got, want, before in zip(ours, expected_caches, caches):
        _close(got, want)
        assert torch.equal(got.cpu()[:, :, :3], before[:, :, :3]) and not torch.equal(want[:, :, 3:11], before[:, :, 3:11])
    with pytest.raises(ValueError, match="qkv: caches must be"):
        ops.qgemm(**args, qkv=(caches[0][:, :1], caches[1], index, None, D, normalize, 1e-12))


def test_round_half_to_even():
    """Exact ties (acc / 4 of small integer sums; act_quant on .5 values) round like torch.round."""
    gen = _gen(15)
    a = torch.randint(-3, 4, (24, 48), dtype=torch.int8, generator=gen)
    w = torch.randint(-3, 4, (40, 48), generator=gen)
    args = {"a": a, "w": w.to(torch.int8), "w_scale": torch.ones(40), "colsum": w.float().sum(1),
            "a_scale": torch.ones(1), "a_zero": torch.zeros(1), "out_inv_scale": torch.tensor([0.25]),
            "out_zero": torch.tensor([0.0])}
    expected = ref.qgemm(**args)
    assert ((a.long() @ w.long().t()) % 4 == 2).sum() > 20  # many ties
    assert torch.equal(kernels.qgemm(**_to(args, DEV)).cpu(), expected)
    x = torch.arange(-6.5, 7.0, 1.0).repeat(3, 1)  # -6.5 ... 6.5
    q = {"inv_scale": torch.ones(1), "zero": torch.tensor([1.0])}
    out = kernels.act_quant(x.to(DEV), act="none", **_to(q, DEV)).cpu()
    assert torch.equal(out, ref.act_quant(x, act="none", **q))


@pytest.mark.parametrize("config", [None, kernels.tile_config(16, 32, 32, 4, 2, persistent=True)],
                         ids=["autotuned", "persistent"])
@pytest.mark.parametrize("gain", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_qgemm_adds_the_residual(config, gain, out_dtype):
    """The epilogue's residual add ``residual + y * gain[image]`` (in two column halves of each tile; 40 columns:
    the second tile's second half lies past N): as the reference's, and not ``y`` alone. The gain table is a
    column chunk of a wider one, as AdaLN's linear gives it (strided rows, read in place)."""
    gen = _gen(23)
    args = _gemm_args(24, 64, 40, gen)
    tables = torch.randn(3, 80, generator=gen)
    res = {"residual": (torch.randn(24, 40, generator=gen) * 4).to(out_dtype),
           "gain": tables[:, :40] if gain else None}
    out = kernels.qgemm(**_to(args, DEV), **_to(res, DEV), out_dtype=out_dtype, config=config)
    expected = ref.qgemm(**args, **res, out_dtype=out_dtype)
    plain = ref.qgemm(**args, out_dtype=torch.float32)
    assert out.dtype == out_dtype and (expected.float() - plain).abs().max() > 1
    _close(out, expected, rtol=1e-5 if out_dtype == torch.float32 else 1e-3)
    with pytest.raises(ValueError, match="residual takes the projection's float output only"):
        ops.qgemm(**args, **res, out_dtype=out_dtype, gelu=True)
    with pytest.raises(ValueError, match="residual must be"):
        ops.qgemm(**args, **{**res, "residual": res["residual"][:, :5]}, out_dtype=out_dtype)


@pytest.mark.parametrize("tokens", [1, 3])
def test_qgemm_maps_rows_to_images_and_token_groups(monkeypatch, tokens):
    """Row m is token m % tokens of image m // tokens: its group's activation grid and its image's residual gain.
    One token an image (decode, VAR's first scale) takes the ONE_TOKEN binary, where both are constants."""
    seen = set()
    run = kernels._qgemm_kernel.run
    monkeypatch.setattr(kernels._qgemm_kernel, "run", lambda *a, **kw: seen.add(kw["ONE_TOKEN"]) or run(*a, **kw))
    gen = _gen(27)
    args = {**_gemm_args(24, 64, 40, gen), "groups": torch.tensor([2, 0, 1][:tokens]), "tokens": tokens,
            "out_dtype": torch.float32}
    res = {"residual": torch.randn(24, 40, generator=gen), "gain": torch.randn(24 // tokens, 40, generator=gen)}
    _close(kernels.qgemm(**_to(args, DEV), **_to(res, DEV)), ref.qgemm(**args, **res))
    assert seen == {tokens == 1}


@FP8_GEMM
def test_qgemm_fp8():
    args = _gemm_args(24, 64, 40, _gen(4), dtype=torch.float8_e4m3fn)
    out = kernels.qgemm(**_to(args, DEV), gelu=True, out_dtype=torch.float32)
    _close(out, ref.qgemm(**args, gelu=True, out_dtype=torch.float32), rtol=max(FP8_RTOL, GELU_RTOL))


@FP8_CODES
def test_qgemm_fp8_codes():
    args = _gemm_args(24, 64, 40, _gen(5), dtype=torch.float8_e4m3fn)
    inv = torch.tensor([3.0, 20.0, 50.0])
    out = kernels.qgemm(**_to(args, DEV), out_inv_scale=inv.to(DEV), out_zero=None)
    assert out.dtype == torch.float8_e4m3fn
    _assert_codes(out, ref.qgemm, **args, out_inv_scale=inv, out_zero=torch.zeros(3), tol=10 * FP8_RTOL)


# ---------------------------------------------------------------------------------- norms, activations

def _quant(gen, fp8=False):
    return {"inv_scale": torch.rand(3, generator=gen) * 30 + 20, "zero": torch.tensor([1.0, -3.0, 0.0]),
            "groups": GROUPS, "tokens": T, "qmin": -120, "qmax": 127, "fp8": fp8}


@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=FP8_CODES)])
@pytest.mark.parametrize("affine,modulate", [(True, True), (False, False), (True, False)])
def test_layernorm_quant(affine, modulate, fp8):
    gen = _gen(6)
    M, K = 24, 50
    x = torch.randn(M, K, generator=gen) * 3 + 1
    args = {"weight": torch.rand(K, generator=gen) + 0.5 if affine else None,
            "bias": torch.randn(K, generator=gen) * 0.1 if affine else None, "eps": 1e-6,
            "mod_scale": torch.randn(3, K, generator=gen) * 0.2 if modulate else None,
            "mod_shift": torch.randn(3, K, generator=gen) * 0.2 if modulate else None, **_quant(gen, fp8)}
    out = kernels.layernorm_quant(x.to(DEV), **_to(args, DEV))
    _assert_codes(out, ref.layernorm_quant, x, **args)


@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=FP8_CODES)])
@pytest.mark.parametrize("weight", [True, False])
def test_rmsnorm_quant(weight, fp8):
    gen = _gen(7)
    x = torch.randn(24, 72, generator=gen) * 2
    args = {"weight": torch.rand(72, generator=gen) + 0.5 if weight else None, "eps": 1e-5,
            **_quant(gen, fp8)}
    out = kernels.rmsnorm_quant(x.to(DEV), **_to(args, DEV))
    _assert_codes(out, ref.rmsnorm_quant, x, **args)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("gain", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norms_take_the_residual_add(norm, gain, dtype):
    """``s = x + residual * gain[image]`` before the norm: ``s`` written in x's dtype (to float rounding), the
    codes of the norm of ``s`` as the reference's. The per-image tables are column chunks of one table, as
    AdaLN's linear gives them (strided rows, read in place)."""
    gen = _gen(8)
    M, K = 24, 40
    x = (torch.randn(M, K, generator=gen) * 3).to(dtype)
    tables = torch.cat([torch.randn(3, K, generator=gen), torch.randn(3, K, generator=gen) * 0.2], dim=1)
    args = {"residual": (torch.randn(M, K, generator=gen) * 2).to(dtype),
            "gain": tables[:, :K] if gain else None, "eps": 1e-6, **_quant(gen)}
    if norm == "layernorm":
        args.update(weight=torch.rand(K, generator=gen) + 0.5, bias=None, mod_scale=tables[:, K:], mod_shift=None)
    else:
        args.update(weight=torch.rand(K, generator=gen) + 0.5)
    total, codes = getattr(kernels, f"{norm}_quant")(x.to(DEV), **_to(args, DEV))
    fn = getattr(ref, f"{norm}_quant")
    expected, _ = fn(x, **args)
    assert total.dtype == dtype and not torch.equal(expected.float(), x.float())
    _close(total, expected, rtol=1e-3 if dtype == torch.float16 else 1e-6)
    _assert_codes(codes, lambda *a, **k: fn(*a, **k)[1], x, **args)
    with pytest.raises(ValueError, match="residual must match"):
        getattr(ops, f"{norm}_quant")(x, **{**args, "residual": args["residual"][:, :5]})


@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=FP8_CODES)])
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh", "swiglu"])
def test_act_quant(act, fp8):
    gen = _gen(8)
    x = torch.randn(24, 33, generator=gen) * 2
    args = {"act": act, "gate": torch.randn(24, 33, generator=gen) if act == "swiglu" else None,
            **_quant(gen, fp8)}
    out = kernels.act_quant(x.to(DEV), **_to(args, DEV))
    _assert_codes(out, ref.act_quant, x, **args, tol=GELU_RTOL if act == "gelu_tanh" else 1e-4)


def test_ungrouped_fp16_input():
    """One group (per-tensor grid), fp16 input, a row block that straddles M."""
    gen = _gen(9)
    x = (torch.randn(70, 40, generator=gen) * 2).half()
    q = {"inv_scale": torch.tensor([30.0]), "zero": torch.tensor([0.0])}
    out = kernels.rmsnorm_quant(x.to(DEV), None, 1e-5, **_to(q, DEV))
    _assert_codes(out, ref.rmsnorm_quant, x, None, 1e-5, **q)


@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_write(T, dtype):
    """This step's keys, a strided view of the qkv output as the traced step has them, written into their rows."""
    gen = _gen(30)
    B, H, L, D = 2, 3, 40, 24
    cache = torch.randn(B, H, L, D, generator=gen).to(dtype)
    value = torch.randn(B, T, 3, H, D, generator=gen).permute(2, 0, 3, 1, 4)[1]  # [B, H, T, D], not contiguous
    index = torch.randperm(L, generator=gen)[:T]
    expected = cache.clone()
    ref.kv_write(expected, index, value)
    got = cache.clone().to(DEV)
    ops.kv_write(got, index.to(DEV), value.to(DEV))
    assert torch.equal(got.cpu(), expected)
    assert not torch.equal(expected, cache)


def test_kv_write_checks():
    with pytest.raises(ValueError, match="index must be"):
        ops.kv_write(torch.zeros(1, 2, 8, 4), torch.tensor([0.0]), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="cache must be"):
        ops.kv_write(torch.zeros(1, 2, 8, 4), torch.tensor([0]), torch.zeros(1, 3, 1, 4))


def _int8_cache(B, H, L, D, gen):
    codes, scale = ref.kv_quantize(torch.randn(B, H, L, D, generator=gen) * 3)
    return codes, scale


@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_write_int8(T, dtype):
    """Rows written as int8 codes with their own scale (amax / 127): the codes the reference gives, off by one
    only at a rounding boundary, the scales to float rounding; the other rows untouched."""
    gen = _gen(31)
    B, H, L, D = 2, 3, 40, 24
    cache, scale = _int8_cache(B, H, L, D, gen)
    value = (torch.randn(B, T, 3, H, D, generator=gen) * 4).permute(2, 0, 3, 1, 4)[1].to(dtype)  # strided view
    value[0, 0, 0] = 0  # a zero row: codes 0, scale 0
    index = torch.randperm(L, generator=gen)[:T]
    expected, expected_scale = cache.clone(), scale.clone()
    ref.kv_write_int8(expected, expected_scale, index, value)
    got, got_scale = cache.clone().to(DEV), scale.clone().to(DEV)
    ops.kv_write_int8(got, got_scale, index.to(DEV), value.to(DEV))
    got, got_scale = got.cpu(), got_scale.cpu()
    torch.testing.assert_close(got_scale, expected_scale, rtol=1e-6, atol=0)
    assert (got.int() - expected.int()).abs().max() <= 1 and (got != expected).float().mean() < 1e-3
    assert got[0, 0, index[0]].abs().sum() == 0 and got_scale[0, 0, index[0]] == 0
    written = torch.zeros(L, dtype=torch.bool)
    written[index] = True
    assert torch.equal(got[:, :, ~written], cache[:, :, ~written])
    spans = expected.abs().amax(-1)[:, :, index] == 127
    assert spans.sum() == spans.numel() - 1  # each row but the zero one spans the grid
    deq = ref.kv_dequantize(got[:, :, index], got_scale[:, :, index], torch.float32)
    assert (deq - value.float()).abs().max() <= value.float().abs().amax(-1, keepdim=True).max() / 254 * 1.01


# n: whole key blocks and a partial last one (45), or whole blocks only (48, 32: the kernel's tail block skipped)
@pytest.mark.parametrize("T,masked,n", [(1, False, 45), (1, True, 45), (7, True, 48), (40, False, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kv8", [False, True], ids=["fp-cache", "int8-cache"])
def test_attention(T, masked, n, dtype, kv8):
    """Attention over the caches = SDPA over them (int8 ones dequantized; first ``n`` keys; an additive mask
    broadcast over batch and heads), to float tolerance, as ``[B, T, H, D]``; queries a strided view as the
    traced step has them."""
    gen = _gen(32)
    B, H, L, D = 2, 3, 50, 24
    (k, ks), (v, vs) = _int8_cache(B, H, L, D, gen), _int8_cache(B, H, L, D, gen)
    if not kv8:
        k, v, ks, vs = ref.kv_dequantize(k, ks, dtype), ref.kv_dequantize(v, vs, dtype), None, None
    q = (torch.randn(B, T, H, D, generator=gen)).transpose(1, 2).to(dtype)  # [B, H, T, D] view
    mask = None
    if masked:
        mask = torch.zeros(1, 1, T, L)
        mask[..., n - 3:] = float("-inf")
        mask[..., 0, 1] = -2.0  # a bias, not only -inf
    expected = ref.attention(q, k, v, None if mask is None else mask.expand(B, H, T, L), n, 0.3, k_scale=ks,
                             v_scale=vs)
    dev = _to({"q": q, "k": k, "v": v, "ks": ks, "vs": vs}, DEV)
    got = ops.attention(dev["q"], dev["k"], dev["v"], None if mask is None else mask.to(DEV), n, 0.3,
                        k_scale=dev["ks"], v_scale=dev["vs"])
    assert got.shape == (B, T, H, D) and got.is_contiguous() and got.dtype == dtype
    # fp16 products either way; float32 ones are TF32 on a GPU's tensor cores (an H100: 1.2e-2 off at most)
    _close(got, expected, rtol=1e-5 if dtype == torch.float32 and not CUDA else 2e-3)
    kf = k.float() if ks is None else ref.kv_dequantize(k, ks, torch.float32)
    vf = v.float() if vs is None else ref.kv_dequantize(v, vs, torch.float32)
    plain = torch.nn.functional.scaled_dot_product_attention(q.float(), kf[..., :n, :], vf[..., :n, :], scale=0.3)
    assert masked == (not torch.allclose(got.float().cpu(), plain.transpose(1, 2), atol=0.1))  # the mask applied


@pytest.mark.parametrize("kv8", [False, True], ids=["fp-cache", "int8-cache"])
@pytest.mark.parametrize("T", [8, 13])
def test_attention_writes_the_projection_codes(kv8, T):
    """With the output projection's grid, the kernel writes its input codes: each row ``b, t`` on token ``t``'s
    group (three groups, zero points; a map of ``T`` tokens), as the reference quantizes the float attention."""
    gen = _gen(34)
    B, H, L, D, n = 2, 2, 30, 16, 26
    (k, ks), (v, vs) = _int8_cache(B, H, L, D, gen), _int8_cache(B, H, L, D, gen)
    if not kv8:
        k, v, ks, vs = ref.kv_dequantize(k, ks, torch.float16), ref.kv_dequantize(v, vs, torch.float16), None, None
    q = torch.randn(B, T, H, D, generator=gen).transpose(1, 2).half()
    groups = torch.randint(0, 3, (T,), generator=gen)
    grid = {"out_inv_scale": 1 / (torch.rand(3, generator=gen) * 0.03 + 0.02),
            "out_zero": torch.tensor([-3.0, 0.0, 5.0]), "groups": groups}
    dev = _to({"q": q, "k": k, "v": v, "ks": ks, "vs": vs, **grid}, DEV)
    got = ops.attention(dev["q"], dev["k"], dev["v"], None, n, None, k_scale=dev["ks"], v_scale=dev["vs"],
                        out_inv_scale=dev["out_inv_scale"], out_zero=dev["out_zero"], groups=dev["groups"])
    assert got.shape == (B, T, H, D) and got.dtype == torch.int8
    # fp16 products against the reference's float32 ones: a code may tip where the value is within 1e-2 of a midpoint
    def rows(*args, **kwargs):  # [B * T, C], as the quantizer saw them
        return ref.attention(*args, **kwargs).reshape(B * T, H * D)

    _assert_codes(got.reshape(B * T, H * D), rows, q, k, v, None, n, D ** -0.5, k_scale=ks, v_scale=vs, **grid,
                  tol=1e-2)


@FP8_CODES
def test_attention_writes_fp8_codes():
    gen = _gen(35)
    B, H, L, D, T = 2, 2, 20, 16, 6
    k, v = (torch.randn(B, H, L, D, generator=gen).half() for _ in range(2))
    q = torch.randn(B, T, H, D, generator=gen).transpose(1, 2).half()
    inv = torch.tensor([200.0, 400.0])
    groups = torch.tensor([0, 1, 1, 0, 1, 0])
    got = ops.attention(q.to(DEV), k.to(DEV), v.to(DEV), None, L, None, out_inv_scale=inv.to(DEV),
                        groups=groups.to(DEV), fp8=True)
    expected = ref.attention(q, k, v, None, L, D ** -0.5, out_inv_scale=inv, groups=groups, fp8=True)
    assert got.dtype == torch.float8_e4m3fn
    _close(got.float(), expected.float(), rtol=0.07)  # a code apart at most: E4M3 steps are 1/8 relative


def test_gemm_tiles_follow_the_row_count():
    """The GEMM autotuner's pruning (on a GPU): small tiles for decode, large ones for a whole VAR scale, both in
    between; TMA tiles only where rows are 16-byte aligned (the input's for loads, the output's for stores)."""
    def tiles(m, k=1024, n=1024):
        return kernels._prune(kernels.QGEMM_CONFIGS, {"M_BUCKET": m, "K": k, "N": n,
                                                      "a_ptr": torch.empty(1, device=DEV)})

    def heights(m):
        return {c.kwargs["BLOCK_M"] for c in tiles(m)}
    assert max(heights(128)) <= 64 and min(heights(32768)) >= 128
    assert min(heights(2048)) <= 64 < max(heights(2048))
    unaligned = tiles(32768, k=1000)
    assert unaligned and not any(c.kwargs["TMA"] for c in unaligned)
    if CUDA and torch.cuda.get_device_capability()[0] < 9:
        return  # no TMA tiles at all
    assert any(c.kwargs["TMA_STORE"] for c in tiles(32768))
    stored = tiles(32768, n=1000)
    assert stored and not any(c.kwargs["TMA_STORE"] for c in stored) and any(c.kwargs["TMA"] for c in stored)


def test_attention_tiles_follow_the_query_count():
    """The autotuner's pruning (on a GPU; the interpreter runs one tile): 16-row tiles for decode, larger ones
    for many queries, whichever way Triton hands it the bucket."""
    tiles = kernels._prune_attention(kernels.ATTENTION_CONFIGS, {"T": 1})
    assert tiles and {c.kwargs["BLOCK_M"] for c in tiles} == {16}
    tiles = kernels._prune_attention(kernels.ATTENTION_CONFIGS, {}, T=169)
    assert tiles and 16 not in {c.kwargs["BLOCK_M"] for c in tiles}


def test_attention_autotuning_runs(monkeypatch):
    """The GPU's tuning path (several tiles, pruned, each timed) end to end; under the interpreter each tile
    runs once and is "timed" by a stand-in. The tile chosen gives the reference's result. Each query count is
    tuned once: 9 and 12 queries each (one power-of-two bucket), 9 again not."""
    ran = []

    def bench(fn, quantiles=None, **kwargs):
        fn()
        ran.append(1)
        return [float(len(ran))] * (len(quantiles) if quantiles else 1)

    tuner = kernels.attention_tuner([kernels._attention_config(16, 16, 4, 1), kernels._attention_config(16, 32, 4, 1),
                                     kernels._attention_config(32, 16, 4, 1)], bench, cache_results=False)
    monkeypatch.setattr(kernels, "_attention_autotuned", tuner)
    gen = _gen(33)
    k, ks = _int8_cache(1, 2, 20, 16, gen)
    v, vs = _int8_cache(1, 2, 20, 16, gen)
    for T, timed in ((1, 2), (40, 0), (9, 2), (12, 2), (9, 0)):  # 40: one tile left after pruning, nothing to time
        ran.clear()
        q = torch.randn(1, 2, T, 16, generator=gen).half()
        got = ops.attention(q, k, v, None, 20, None, k_scale=ks, v_scale=vs)
        _close(got, ref.attention(q, k, v, None, 20, 16 ** -0.5, k_scale=ks, v_scale=vs), rtol=2e-3)
        if INTERPRET:  # (Triton 3.6 on a GPU times the tiles with its own benchmarker, not the stand-in)
            assert len(ran) == timed, T


def test_untuned_launches_one_fixed_tile_a_size(monkeypatch):
    """Within ``untuned()`` neither autotuner runs: the GEMM launches the small or large fixed tile by its row
    count, the attention the few- or many-query tile, each with the reference's result. Outside, tuning is back."""
    launched, tuned = [], []
    for name in ("_heuristic", "_attention_kernel"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(fn, "run", lambda *a, _run=fn.run, **kw: launched.append(kw["BLOCK_M"]) or _run(*a, **kw))
    for name in ("_autotuned", "_attention_autotuned"):
        monkeypatch.setattr(getattr(kernels, name), "run", lambda *a, **kw: tuned.append(1))
    gen = _gen(41)
    gemms = [{**_gemm_args(m, 48, 40, gen), "out_dtype": torch.float32} for m in (24, 300)]
    k, v = (torch.randn(1, 2, 20, 16, generator=gen).half() for _ in range(2))
    queries = [torch.randn(1, 2, t, 16, generator=gen).half() for t in (1, 40)]
    with kernels.untuned():
        for args in gemms:
            _close(kernels.qgemm(**_to(args, DEV)), ref.qgemm(**args))
        for q in queries:
            got = kernels.attention(q.to(DEV), k.to(DEV), v.to(DEV), None, 20, 0.25)
            _close(got, ref.attention(q.float(), k.float(), v.float(), None, 20, 0.25), rtol=2e-3)
    small, large = (kernels.UNTUNED_TILES[s].kwargs["BLOCK_M"] for s in ("small", "large"))
    few, many = (kernels.UNTUNED_ATTENTION[s].kwargs["BLOCK_M"] for s in ("few", "many"))
    assert launched == [small, large, few, many] and small != large and few != many and tuned == []
    kernels.qgemm(**_to(gemms[0], DEV))
    assert tuned == [1]


def test_int8_cache_checks():
    k, ks = ref.kv_quantize(torch.randn(1, 2, 8, 4))
    with pytest.raises(ValueError, match="scales must be float32"):
        ops.kv_write_int8(k, ks.half(), torch.tensor([0]), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="must be an int8"):
        ops.kv_write_int8(k.float(), ks, torch.tensor([0]), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="n_keys must be"):
        ops.attention(torch.randn(1, 2, 3, 4), k, k, None, 9, None, k_scale=ks, v_scale=ks)
    with pytest.raises(ValueError, match="k_scale and v_scale go together"):
        ops.attention(torch.randn(1, 2, 3, 4), k, k, None, 8, None, k_scale=ks)
    with pytest.raises(ValueError, match="cache in q's dtype"):
        ops.attention(torch.randn(1, 2, 3, 4), k, k, None, 8, None)
    with pytest.raises(ValueError, match="out_zero is required"):
        f = torch.randn(1, 2, 8, 4)
        ops.attention(torch.randn(1, 2, 3, 4), f, f, None, 8, None, out_inv_scale=torch.ones(1))


# ------------------------------------------------------------------------------- ops: dispatch, checks

def test_ops_dispatch(monkeypatch):
    args = _gemm_args(24, 40, 16, _gen(10))
    monkeypatch.setattr(kernels, "qgemm", lambda *a, **k: "kernel")
    monkeypatch.setattr(kernels, "act_quant", lambda *a, **k: "kernel")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(ops.qgemm(**args), ref.qgemm(**args))  # CPU tensors: the reference
    x = torch.randn(24, 16)
    q = _quant(_gen(11))
    assert torch.equal(ops.act_quant(x, act="gelu", **q), ref.act_quant(x, act="gelu", **q))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.qgemm(**args) == "kernel"
    assert ops.act_quant(x, act="gelu", **q) == "kernel"


def test_ops_non_contiguous(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = _gemm_args(24, 40, 16, _gen(12))
    a_t = args["a"].t().contiguous().t()  # same values, column-major
    assert not a_t.is_contiguous()
    out = ops.qgemm(**_to({**args, "a": a_t}, DEV), out_dtype=torch.float32)
    _close(out, ref.qgemm(**args, out_dtype=torch.float32))


def test_ops_bad_input():
    args = _gemm_args(24, 40, 16, _gen(13))
    with pytest.raises(ValueError, match="K mismatch"):
        ops.qgemm(**{**args, "w": args["w"][:, :32]})
    with pytest.raises(ValueError, match="codes as w"):
        ops.qgemm(**{**args, "a": args["a"].float()})
    with pytest.raises(ValueError, match="w must be"):
        ops.qgemm(**{**args, "w": args["w"].float()})
    with pytest.raises(ValueError, match="2-d"):
        ops.qgemm(**{**args, "a": args["a"].view(3, 8, 40)})
    with pytest.raises(ValueError, match="bias must have 16"):
        ops.qgemm(**{**args, "bias": torch.zeros(15)})
    x = torch.randn(24, 16)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.act_quant(x, act="relu", **_quant(_gen(14)))
    with pytest.raises(ValueError, match="gate"):
        ops.act_quant(x, act="swiglu", **_quant(_gen(14)))
    with pytest.raises(ValueError, match="mod_scale"):
        ops.layernorm_quant(x, None, None, 1e-6, mod_scale=torch.zeros(2, 16), **_quant(_gen(14)))


def test_fp8_on_sm80_raises():
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(8, 0)), \
            mock.patch.object(torch.cuda, "get_device_name", return_value="NVIDIA A100"), \
            pytest.raises(RuntimeError, match="FP8 .* compute capability 8.9"):
        kernels._check_fp8(torch.device("cuda"))


# ---------------------------------------------------------------------------------- compiled, no GPU

# The interpreter runs the kernels as Python; this compiles them for sm90/sm89/sm80 without a GPU (Triton
# ships ptxas), which catches what only the compiler rejects. In a fresh process: it needs compiled, not
# interpreted, kernels.
_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from backends.cuda import kernels as k

def build(fn, arch, const, ptrs, warps=4, stages=3):
    sig = {n: "constexpr" if n in const else ptrs.get(n, "*fp32") if n.endswith("_ptr")
           else "fp32" if n in ("eps", "qmin", "qmax", "in_qmin", "in_qmax", "norm_eps", "qk_scale") else "i32" for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
    triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": warps, "num_stages": stages})

flags = {"HAS_BIAS": True, "HAS_GROUPS": True, "GELU": True, "QUANT_OUT": True, "EVEN_K": False, "QUANT_IN": False,
         "SWIGLU": False, "QKV": False, "NORM_QK": False, "HAS_GAIN": False, "HEAD_D": 1,
         "RESIDUAL": False, "HAS_RES_GAIN": False, "OFFS64": False, "ONE_TOKEN": False}
swiglu = {**flags, "GELU": False, "QUANT_IN": True, "SWIGLU": True}
qkv = {**flags, "GELU": False, "QUANT_OUT": False, "QKV": True, "NORM_QK": True, "HAS_GAIN": True}
residual = {**flags, "GELU": False, "QUANT_OUT": False, "RESIDUAL": True, "HAS_RES_GAIN": True}
for arch, code, tile, f in [(90, "i8", (64, 64, 64, 4, 3), flags), (80, "i8", (64, 64, 64, 4, 3), {**flags, "OFFS64": True}),
                            (90, "fp8e4nv", (64, 64, 64, 4, 3, True, True), flags),
                            (89, "fp8e4nv", (64, 64, 64, 4, 3), flags), (80, "i8", (64, 64, 64, 4, 3), flags),
                            (90, "i8", (64, 64, 64, 4, 3, True, True), swiglu),
                            (80, "i8", (32, 64, 128, 4, 4), {**swiglu, "ONE_TOKEN": True}),
                            (90, "i8", k.tile_config(128, 128, 128, 4, 3, True, True, occupancy=2, tma_store=True),
                             flags),
                            (90, "i8", k.tile_config(128, 128, 128, 8, 3, True, True, tma_store=True), swiglu),
                            (90, "i8", k.tile_config(128, 256, 128, 8, 3, True, True, async_mma=True), residual),
                            (90, "fp8e4nv", k.tile_config(128, 128, 128, 4, 3, True, True, occupancy=2,
                                                          tma_store=True), {**residual, "OFFS64": True}),
                            (80, "i8", (128, 128, 64, 4, 4), {**residual, "ONE_TOKEN": True}),
                            *[(arch, "i8", k.qkv_tiles(64)[kind], {**qkv, "HEAD_D": 64})
                              for arch, kind in [(90, "hopper"), (80, "ampere")]]]:
    c = tile if isinstance(tile, triton.Config) else k.tile_config(*tile)
    ptrs = {"a_ptr": "*fp16" if f["QUANT_IN"] else "*" + code, "w_ptr": "*" + code,
            "out_ptr": "*" + code if f["QUANT_OUT"] else "*fp16", "groups_ptr": "*i32", "q_ptr": "*fp16",
            "kc_ptr": "*fp16", "vc_ptr": "*fp16", "index_ptr": "*i64", "res_ptr": "*fp16", "res_gain_ptr": "*fp16"}
    build(k._qgemm_kernel, arch, {**f, **c.kwargs}, ptrs, c.num_warps, c.num_stages)
q = {"HAS_GROUPS": True, "BLOCK_M": 4, "BLOCK_K": 1024}
build(k._layernorm_quant_kernel, 90, {**q, "HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_MOD_SCALE": True,
      "HAS_MOD_SHIFT": True, "FP8": True, "HAS_RESIDUAL": True, "HAS_GAIN": True},
      {"x_ptr": "*fp16", "out_ptr": "*fp8e4nv", "groups_ptr": "*i64", "res_ptr": "*fp16", "sum_ptr": "*fp16"})
build(k._rmsnorm_quant_kernel, 80, {**q, "HAS_WEIGHT": True, "FP8": False, "HAS_RESIDUAL": True, "HAS_GAIN": False},
      {"x_ptr": "*bf16", "out_ptr": "*i8", "groups_ptr": "*i32", "res_ptr": "*bf16", "sum_ptr": "*bf16"})
build(k._act_quant_kernel, 90, {**q, "ACT": "swiglu", "FP8": False},
      {"x_ptr": "*fp16", "gate_ptr": "*fp16", "out_ptr": "*i8", "groups_ptr": "*i32"})
build(k._kv_write_kernel, 80, {"BLOCK_T": 64, "BLOCK_D": 64},
      {"cache_ptr": "*fp16", "value_ptr": "*fp16", "index_ptr": "*i64"})
build(k._kv_write_int8_kernel, 80, {"BLOCK_T": 64, "BLOCK_D": 64},
      {"cache_ptr": "*i8", "value_ptr": "*fp16", "index_ptr": "*i64"})
attention = {"D": 64, "HAS_MASK": True, "HAS_GROUPS": True, "BLOCK_D": 64}
for arch, c, kv8, out in [(90, k.ATTENTION_CONFIGS[3], True, "fp16"), (80, k.ATTENTION_CONFIGS[0], True, "i8"),
                          (90, k.ATTENTION_CONFIGS[3], False, "i8"), (80, k.ATTENTION_CONFIGS[2], False, "fp16"),
                          (89, k.ATTENTION_CONFIGS[3], False, "fp8e4nv")]:
    cache = "*i8" if kv8 else "*fp16"
    build(k._attention_kernel, arch, {**attention, "KV_INT8": kv8, "QUANT_OUT": out != "fp16", "FP8": out == "fp8e4nv",
                                      **c.kwargs},
          {"q_ptr": "*fp16", "k_ptr": cache, "v_ptr": cache, "out_ptr": "*" + out, "groups_ptr": "*i64"}, c.num_warps,
          c.num_stages)
"""


def test_kernels_compile_for_gpus(compiled_script):
    compiled_script(_COMPILE)


# --------------------------------------------------------------------------------- GPU, moderate sizes

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
M_GPU, K_GPU, N_GPU, T_GPU = 4096, 1024, 3072, 256


def _gpu_args(dtype, gen):
    groups = torch.randint(0, 3, (T_GPU,), generator=gen, dtype=torch.int32)
    args = _gemm_args(M_GPU, K_GPU, N_GPU, gen, dtype=dtype)
    return {**args, "groups": groups, "tokens": T_GPU}


@gpu
@pytest.mark.parametrize("dtype", [torch.int8, pytest.param(torch.float8_e4m3fn, marks=FP8_GEMM)])
def test_gpu_qgemm(dtype):
    args = _gpu_args(dtype, _gen(20))
    out = ops.qgemm(**_to(args, "cuda"))
    _close(out, ref.qgemm(**args), rtol=1e-3)  # fp16 output
    out32 = ops.qgemm(**_to(args, "cuda"), out_dtype=torch.float32)
    _close(out32, ref.qgemm(**args, out_dtype=torch.float32), rtol=1e-5 if dtype == torch.int8 else FP8_RTOL)
    assert kernels.autotune_cache()["chosen"], "the autotuner chose no config"


@gpu
@pytest.mark.parametrize("dtype", [torch.int8, pytest.param(torch.float8_e4m3fn, marks=FP8_CODES)])
def test_gpu_qgemm_quantized(dtype):
    args = _gpu_args(dtype, _gen(21))
    q = {"out_inv_scale": torch.tensor([2.0, 4.0, 8.0]), "out_zero": torch.tensor([3.0, 0.0, -7.0])}
    out = ops.qgemm(**_to(args, "cuda"), gelu=True, **_to(q, "cuda"))
    # FP8 at K=1024: the MMA's ~14-bit accumulation moves these codes' inputs by up to ~7e-3 (a truncation
    # model of it on this data; 24 of 12.5M codes differed beyond 2e-3 on an H100).
    _assert_codes(out, ref.qgemm, **args, gelu=True, **q, tol=GELU_RTOL if dtype == torch.int8 else 100 * FP8_RTOL)


IN_FLIGHT = [c for c in kernels.QGEMM_CONFIGS if c.kwargs["ASYNC_MMA"]]


@gpu
@pytest.mark.skipif(CUDA and torch.cuda.get_device_capability()[0] != 9,
                    reason="int8 MMAs kept in flight are Hopper's (sm90) only")
@pytest.mark.parametrize("config", IN_FLIGHT, ids=lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}"
                         f"w{c.num_warps}P{int(c.kwargs['PERSISTENT'])}S{int(c.kwargs['TMA_STORE'])}")
def test_gpu_qgemm_in_flight_mmas_exact(config):
    """backends/cuda/wgmma.py's rewrite, as the GPU runs it: several tiles a program, 16 K steps. The int32 sums
    are exact in float32 (|sums| < 2**24) and rounded once to the fp16 output (float32 outputs take shared memory
    the 128 x 256 tile does not have), as torch rounds the exact sums."""
    gen = _gen(23)
    M, K, N = 2048, 2048, 768
    a, w = _codes((M, K), gen) // 2, _codes((N, K), gen) // 2
    ones = torch.ones(N, device="cuda")
    out = kernels.qgemm(a.cuda(), w.cuda(), ones, w.float().sum(1).cuda(), torch.ones(1, device="cuda"),
                        torch.tensor([5.0], device="cuda"), out_dtype=torch.float16, config=config)
    exact = a.long() @ w.long().t() - 5 * w.long().sum(1)
    assert torch.equal(out.cpu(), exact.float().half())


LARGE_TILES = [c for c in kernels.QGEMM_CONFIGS if c.kwargs["BLOCK_M"] >= 128 and not c.kwargs["TMA_STORE"]]


@gpu
@pytest.mark.parametrize("config", LARGE_TILES,
                         ids=lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}"
                         f"P{int(c.kwargs['PERSISTENT'])}T{int(c.kwargs['TMA'])}A{int(c.kwargs['ASYNC_MMA'])}")
def test_gpu_qgemm_residual_tiles(config):
    """The residual epilogue (two column halves a tile) on every large tile the autotuner may give proj and fc2:
    VAR's widths, rows of 16 images of 256 tokens less 40 (a partial row tile), a strided per-image gain."""
    if (config.kwargs["TMA"] or config.kwargs["ASYNC_MMA"]) and not SM90:
        pytest.skip("TMA and in-flight tiles need a Hopper GPU (sm90)")
    gen = _gen(24)
    M, K, N, tokens = 16 * 256 - 40, 1024, 1024, 256
    args = {**_gemm_args(M, K, N, gen), "groups": torch.randint(0, 3, (tokens,), generator=gen), "tokens": tokens}
    res = {"residual": (torch.randn(M, N, generator=gen) * 4).half(),
           "gain": torch.randn(16, 2 * N, generator=gen)[:, N:]}
    out = kernels.qgemm(**_to(args, "cuda"), **_to(res, "cuda"), config=config)
    _close(out, ref.qgemm(**args, **res), rtol=1e-3)


@gpu
def test_gpu_kernels_compile_once_for_every_scale(monkeypatch):
    """A VAR generation changes the tokens per image and the attention's key count at every scale. Whether
    such a count is a multiple of 16 or not must not compile a tile again (Triton specializes integers on it
    unless told not to); each count still gets its own result. The first call may compile (unless an earlier
    test in this process did), the others must not. (One token an image has a binary of its own, ONE_TOKEN,
    so the GEMM's counts here are all above one.)"""
    from triton import knobs

    compiled = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: compiled.append(kw["fn"].name))
    gen = _gen(25)
    q = torch.randn(2, 64, 4, 64, generator=gen).transpose(1, 2).half()
    k, v = (torch.randn(2, 4, 128, 64, generator=gen).half() for _ in range(2))

    def gemm(tokens):  # 80 rows: 5, 16 or 8 images
        args = {**_gemm_args(80, 64, 64, gen), "groups": torch.randint(0, 3, (tokens,), generator=gen),
                "tokens": tokens}
        got = kernels.qgemm(**_to(args, "cuda"), config=kernels.tile_config(64, 64, 128, 4, 3))
        _close(got, ref.qgemm(**args), rtol=1e-3)

    def attention(n):
        got = kernels.attention(q.cuda(), k.cuda(), v.cuda(), None, n, 0.125, config=kernels.ATTENTION_CONFIGS[2])
        _close(got, ref.attention(q.float(), k.float(), v.float(), None, n, 0.125), rtol=2e-3)

    for run, counts in ((gemm, (16, 5, 10)), (attention, (1, 96, 70))):
        run(counts[0])
        compiled.clear()
        for count in counts[1:]:
            run(count)
        assert compiled == [], run.__name__


@gpu
@pytest.mark.parametrize("n", [680, 640], ids=["partial-last-block", "whole-blocks"])
@pytest.mark.parametrize("config", kernels.ATTENTION_CONFIGS, ids=lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}"
                         f"w{c.num_warps}s{c.num_stages}")
def test_gpu_attention_tiles(config, n):
    """Every attention tile at VAR's last-scale shape (256 queries over 680 cached keys: whole key blocks and a
    partial last one; 640: whole blocks only), against the float32 reference."""
    gen = _gen(37)
    B, H, T, L, D = 2, 4, 256, 704, 64
    q = torch.randn(B, T, H, D, generator=gen).transpose(1, 2).half()
    k, v = (torch.randn(B, H, L, D, generator=gen).half() for _ in range(2))
    got = kernels.attention(q.cuda(), k.cuda(), v.cuda(), None, n, D ** -0.5, config=config)
    _close(got, ref.attention(q.float(), k.float(), v.float(), None, n, D ** -0.5), rtol=2e-3)


@gpu
@pytest.mark.parametrize("fp8", [False, pytest.param(True, marks=FP8_CODES)])
def test_gpu_norms(fp8):
    gen = _gen(22)
    x = torch.randn(M_GPU, K_GPU, generator=gen).half()
    q = {**_quant(gen, fp8), "groups": torch.randint(0, 3, (T_GPU,), generator=gen), "tokens": T_GPU}
    B = M_GPU // T_GPU
    ln = {"mod_scale": torch.randn(B, K_GPU, generator=gen) * 0.2,
          "mod_shift": torch.randn(B, K_GPU, generator=gen) * 0.2}
    w = torch.rand(K_GPU, generator=gen) + 0.5
    _assert_codes(ops.layernorm_quant(x.cuda(), w.cuda(), None, 1e-6, **_to({**q, **ln}, "cuda")),
                  ref.layernorm_quant, x, w, None, 1e-6, **q, **ln)
    out = ops.rmsnorm_quant(x.cuda(), w.cuda(), 1e-6, **_to(q, "cuda"))
    _assert_codes(out, ref.rmsnorm_quant, x, w, 1e-6, **q)
    gate = torch.randn(M_GPU, K_GPU, generator=gen).half()
    for act in ("gelu", "gelu_tanh", "swiglu"):
        g = gate if act == "swiglu" else None
        out = ops.act_quant(x.cuda(), act=act, gate=None if g is None else g.cuda(), **_to(q, "cuda"))
        _assert_codes(out, ref.act_quant, x, act=act, gate=g, **q, tol=GELU_RTOL if act == "gelu_tanh" else 1e-4)
