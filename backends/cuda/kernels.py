"""Triton kernels of the GPU backend: the functions of ``backends/cuda/reference.py``, each one launch.

The host functions here take validated, contiguous 2-d inputs (``backends/cuda/ops.py`` checks and
dispatches). They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
triton was first imported.

Numerics:
- Rounding is half-to-even: by the float unit itself in epilogues and norms (``_int8_round``, the same
  instructions compiled and under the interpreter); libdevice ``rint`` in the GEMM's input prologue (floor
  arithmetic under the interpreter, which has no libdevice).
- INT8 GEMM: int32 accumulation, and the zero-point correction ``acc - a_zero[g] * colsum[n]`` in int32 too,
  exact since ``a_zero`` and ``colsum`` hold integers (the contract); the rest of the epilogue is fp32.
- tanh-GELU: compiled, its tanh is the special-function unit's ``tanh.approx`` (relative error 2**-11);
  interpreted, the exact formula.
- FP8 GEMM: fp32 accumulation, promoted every ``BLOCK_K`` on sm90 (``max_num_imprecise_acc``), as
  ``_scaled_mm`` does without fast accumulation. FP8 needs sm89+; INT8 also runs on sm80.

The GEMM is autotuned per (N, K, power-of-two bucket of M, dtypes); with ``cache_results`` Triton keeps each
choice on disk under its cache directory (``TRITON_CACHE_DIR``): ``autotune_cache()`` lists those files so a
deployable directory can carry them. Within ``untuned()`` both kernels launch one fixed tile a size instead.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.testing import do_bench

from backends.cuda import wgmma

try:
    from triton.language.extra import libdevice
except ImportError:  # older layouts
    from triton.language.extra.cuda import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit when this module is imported
_COMPILED = tl.constexpr(not INTERPRET)  # libdevice and inline PTX exist only compiled
# Hopper's int8 MMAs in flight across K steps (tiles with ASYNC_MMA): Triton keeps them synchronous by itself.
ASYNC_MMA = wgmma.install()


def _or(t, dummy):
    """Absent tensors pass a dummy pointer, never read (their HAS_* flag is off)."""
    return dummy if t is None else t


# --------------------------------------------------------------------------------------------- helpers

@triton.jit
def _round_half_even(x):
    """libdevice ``rint`` when compiled; floor arithmetic under the interpreter, which has no libdevice."""
    if _COMPILED:
        r = libdevice.rint(x)
    else:
        f = tl.floor(x)
        d = x - f  # exact for |x| < 2**23
        odd = f - 2.0 * tl.floor(0.5 * f) == 1.0
        r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
    return r


@triton.jit
def _int8_round(x):
    """``x`` (within int8's range) rounded half to even, as int8. Adding 1.5 * 2**23 leaves the rounded integer in
    the float's low mantissa bits (the FPU rounds half to even), read back with an integer subtract: a float add
    and integer ops instead of ``rint`` and a float-to-int conversion, which Hopper runs at 1/8 of its FMA rate
    (in an epilogue every output element pays them)."""
    r = x + 12582912.0
    return (r.to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)


@triton.jit
def _gelu_tanh(y):
    """Compiled: ``0.5 * y * (1 + tanh(u))`` with the special-function unit's ``tanh.approx`` (relative error
    2**-11, below fp16's rounding), one such instruction an element where ``exp`` and a division take two.
    Interpreted:
    ``y / (1 + exp(-2u))``, the same function exactly (the interpreter has neither tanh nor inline PTX)."""
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    if _COMPILED:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True,
                                      pack=1)
        g = 0.5 * y + 0.5 * y * t
    else:
        g = tl.fdiv(y, 1.0 + tl.exp(-2.0 * u))
    return g


@triton.jit
def _row_groups(rows, row_mask, groups_ptr, tokens, HAS_GROUPS: tl.constexpr):
    if HAS_GROUPS:
        g = tl.load(groups_ptr + rows % tokens, mask=row_mask, other=0)
    else:
        g = tl.zeros_like(rows)
    return g


@triton.jit
def _to_codes(y, zero, qmin, qmax, FP8: tl.constexpr, CONVERT: tl.constexpr):
    """``y`` (already times the inverse scale) plus ``zero`` as codes; FP8 has no zero point. ``CONVERT``: round
    with ``rint`` and a conversion (the GEMM's input prologue, verified on the GPU that way; its tiles feed the MMA)
    instead of ``_int8_round``'s float add (epilogues and norms)."""
    if FP8:
        codes = tl.clamp(y, -448.0, 448.0).to(tl.float8e4nv)
    elif CONVERT:
        codes = _round_half_even(tl.clamp(y + zero, qmin, qmax)).to(tl.int8)
    else:
        # Clamping to integer bounds before rounding equals rounding before clamping.
        codes = _int8_round(tl.clamp(y + zero, qmin, qmax))
    return codes


@triton.jit
def _quantize(y, g, inv_scale_ptr, zero_ptr, qmin, qmax, FP8: tl.constexpr):
    """Rows of ``y`` onto their group's grid: ``y * inv_scale[g] (+ zero[g])``, as the fake-quant graph."""
    y = y * tl.load(inv_scale_ptr + g).to(tl.float32)[:, None]
    zero = 0.0 if FP8 else tl.load(zero_ptr + g).to(tl.float32)[:, None]
    return _to_codes(y, zero, qmin, qmax, FP8, False)


# ------------------------------------------------------------------------------------------------ GEMM

# tokens is not specialized: it changes with every VAR scale, and its divisibility by 16 would compile each tile
# again (the MNIST VAR's generation of 50 images: 108 binaries instead of 182, benchmarks/compile_count.py);
# compiled for sm90 with and without (Triton 3.6), VAR-d16's epilogues give the same binaries. One token an image
# (decode, VAR's first scale) is ONE_TOKEN instead: dividing rows by a runtime count costs decode's tiles 40-64
# instructions (4-10 %), and GPT-B decode's GEMMs measured 12 % slower without it (H100). M is specialized:
# without it, the plain store's binaries grow by up to 2 % (54 binaries), not measured on a GPU yet.
@triton.jit(do_not_specialize=["M_BUCKET", "tokens"])
def _qgemm_kernel(a_ptr, w_ptr, out_ptr, w_scale_ptr, colsum_ptr, a_scale_ptr, a_zero_ptr, bias_ptr,
                  groups_ptr, out_inv_scale_ptr, out_zero_ptr, M, N, K, M_BUCKET, tokens, qmin, qmax,
                  a_inv_scale_ptr, in_qmin, in_qmax, q_ptr, kc_ptr, vc_ptr, index_ptr, gain_ptr, sc_b, sc_h, sc_l,
                  norm_eps, res_ptr, res_gain_ptr, res_gain_stride,
                  HAS_BIAS: tl.constexpr, HAS_GROUPS: tl.constexpr, GELU: tl.constexpr,
                  QUANT_OUT: tl.constexpr, QUANT_IN: tl.constexpr, SWIGLU: tl.constexpr,
                  QKV: tl.constexpr, NORM_QK: tl.constexpr, HAS_GAIN: tl.constexpr, HEAD_D: tl.constexpr,
                  RESIDUAL: tl.constexpr, HAS_RES_GAIN: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  PERSISTENT: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr, FLATTEN: tl.constexpr,
                  WS_TILES: tl.constexpr, WS_K: tl.constexpr, OCCUPANCY: tl.constexpr,
                  TMA_STORE: tl.constexpr, OFFS64: tl.constexpr, ASYNC_MMA: tl.constexpr, ONE_TOKEN: tl.constexpr):
    FP8: tl.constexpr = w_ptr.dtype.element_ty == tl.float8e4nv
    if ONE_TOKEN:  # a constant: row // tokens and row % tokens fold away
        tokens = 1
    # QUANT_IN: ``a`` is float and its grid's quantizer runs here, tile by tile, instead of as a kernel of its
    # own (a launch saved: what matters at decode's few rows). SWIGLU: w's rows are gate and up interleaved.
    if SWIGLU:
        N_OUT = N // 2
        BLOCK_OUT: tl.constexpr = BLOCK_N // 2
    else:
        N_OUT = N
        BLOCK_OUT: tl.constexpr = BLOCK_N
    if TMA:  # Hopper's bulk tensor copies; out-of-range boxes read zeros, so no masks
        if not QUANT_IN:
            a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [K, 1], [BLOCK_N, BLOCK_K])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # A plain launch has one program per tile (one trip); a persistent one (OCCUPANCY programs per SM) strides
    # over the tiles. Flattening lets the next tile's loads start under this tile's epilogue; warp
    # specialization (Hopper) gives loads, MMAs and the epilogue their own warps instead.
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0), flatten=FLATTEN,
                         warp_specialize=WS_TILES):
        # Grouped order: GROUP_M row blocks share each column block while it is in L2.
        group = tile // (GROUP_M * num_pid_n)
        group_m = min(num_pid_m - group * GROUP_M, GROUP_M)
        pid_m = group * GROUP_M + (tile % group_m)
        pid_n = (tile % (GROUP_M * num_pid_n)) // group_m

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        # Out-of-range rows/columns read row 0 instead of masking the loads; their results are never stored.
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + tl.where(row_ok, rows, 0).to(tl.int64)[:, None] * K + offs_k[None, :]
        w_ptrs = w_ptr + tl.where(col_ok, cols, 0).to(tl.int64)[None, :] * K + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
        g = _row_groups(rows, row_ok, groups_ptr, tokens, HAS_GROUPS)
        a_zero = tl.load(a_zero_ptr + g)
        if QUANT_IN:
            in_inv = tl.load(a_inv_scale_ptr + g).to(tl.float32)[:, None]
        # ASYNC_MMA marks the loop for backends/cuda/wgmma.py (the attribute does nothing else on Hopper)
        for k in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WS_K, disallow_acc_multi_buffer=ASYNC_MMA):
            k_ok = offs_k < K - k * BLOCK_K
            if TMA and not QUANT_IN:
                a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            elif EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            if TMA:
                b = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K]).T
            elif EVEN_K:
                b = tl.load(w_ptrs)
            else:
                b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            if QUANT_IN:  # padded columns become the zero point's code; w's padding is 0, so they add nothing
                a = _to_codes(a.to(tl.float32) * in_inv, a_zero.to(tl.float32)[:, None], in_qmin, in_qmax, FP8, True)
            if FP8:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
            else:  # triton 3.6 asserts the accumulator's type against out_dtype (float32 by default)
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        colsum = tl.load(colsum_ptr + cols, mask=col_ok, other=0.0)
        if FP8:
            y = acc - a_zero.to(tl.float32)[:, None] * colsum.to(tl.float32)[None, :]
        else:
            y = (acc - a_zero.to(tl.int32)[:, None] * colsum.to(tl.int32)[None, :]).to(tl.float32)
        y = y * tl.load(a_scale_ptr + g).to(tl.float32)[:, None]
        y = y * tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:
            y = _gelu_tanh(y)
        if SWIGLU:  # a tile holds gate and up of the same BLOCK_N / 2 hidden units
            gate, up = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_OUT, 2)))
            y = gate * tl.sigmoid(gate) * up
        if QUANT_OUT:
            out = _quantize(y, g, out_inv_scale_ptr, out_zero_ptr, qmin, qmax, FP8)
        else:
            out = y.to(out_ptr.dtype.element_ty)
        if QKV:
            _qkv_epilogue(y, rows, row_ok, pid_n, N, tokens, q_ptr, kc_ptr, vc_ptr, index_ptr, gain_ptr, sc_b, sc_h,
                          sc_l, norm_eps, BLOCK_N, HEAD_D, NORM_QK, HAS_GAIN)
        elif RESIDUAL:  # in two column halves: a whole tile's residual and gain beside the accumulator spill
            y0, y1 = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            cols0 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
            _residual_epilogue(y0, rows, row_ok, cols0, N, tokens, out_ptr, res_ptr, res_gain_ptr, res_gain_stride,
                               HAS_RES_GAIN, OFFS64)
            _residual_epilogue(y1, rows, row_ok, cols0 + BLOCK_N // 2, N, tokens, out_ptr, res_ptr, res_gain_ptr,
                               res_gain_stride, HAS_RES_GAIN, OFFS64)
        elif TMA_STORE:  # no per-element addresses or masks (the box's out-of-range part is dropped)
            o_desc = tl.make_tensor_descriptor(out_ptr, [M, N_OUT], [N_OUT, 1], [BLOCK_M, BLOCK_OUT])
            o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_OUT], out)
        else:
            cols_out = pid_n * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
            if OFFS64:
                offs = rows.to(tl.int64)[:, None] * N_OUT + cols_out[None, :]
            else:  # int32: fewer address instructions (neither spills: benchmarks/qgemm_sass.py)
                offs = rows[:, None] * N_OUT + cols_out[None, :]
            tl.store(out_ptr + offs, out, mask=row_ok[:, None] & (cols_out < N_OUT)[None, :])


@triton.jit
def _residual_epilogue(y, rows, row_ok, cols, N, tokens, out_ptr, res_ptr, gain_ptr, gain_stride,
                       HAS_GAIN: tl.constexpr, OFFS64: tl.constexpr):
    """``residual + y * gain[image]`` stored for the tile's ``cols``: the residual stream's add, which the next
    norm's kernel would otherwise read ``y`` back for. Row m is image m // tokens."""
    mask = row_ok[:, None] & (cols < N)[None, :]
    if HAS_GAIN:
        y = y * tl.load(gain_ptr + (rows // tokens)[:, None] * gain_stride + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
    if OFFS64:
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    else:
        offs = rows[:, None] * N + cols[None, :]
    y = y + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_epilogue(y, rows, row_ok, pid_n, N, tokens, q_ptr, kc_ptr, vc_ptr, index_ptr, gain_ptr, sc_b, sc_h, sc_l,
                  norm_eps, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, NORM_QK: tl.constexpr,
                  HAS_GAIN: tl.constexpr):
    """An attention's qkv projection written where attention reads it: q (L2-normalized per head, times its
    head's gain: VAR's cosine attention) as ``[M, C]`` rows, k (normalized) and v into the KV caches at the
    tokens' positions. A tile holds whole heads (BLOCK_N a multiple of HEAD_D) of one of q, k, v, so a head's
    norm is a masked row sum. The factors are selects, not branches (Triton 3.6 failed to compile a branch
    yielding values in the persistent tile loop); each part has its own store. Offsets are int32 (the host
    checks the sizes): int64 tiles spill."""
    C = N // 3
    part = (pid_n * BLOCK_N) // C  # 0: q, 1: k, 2: v
    head0 = (pid_n * BLOCK_N - part * C) // HEAD_D
    d = tl.arange(0, BLOCK_N)
    head = d // HEAD_D  # of the tile's heads
    if NORM_QK:  # F.normalize: x / max(|x|, eps); v keeps its values
        sq = y * y
        inv = tl.zeros_like(y)
        for h in tl.static_range(BLOCK_N // HEAD_D):
            mine = (head == h)[None, :]
            norm = tl.sqrt(tl.sum(tl.where(mine, sq, 0.0), axis=1))
            inv = tl.where(mine, (1.0 / tl.maximum(norm, norm_eps))[:, None], inv)
        y = y * tl.where(part < 2, inv, 1.0)
    if HAS_GAIN:
        y = y * tl.where(part == 0, tl.load(gain_ptr + head0 + head).to(tl.float32)[None, :], 1.0)
    y = y.to(q_ptr.dtype.element_ty)
    mask = row_ok[:, None]
    if part == 0:
        tl.store(q_ptr + (rows * C + head0 * HEAD_D)[:, None] + d[None, :], y, mask=mask)
    else:
        pos = tl.load(index_ptr + rows % tokens, mask=row_ok, other=0).to(tl.int32)
        offs = ((rows // tokens) * sc_b + pos * sc_l + head0 * sc_h)[:, None] + (head * sc_h + d % HEAD_D)[None, :]
        if part == 1:
            tl.store(kc_ptr + offs, y, mask=mask)
        else:
            tl.store(vc_ptr + offs, y, mask=mask)


def tile_config(bm, bn, bk, warps, stages, persistent=False, tma=False, group_m=8, ws=False, flatten=None,
                occupancy=1, tma_store=False, async_mma=False) -> triton.Config:
    """A ``qgemm`` tile: BLOCK_M x BLOCK_N x BLOCK_K, warps, pipeline stages, persistent grid (``occupancy``
    programs per SM), TMA loads, warp specialization (of the tile loop when persistent, else of the K loop),
    flattened tile loop (default: persistent without warp specialization or ``async_mma``), the output stored
    by TMA, int8 MMAs kept in flight across K steps on Hopper (``backends/cuda/wgmma.py``; not in a flattened
    loop, whose accumulator reset reads the MMA's result)."""
    flatten = persistent and not ws and not async_mma if flatten is None else flatten
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
                          "PERSISTENT": persistent, "TMA": tma, "FLATTEN": flatten, "WS_TILES": ws and persistent,
                          "WS_K": ws and not persistent, "OCCUPANCY": occupancy, "TMA_STORE": tma_store,
                          "ASYNC_MMA": async_mma},
                         num_warps=warps, num_stages=stages)


# Within ``untuned()``: a plain tile for few rows and one for many, each loading on sm80 (64 kB of shared memory).
UNTUNED_TILES = {"small": tile_config(64, 64, 128, 4, 4), "large": tile_config(128, 128, 64, 4, 4)}


def untuned_tile(m: int) -> triton.Config:
    """The GEMM's tile for ``m`` rows within ``untuned()``."""
    return UNTUNED_TILES["small" if m <= 256 else "large"]


# Candidates, small-M (decode) tiles first (at GPT-B decode, 128 rows x 768 columns make 24 tiles of 64 x 64 for
# 132 SMs; 32 x 32 makes 96). Large M: benchmarks/qgemm_sweep.py timed 21 tiles on the VAR-d16
# GEMMs (H100, benchmarks/h100_qgemm_sweep.json). The winner on all four is a 4-warp 128x128x128 tile, persistent
# with TMA loads and two programs per SM (96 kB of shared memory each): one program's epilogue overlaps the
# other's MMAs, 1.35x cuBLAS FP16 over the four against 1.22x for the same tile launched plainly. Warp
# specialization (Triton 3.6 on Hopper) measured slower. The plain and non-TMA tiles stay for sm80/sm89,
# where TMA tiles are pruned and tiles needing more shared memory than the GPU has fail to load (the
# autotuner skips them).
QGEMM_CONFIGS = [
    tile_config(64, 64, 256, 4, 3), UNTUNED_TILES["small"], tile_config(64, 128, 128, 4, 4),
    tile_config(32, 64, 128, 4, 4), tile_config(32, 32, 256, 4, 3),  # decode: more programs for few rows
    tile_config(128, 128, 128, 4, 3, persistent=True, tma=True, occupancy=2),
    tile_config(128, 128, 128, 4, 3, persistent=True, occupancy=2), tile_config(128, 128, 128, 4, 3),
    UNTUNED_TILES["large"], tile_config(256, 128, 128, 8, 3),
    tile_config(128, 256, 128, 8, 4, persistent=True, tma=True),
    # The output stored by TMA: no per-element addresses or masks in the epilogue (compiled as launched, with
    # M, N, K divisible by 16, neither store spills: benchmarks/qgemm_sass.py). It won for fc1's int8 output
    # (H100: 0.314 against 0.326 ms, benchmarks/h100_s9b_qgemm_sweep.json);
    # an fp16 tile to store takes the shared memory a second program needs, and loses (qkv 0.284 against
    # 0.225 ms). With TMA stores, two stages or 8 warps on 128 x 128 lost at every d16 shape.
    tile_config(128, 128, 128, 4, 3, persistent=True, tma=True, occupancy=2, tma_store=True),
    # Hopper, int8 MMAs kept in flight across K steps (backends/cuda/wgmma.py; benchmarks/qgemm_sweep.py
    # --tiles in-flight, H100): one 8-warp program an SM, whose MMAs nothing else overlaps, gains most: fc2
    # 0.225 ms against 0.238 for the best synchronous tile (128 x 256: 0.255 ms without). Two programs an SM
    # gain little (0-3 %): each one's MMAs run while the other waits.
    tile_config(128, 256, 128, 8, 3, persistent=True, tma=True, async_mma=True),
    tile_config(128, 128, 128, 4, 3, persistent=True, tma=True, occupancy=2, async_mma=True),
]
# The interpreter runs one small tile: tests need no tuning and stay fast.
_INTERPRET_CONFIG = tile_config(32, 32, 32, 4, 1)
_tune = True


@contextlib.contextmanager
def untuned():
    """Within it, ``qgemm`` and ``attention`` launch a fixed tile (``UNTUNED_TILES``, ``UNTUNED_ATTENTION``)
    where they would tune: a generation compiles a few binaries and times none. For whole generations in GPU
    tests, which check the lowering, not the speed (each tuned tile has its own test against the reference):
    tuning the MNIST VAR's 30 shapes compiles 128 GEMM binaries (benchmarks/compile_count.py)."""
    global _tune
    saved, _tune = _tune, False
    try:
        yield
    finally:
        _tune = saved


def _prune(configs, named_args, **kwargs):
    """Small tiles up to 8192 rows, large ones from 512: both are tried in between, where a large tile can leave
    SMs without work (VAR's middle scales: 2048 rows x 1024 columns are 128 tiles of 128 x 128 for 132 SMs, two
    programs each). TMA only on Hopper+ and with 16-byte aligned rows. MMAs kept in flight only on Hopper (sm90)
    with the rewrite installed: elsewhere such a tile is its synchronous twin, timed twice."""
    m = named_args["M_BUCKET"]
    major = 9 if INTERPRET else torch.cuda.get_device_capability(named_args["a_ptr"].device)[0]
    tma = major >= 9 and named_args["K"] % 16 == 0
    # the output's rows 16-byte aligned (N / 2 int8 for SwiGLU); the residual epilogue stores by itself
    store = tma and named_args["N"] % 32 == 0 and not kwargs.get("RESIDUAL")
    in_flight = major == 9 and ASYNC_MMA
    return [c for c in configs if (m <= 8192 if c.kwargs["BLOCK_M"] <= 64 else m > 256)
            and (tma or not c.kwargs["TMA"]) and (store or not c.kwargs["TMA_STORE"])
            and (in_flight or not c.kwargs["ASYNC_MMA"])]


def _tma_scratch(size: int, alignment: int, stream):
    """Global memory for the TMA descriptors the kernel builds (``tl.make_tensor_descriptor``)."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


# Outputs from this many elements on (a tile's padded rows included) are addressed with int64 offsets.
OFFS64_FROM = 2**31


def _offs64(args) -> bool:
    return (args["M"] + 256) * args["N"] >= OFFS64_FROM


_heuristic = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                                "OFFS64": _offs64, "ONE_TOKEN": lambda args: args["tokens"] == 1})(_qgemm_kernel)
_autotuned = triton.autotune([_INTERPRET_CONFIG] if INTERPRET else QGEMM_CONFIGS,
                             key=["N", "K", "M_BUCKET", "SWIGLU", "RESIDUAL"],
                             prune_configs_by={"early_config_prune": _prune},
                             do_bench=functools.partial(do_bench, warmup=5, rep=20),
                             cache_results=True)(_heuristic)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_fp8(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(f"FP8 (e4m3) kernels need compute capability 8.9+ (Ada, Hopper); "
                           f"{torch.cuda.get_device_name(device)} is sm{major}{minor}: use the INT8 path")


# Tiles of the qkv epilogue, fixed (the autotuner's pruning cannot see the head size): whole heads each. Large M
# on Hopper: the sweep's winner (128 x 128 x 128, persistent, TMA, two programs an SM), two heads of 64 a tile;
# one head a tile (BLOCK_N = D) elsewhere.
def qkv_tiles(head_dim: int, width: int = 128) -> dict:
    """``width``: the Hopper tile's columns, a multiple of ``head_dim`` dividing C (``qkv_config`` checks)."""
    # not flattened: Triton 3.6 fails to compile the epilogue's branches inside a flattened tile loop
    return {"hopper": tile_config(128, width, 128, 4, 3, persistent=True, tma=True, occupancy=2, flatten=False,
                                  async_mma=ASYNC_MMA),
            "ampere": tile_config(128, head_dim, 64, 4, 4), "small": tile_config(64, head_dim, 128, 4, 4),
            "interpret": tile_config(32, head_dim, 32, 4, 1)}


def qkv_config(m: int, n: int, head_dim: int, device):
    """The tile of a qkv epilogue, or None: the head size must be a power of two in [16, 128] dividing N / 3."""
    if n % 3 or head_dim not in (16, 32, 64, 128) or (n // 3) % head_dim:
        return None
    major = 9 if INTERPRET else torch.cuda.get_device_capability(device)[0]
    kind = "interpret" if INTERPRET else "small" if m <= 256 else "hopper" if major >= 9 else "ampere"
    width = 128 if (n // 3) % 128 == 0 else head_dim  # head_dim divides 128 (checked above)
    tile = qkv_tiles(head_dim, width)[kind]
    if major != 9:  # MMAs kept in flight are Hopper's
        tile = triton.Config({**tile.kwargs, "ASYNC_MMA": False}, num_warps=tile.num_warps, num_stages=tile.num_stages)
    return tile


def qgemm(a, w, w_scale, colsum, a_scale, a_zero, bias=None, *, groups=None, tokens=1, gelu=False,
          out_inv_scale=None, out_zero=None, qmin=-128, qmax=127, out_dtype=torch.float16, swiglu=False,
          a_inv_scale=None, in_qmin=-128, in_qmax=127, qkv=None, residual=None, gain=None, config=None):
    """``reference.qgemm`` in one kernel (``reference.qgemm_qkv`` with ``qkv``: then it returns q). ``config``
    (a ``tile_config``) forces a tile instead of the autotuned one: for benchmarks and tests."""
    fp8 = w.dtype == torch.float8_e4m3fn
    if fp8:
        _check_fp8(a.device)
    (M, K), N = a.shape, w.shape[0]
    quant = out_inv_scale is not None
    out = torch.empty((0 if qkv else M, N // 2 if swiglu else N), device=a.device,
                      dtype=(torch.float8_e4m3fn if fp8 else torch.int8) if quant else out_dtype)
    if M == 0 or N == 0:
        return out
    sms = 4 if INTERPRET or not a.is_cuda else _num_sms(a.device.index or 0)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, sms * meta["OCCUPANCY"]) if meta["PERSISTENT"] else tiles,)

    if a.data_ptr() % 16 or w.data_ptr() % 16:  # TMA needs 16-byte aligned bases (fresh allocations are)
        a, w = a.clone(), w.clone()
    triton.set_allocator(_tma_scratch)
    args = (a, w, out, w_scale, colsum, a_scale, a_zero, _or(bias, w_scale), _or(groups, a_scale),
            _or(out_inv_scale, a_scale), _or(out_zero, a_scale), M, N, K, triton.next_power_of_2(M), tokens,
            float(qmin), float(qmax), _or(a_inv_scale, a_scale))
    flags = {"HAS_BIAS": bias is not None, "HAS_GROUPS": groups is not None, "GELU": gelu, "QUANT_OUT": quant,
             "QUANT_IN": a_inv_scale is not None, "SWIGLU": swiglu, "QKV": qkv is not None,
             "RESIDUAL": residual is not None, "HAS_RES_GAIN": gain is not None}
    q = None
    if qkv is None:
        args += (float(in_qmin), float(in_qmax), *[a_scale] * 5, 0, 0, 0, 0.0)
        flags.update(NORM_QK=False, HAS_GAIN=False, HEAD_D=1)
    else:
        k_cache, v_cache, index, gain, head_dim, normalize, eps = qkv
        q = torch.empty((M, N // 3), device=a.device, dtype=k_cache.dtype)
        if max(q.numel(), k_cache.numel()) >= 2**31:
            raise ValueError("qkv: q and the caches must each hold fewer than 2**31 elements (int32 offsets)")
        args += (float(in_qmin), float(in_qmax), q, k_cache, v_cache, index, _or(gain, a_scale),
                 *k_cache.stride()[:3], float(eps))
        flags.update(NORM_QK=normalize, HAS_GAIN=gain is not None, HEAD_D=head_dim)
        config = config or qkv_config(M, N, head_dim, a.device)
        if config is None:
            raise ValueError(f"no qkv tile holds whole heads of {head_dim} within {N // 3} columns")
    args += (_or(residual, a_scale), _or(gain, a_scale), _row_stride(gain))
    if config is None and _tune:
        _autotuned[grid](*args, **flags)
    else:
        config = config or untuned_tile(M)
        _heuristic[grid](*args, **flags, **config.all_kwargs())
    return out if q is None else q


def autotune_cache() -> dict:
    """``qgemm``'s autotuning: ``{"dir": Triton's cache dir, "files": {relative path: content},
    "chosen": {key: config}}`` (``files``: the results on disk, ``chosen``: this process's choices).

    Copy the files to the same relative paths under the deployment's ``TRITON_CACHE_DIR`` (same Triton build
    and GPU) and ``qgemm`` skips tuning there."""
    root = knobs.cache.dir
    files = {}
    if os.path.isdir(root):
        for entry in sorted(os.listdir(root)):
            rel = os.path.join(entry, f"{_qgemm_kernel.__name__}.autotune.json")
            if os.path.isfile(os.path.join(root, rel)):
                with open(os.path.join(root, rel)) as f:
                    files[rel] = json.load(f)
    chosen = {str(key): str(config) for key, config in _autotuned.cache.items()}
    return {"dir": root, "files": files, "chosen": chosen}


# ---------------------------------------------------------------------------------- norms, activations

@triton.jit
def _store_codes(out_ptr, y, rows, cols, row_ok, mask, K, groups_ptr, tokens, inv_scale_ptr, zero_ptr, qmin,
                 qmax, HAS_GROUPS: tl.constexpr, FP8: tl.constexpr):
    g = _row_groups(rows, row_ok, groups_ptr, tokens, HAS_GROUPS)
    codes = _quantize(y, g, inv_scale_ptr, zero_ptr, qmin, qmax, FP8)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], codes, mask=mask)


@triton.jit
def _load_rows(x_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's BLOCK_M whole rows of x (BLOCK_K >= K), in fp32, with their indices and masks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return rows, cols, row_ok, col_ok, mask, x


@triton.jit
def _add_residual(x, rows, cols, mask, K, tokens, res_ptr, gain_ptr, gain_stride, sum_ptr, HAS_RESIDUAL: tl.constexpr,
                  HAS_GAIN: tl.constexpr):
    """``x + residual * gain[image]`` (the residual stream's add before a norm), stored; else ``x``. ``gain``
    comes with its row stride, as every per-image table: a chunk of one linear's output, read in place."""
    if HAS_RESIDUAL:
        offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GAIN:
            r = r * tl.load(gain_ptr + (rows // tokens).to(tl.int64)[:, None] * gain_stride + cols[None, :], mask=mask,
                            other=0.0).to(tl.float32)
        x = x + r
        tl.store(sum_ptr + offs, x.to(sum_ptr.dtype.element_ty), mask=mask)
    return x


@triton.jit
def _layernorm_quant_kernel(x_ptr, out_ptr, weight_ptr, bias_ptr, mod_scale_ptr, mod_shift_ptr, groups_ptr,
                            inv_scale_ptr, zero_ptr, res_ptr, gain_ptr, sum_ptr, M, K, tokens, eps, qmin, qmax,
                            scale_stride, shift_stride, gain_stride,
                            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD_SCALE: tl.constexpr,
                            HAS_MOD_SHIFT: tl.constexpr, HAS_GROUPS: tl.constexpr, FP8: tl.constexpr,
                            HAS_RESIDUAL: tl.constexpr, HAS_GAIN: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, cols, row_ok, col_ok, mask, x = _load_rows(x_ptr, M, K, BLOCK_M, BLOCK_K)
    x = _add_residual(x, rows, cols, mask, K, tokens, res_ptr, gain_ptr, gain_stride, sum_ptr, HAS_RESIDUAL, HAS_GAIN)
    mean = tl.sum(x, 1) / K
    xc = tl.where(mask, x - mean[:, None], 0.0)
    y = xc * tl.rsqrt(tl.sum(xc * xc, 1) / K + eps)[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # AdaLN: row m belongs to image m // tokens.
    image = (rows // tokens).to(tl.int64)[:, None]
    if HAS_MOD_SCALE:
        scale = tl.load(mod_scale_ptr + image * scale_stride + cols[None, :], mask=mask, other=0.0)
        y = y * (1.0 + scale.to(tl.float32))
    if HAS_MOD_SHIFT:
        y = y + tl.load(mod_shift_ptr + image * shift_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _store_codes(out_ptr, y, rows, cols, row_ok, mask, K, groups_ptr, tokens, inv_scale_ptr, zero_ptr, qmin,
                 qmax, HAS_GROUPS, FP8)


@triton.jit
def _rmsnorm_quant_kernel(x_ptr, out_ptr, weight_ptr, groups_ptr, inv_scale_ptr, zero_ptr, res_ptr, gain_ptr,
                          sum_ptr, M, K, tokens, eps, qmin, qmax, gain_stride, HAS_WEIGHT: tl.constexpr,
                          HAS_GROUPS: tl.constexpr,
                          FP8: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GAIN: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, cols, row_ok, col_ok, mask, x = _load_rows(x_ptr, M, K, BLOCK_M, BLOCK_K)
    x = _add_residual(x, rows, cols, mask, K, tokens, res_ptr, gain_ptr, gain_stride, sum_ptr, HAS_RESIDUAL, HAS_GAIN)
    y = x * tl.rsqrt(tl.sum(x * x, 1) / K + eps)[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    _store_codes(out_ptr, y, rows, cols, row_ok, mask, K, groups_ptr, tokens, inv_scale_ptr, zero_ptr, qmin,
                 qmax, HAS_GROUPS, FP8)


@triton.jit
def _act_quant_kernel(x_ptr, gate_ptr, out_ptr, groups_ptr, inv_scale_ptr, zero_ptr, M, K, tokens, qmin, qmax,
                      ACT: tl.constexpr, HAS_GROUPS: tl.constexpr, FP8: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == "gelu":
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        y = _gelu_tanh(y)
    elif ACT == "swiglu":
        y = y * tl.sigmoid(y) * tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _store_codes(out_ptr, y, rows, cols, row_ok, mask, K, groups_ptr, tokens, inv_scale_ptr, zero_ptr, qmin,
                 qmax, HAS_GROUPS, FP8)


def _row_launch(M, K, whole_rows: bool):
    """Tile of a row-wise kernel: whole rows for the norms (they reduce over K), else at most 2048 columns."""
    block_k = triton.next_power_of_2(K) if whole_rows else min(triton.next_power_of_2(K), 2048)
    block_m = max(1, min(64, 4096 // block_k))
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    return grid, {"BLOCK_M": block_m, "BLOCK_K": block_k, "num_warps": 4 if block_m * block_k <= 4096 else 8}


def _codes(x, fp8):
    if fp8:
        _check_fp8(x.device)
    return torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)


def _residual_args(x, residual, gain, d):
    """(res, gain, sum) pointers and flags of a norm kernel; ``sum`` is the residual stream's new tensor."""
    total = None if residual is None else torch.empty_like(x)
    return ((_or(residual, d), _or(gain, d), _or(total, d)),
            {"HAS_RESIDUAL": residual is not None, "HAS_GAIN": gain is not None}, total)


def _row_stride(table) -> int:
    """A per-image table's row stride (``ops`` hands the kernels tables whose columns are contiguous)."""
    return 0 if table is None else table.stride(0)


def layernorm_quant(x, weight, bias, eps, *, inv_scale, zero, groups=None, tokens=1, mod_scale=None,
                    mod_shift=None, qmin=-128, qmax=127, fp8=False, residual=None, gain=None):
    """``reference.layernorm_quant`` in one kernel."""
    out = _codes(x, fp8)
    (M, K), d = x.shape, inv_scale
    res, flags, total = _residual_args(x, residual, gain, d)
    if out.numel():
        grid, meta = _row_launch(M, K, whole_rows=True)
        _layernorm_quant_kernel[grid](
            x, out, _or(weight, d), _or(bias, d), _or(mod_scale, d), _or(mod_shift, d), _or(groups, d), inv_scale,
            _or(zero, d), *res, M, K, tokens, float(eps), float(qmin), float(qmax), _row_stride(mod_scale),
            _row_stride(mod_shift), _row_stride(gain),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_MOD_SCALE=mod_scale is not None,
            HAS_MOD_SHIFT=mod_shift is not None, HAS_GROUPS=groups is not None, FP8=fp8, **flags, **meta)
    return out if residual is None else (total, out)


def rmsnorm_quant(x, weight, eps, *, inv_scale, zero, groups=None, tokens=1, qmin=-128, qmax=127, fp8=False,
                  residual=None, gain=None):
    """``reference.rmsnorm_quant`` in one kernel."""
    out = _codes(x, fp8)
    (M, K), d = x.shape, inv_scale
    res, flags, total = _residual_args(x, residual, gain, d)
    if out.numel():
        grid, meta = _row_launch(M, K, whole_rows=True)
        _rmsnorm_quant_kernel[grid](
            x, out, _or(weight, d), _or(groups, d), inv_scale, _or(zero, d), *res, M, K, tokens, float(eps),
            float(qmin), float(qmax), _row_stride(gain),
            HAS_WEIGHT=weight is not None, HAS_GROUPS=groups is not None, FP8=fp8, **flags, **meta)
    return out if residual is None else (total, out)


def act_quant(x, *, act, inv_scale, zero, groups=None, tokens=1, gate=None, qmin=-128, qmax=127, fp8=False):
    """``reference.act_quant`` in one kernel."""
    out = _codes(x, fp8)
    if out.numel() == 0:
        return out
    (M, K), d = x.shape, inv_scale
    grid, meta = _row_launch(M, K, whole_rows=False)
    _act_quant_kernel[grid](
        x, _or(gate, d), out, _or(groups, d), inv_scale, _or(zero, d), M, K, tokens, float(qmin), float(qmax),
        ACT=act, HAS_GROUPS=groups is not None, FP8=fp8, **meta)
    return out


# ------------------------------------------------------------------------------------------- KV cache

@triton.jit
def _kv_rows(value_ptr, index_ptr, T, H, D, sv_b, sv_h, sv_t, sv_d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows of ``value [B, H, T, D]``: (b, h, cache positions, row mask, element mask, values)."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    mask = t_ok[:, None] & (d < D)[None, :]
    rows = tl.load(index_ptr + t, mask=t_ok, other=0).to(tl.int64)
    v = tl.load(value_ptr + b * sv_b + h * sv_h + t.to(tl.int64)[:, None] * sv_t + d[None, :] * sv_d, mask=mask,
                other=0.0)
    return b, h, rows, t_ok, mask, d, v


@triton.jit
def _kv_write_kernel(cache_ptr, value_ptr, index_ptr, T, H, D, sc_b, sc_h, sc_l, sv_b, sv_h, sv_t, sv_d,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, rows, t_ok, mask, d, v = _kv_rows(value_ptr, index_ptr, T, H, D, sv_b, sv_h, sv_t, sv_d, BLOCK_T, BLOCK_D)
    tl.store(cache_ptr + b * sc_b + h * sc_h + rows[:, None] * sc_l + d[None, :], v.to(cache_ptr.dtype.element_ty),
             mask=mask)


def _kv_launch(value):
    """(grid, block sizes) of a cache write: a program per (image, head) and block of rows."""
    B, H, T, D = value.shape
    block_d = triton.next_power_of_2(D)
    block_t = max(1, min(triton.next_power_of_2(T), 4096 // block_d))
    return (B * H, triton.cdiv(T, block_t)), {"BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": 4}


def kv_write(cache, index, value) -> None:
    """``reference.kv_write`` in one kernel (the cache's last dimension contiguous)."""
    if value.numel() == 0:
        return
    grid, meta = _kv_launch(value)
    _, H, T, D = value.shape
    _kv_write_kernel[grid](cache, value, index, T, H, D, cache.stride(0), cache.stride(1), cache.stride(2),
                           *value.stride(), **meta)


# ------------------------------------------------------------------------------------- int8 KV cache

@triton.jit
def _kv_write_int8_kernel(cache_ptr, scale_ptr, value_ptr, index_ptr, T, H, D, sc_b, sc_h, sc_l, ss_b, ss_h,
                          sv_b, sv_h, sv_t, sv_d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, rows, t_ok, mask, d, v = _kv_rows(value_ptr, index_ptr, T, H, D, sv_b, sv_h, sv_t, sv_d, BLOCK_T, BLOCK_D)
    v = v.to(tl.float32)
    amax = tl.max(tl.abs(v), axis=1)
    inv = tl.where(amax > 0, tl.div_rn(tl.full([BLOCK_T], 127.0, tl.float32), tl.maximum(amax, 1e-30)), 0.0)
    codes = _int8_round(tl.clamp(v * inv[:, None], -127.0, 127.0))
    tl.store(cache_ptr + b * sc_b + h * sc_h + rows[:, None] * sc_l + d[None, :], codes, mask=mask)
    tl.store(scale_ptr + b * ss_b + h * ss_h + rows, tl.div_rn(amax, tl.full([BLOCK_T], 127.0, tl.float32)),
             mask=t_ok)


def kv_write_int8(cache, scale, index, value) -> None:
    """``reference.kv_write_int8`` in one kernel (the cache's last dimension and the scales' contiguous)."""
    if value.numel() == 0:
        return
    grid, meta = _kv_launch(value)
    _, H, T, D = value.shape
    _kv_write_int8_kernel[grid](cache, scale, value, index, T, H, D, cache.stride(0), cache.stride(1),
                                cache.stride(2), scale.stride(0), scale.stride(1), *value.stride(), **meta)


# ------------------------------------------------------------------------------------------ attention

@triton.jit
def _cache_tile(base, s_base, rows, n_ok, sl, offs_d, d_ok, dt, KV_INT8: tl.constexpr, TAIL: tl.constexpr):
    """Cached rows ``[BLOCK_N, BLOCK_D]`` in ``dt``: as stored, or int8 codes times their row's scale (the
    reference's dequantization). Only the ``TAIL`` block masks its rows (``d_ok`` is all true and folded away
    when ``BLOCK_D == D``)."""
    if TAIL:
        mask = n_ok[:, None] & d_ok[None, :]
    else:
        mask = d_ok[None, :]
    x = tl.load(base + rows[:, None] * sl + offs_d[None, :], mask=mask, other=0)
    if KV_INT8:
        x = (x.to(tl.float32) * tl.load(s_base + rows, mask=n_ok, other=0.0)[:, None]).to(dt)
    return x


@triton.jit
def _attend(q, start, m_i, l_i, acc, k_base, ks_base, v_base, vs_base, mask_base, offs_m, m_ok, offs_d, d_ok, N_KEYS,
            qk_scale, sk_l, sv_l, sm_t, sm_l, dt, HAS_MASK: tl.constexpr, KV_INT8: tl.constexpr, TAIL: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """One block of keys of the online softmax (base 2). The running maximum ``m_i`` is of the unscaled scores:
    the scale (``qk_scale`` = softmax scale * log2(e), positive) is applied inside the exponent, one fused
    multiply-add a score. Only the ``TAIL`` block (the last, partial one) masks keys past ``N_KEYS``: the full
    blocks spend no selects."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_KEYS
    rows = offs_n.to(tl.int64)
    k = _cache_tile(k_base, ks_base, rows, n_ok, sk_l, offs_d, d_ok, dt, KV_INT8, TAIL)
    s = tl.dot(q, tl.trans(k))
    if HAS_MASK:  # the additive mask in unscaled units
        am = tl.load(mask_base + offs_m.to(tl.int64)[:, None] * sm_t + rows[None, :] * sm_l,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        s += am.to(tl.float32) * (1.4426950408889634 / qk_scale)
    if TAIL:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
    p = tl.exp2(s * qk_scale - (m_safe * qk_scale)[:, None])
    alpha = tl.exp2((m_i - m_safe) * qk_scale)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _cache_tile(v_base, vs_base, rows, n_ok, sv_l, offs_d, d_ok, dt, KV_INT8, TAIL)
    acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
    return m_new, l_i, acc


# The key count grows with every VAR scale and decode step: not specialized, so a tile does not compile again when
# it becomes a multiple of 16 (the benchmarks' counts, 680 and 257, are not: their binaries stay the same). The
# query count is: without it, decode's binaries (T = 1) grow by 10-18 instructions of 1400-2200, not measured yet.
@triton.jit(do_not_specialize=["N_KEYS"])
def _attention_kernel(q_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, mask_ptr, out_ptr, groups_ptr, inv_scale_ptr, zero_ptr,
                      T, H, N_KEYS, qk_scale, qmin, qmax,
                      sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_l, sks_b, sks_h, sv_b, sv_h, sv_l, svs_b, svs_h,
                      sm_b, sm_h, sm_t, sm_l, D: tl.constexpr, HAS_MASK: tl.constexpr,
                      KV_INT8: tl.constexpr, QUANT_OUT: tl.constexpr, HAS_GROUPS: tl.constexpr, FP8: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Flash attention (online softmax in base 2) of fp16/bf16 queries over caches in their dtype or in int8
    with a scale per cached row (``KV_INT8``: dequantized tile by tile to the queries' dtype, as the reference
    does); ``out`` is ``[B, T, H, D]``: the attention in the queries' dtype, or (``QUANT_OUT``) each row
    ``b, t`` quantized onto token ``t``'s group of the output projection's grid, so no float output is written
    and read back by a quantize kernel."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D  # all true when BLOCK_D == D (both constexpr: folded)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m.to(tl.int64)[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    dt = q.dtype
    k_base, v_base = k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h
    ks_base, vs_base = ks_ptr + b * sks_b + h * sks_h, vs_ptr + b * svs_b + h * svs_h
    mask_base = mask_ptr + b * sm_b + h * sm_h
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n_full = (N_KEYS // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _attend(q, start, m_i, l_i, acc, k_base, ks_base, v_base, vs_base, mask_base, offs_m, m_ok,
                                offs_d, d_ok, N_KEYS, qk_scale, sk_l, sv_l, sm_t, sm_l, dt, HAS_MASK, KV_INT8, False,
                                BLOCK_N)
    if n_full < N_KEYS:
        m_i, l_i, acc = _attend(q, n_full, m_i, l_i, acc, k_base, ks_base, v_base, vs_base, mask_base, offs_m, m_ok,
                                offs_d, d_ok, N_KEYS, qk_scale, sk_l, sv_l, sm_t, sm_l, dt, HAS_MASK, KV_INT8, True,
                                BLOCK_N)
    out = acc / l_i[:, None]
    # out [B, T, H, D] contiguous: row b * T + t of [B * T, H * D]
    o = out_ptr + ((b * T + offs_m.to(tl.int64)[:, None]) * H + h) * D + offs_d[None, :]
    if QUANT_OUT:
        g = _row_groups(offs_m, m_ok, groups_ptr, T, HAS_GROUPS)
        out = _quantize(out, g, inv_scale_ptr, zero_ptr, qmin, qmax, FP8)
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _attention_config(bm, bn, warps, stages) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Few queries (decode, VAR's first scales) take 16-row tiles; many take 64 or 128.
ATTENTION_CONFIGS = [_attention_config(16, 64, 4, 3), _attention_config(16, 128, 4, 3),
                     _attention_config(64, 64, 4, 3), _attention_config(128, 64, 8, 3),
                     _attention_config(128, 64, 4, 2), _attention_config(128, 128, 8, 2)]
UNTUNED_ATTENTION = {"few": ATTENTION_CONFIGS[0], "many": ATTENTION_CONFIGS[2]}  # by the pruning's rule


def _prune_attention(configs, named_args, **kwargs):
    """16-row tiles for at most 16 queries, larger ones else. (Triton passes the positional arguments as
    ``named_args``, the keyword ones as ``kwargs``.)"""
    few = {**named_args, **kwargs}["T"] <= 16
    return [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == few]


def attention_tuner(configs, bench=functools.partial(do_bench, warmup=5, rep=20), cache_results=True):
    """The attention kernel autotuned over ``configs`` (a test passes its own ``bench`` to run the GPU's
    path of tuning under the interpreter)."""
    # keyed by the query count itself: VAR's scale 9 (169 queries) and 10 (256) want other tiles (64 x 64 and 128 x 64
    # on an H100, 12-14 % apart: benchmarks/h100_s13a_attention.json), and a generation tunes scale 9 first
    return triton.autotune(configs, key=["T", "D", "HAS_MASK", "KV_INT8", "QUANT_OUT"],
                           prune_configs_by={"early_config_prune": _prune_attention}, do_bench=bench,
                           cache_results=cache_results)(_attention_kernel)


_attention_autotuned = attention_tuner([_attention_config(16, 16, 4, 1)] if INTERPRET else ATTENTION_CONFIGS)


def attention(q, k, v, mask, n_keys, scale, *, k_scale=None, v_scale=None, out_inv_scale=None, out_zero=None,
              groups=None, qmin=-128, qmax=127, fp8=False, config=None):
    """``reference.attention`` in one kernel: ``[B, T, H, D]`` contiguous, in ``q``'s dtype or as codes."""
    B, H, T, D = q.shape
    quant = out_inv_scale is not None
    out = torch.empty((B, T, H, D), device=q.device,
                      dtype=(torch.float8_e4m3fn if fp8 else torch.int8) if quant else q.dtype)
    if out.numel() == 0:
        return out
    if fp8:
        _check_fp8(q.device)
    kv8 = k_scale is not None
    ks, vs = (k_scale, v_scale) if kv8 else (q, q)  # dummies, never read
    sm = (0, 0, 0, 0) if mask is None else mask.stride()
    d = q
    args = (q, k, ks, v, vs, _or(mask, d), out, _or(groups, d), _or(out_inv_scale, d), _or(out_zero, d), T, H, n_keys,
            scale * 1.4426950408889634, float(qmin), float(qmax), *q.stride(), k.stride(0), k.stride(1), k.stride(2),
            ks.stride(0) if kv8 else 0, ks.stride(1) if kv8 else 0, v.stride(0), v.stride(1), v.stride(2),
            vs.stride(0) if kv8 else 0, vs.stride(1) if kv8 else 0, *sm)
    meta = {"D": D, "HAS_MASK": mask is not None, "KV_INT8": kv8, "QUANT_OUT": quant, "HAS_GROUPS": groups is not None,
            "FP8": fp8, "BLOCK_D": max(16, triton.next_power_of_2(D))}

    def grid(m):
        return (triton.cdiv(T, m["BLOCK_M"]), B * H)

    if config is None and _tune:
        _attention_autotuned[grid](*args, **meta)
    else:
        config = config or UNTUNED_ATTENTION["few" if T <= 16 else "many"]
        _attention_kernel[grid](*args, **meta, **config.all_kwargs())
    return out
