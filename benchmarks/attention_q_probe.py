"""Quantized attention with low-precision MMAs on both products, probed at VAR's step shapes.

    python benchmarks/attention_q_probe.py [--json FILE] [--quick]

The int8-cache kernel (``kernels.attention_int8``) dequantizes every key and value tile to fp16 and loses to
cuDNN at VAR's 256-query blocks (0.61x on an H100). This probe times a flash-attention kernel whose two
products run on the tensor cores' int8/FP8 paths instead, against cuDNN SDPA over fp16 caches:
- ``qk``: ``fp16`` (q and k as they are), ``int8`` (q quantized per row in the kernel, k an int8 cache with a
  scale per row: ``reference.kv_quantize``'s format) or ``fp8`` (the same with E4M3 codes);
- ``pv``: ``fp16`` (v ``[L, D]``), ``fp8`` (v an E4M3 cache ``[L, D]`` with a scale per row) or ``fp8t`` (the
  same stored transposed, ``[D, L]``: the K-major layout Hopper's FP8 MMA reads). Each tile's probabilities
  times the tile's value scales over their maximum, times 448, become E4M3 codes; the product is rescaled by
  that maximum / 448.
The error column is against fp32 SDPA over the float tensors, on VAR-like data (q and k L2-normalized per
head, times a gain of 8: cosine attention's logits). Times: ``triton.testing.do_bench`` medians, best tile.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backends.cuda import kernels  # noqa: E402

SHAPES = [  # name, B (CFG rows), H, T, L
    ("var-d16 last scale, batch 64", 128, 16, 256, 680),
    ("var-d16 last scale, batch 16", 32, 16, 256, 680),
    ("var-d16 scale 9 (13x13), batch 64", 128, 16, 169, 424),
]
QK_MODES = {"fp16": 0, "int8": 1, "fp8": 2}
PV_MODES = {"fp16": 0, "fp8t": 1, "fp8": 2}
TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3),
         (128, 64, 4, 4), (128, 32, 4, 3)]


@triton.jit
def _attn_q_kernel(q_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, out_ptr, T, H, N_KEYS, qk_scale,
                   sq_b, sq_h, sq_t, sk_b, sk_h, sk_l, sks_b, sks_h, sv_b, sv_h, sv_l, sv_d, svs_b, svs_h,
                   QK: tl.constexpr, PV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    m_ok = offs_m < T
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + d[None, :], mask=m_ok[:, None], other=0.0)
    row_scale = tl.full((BLOCK_M,), 1.0, tl.float32) * qk_scale
    if QK > 0:
        amax = tl.max(tl.abs(q.to(tl.float32)), axis=1)
        top = 127.0 if QK == 1 else 448.0
        inv = tl.where(amax > 0, top / tl.maximum(amax, 1e-30), 0.0)
        qf = q.to(tl.float32) * inv[:, None]
        if QK == 1:
            q = kernels._int8_round(qf)
        else:
            q = qf.to(tl.float8e4nv)
        row_scale = row_scale * amax / top
    k_base, v_base = k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h
    ks_base, vs_base = ks_ptr + b * sks_b + h * sks_h, vs_ptr + b * svs_b + h * svs_h
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, N_KEYS, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_KEYS
        k = tl.load(k_base + offs_n[:, None] * sk_l + d[None, :], mask=n_ok[:, None], other=0.0)
        if QK > 0:
            ks = tl.load(ks_base + offs_n, mask=n_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * row_scale[:, None] * ks[None, :]
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if PV == 1:
            vs = tl.load(vs_base + offs_n, mask=n_ok, other=0.0)
            c = tl.max(vs, axis=0)
            w = tl.where(c > 0, vs * (448.0 / tl.maximum(c, 1e-30)), 0.0)
            pv = (p * w[None, :]).to(tl.float8e4nv)
            vt = tl.load(v_base + d[:, None] * sv_d + offs_n[None, :] * sv_l, mask=n_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(pv, tl.trans(vt)) * (c / 448.0)
        elif PV == 2:  # fp8 codes as cached, [L, D]
            vs = tl.load(vs_base + offs_n, mask=n_ok, other=0.0)
            c = tl.max(vs, axis=0)
            w = tl.where(c > 0, vs * (448.0 / tl.maximum(c, 1e-30)), 0.0)
            pv = (p * w[None, :]).to(tl.float8e4nv)
            v = tl.load(v_base + offs_n[:, None] * sv_l + d[None, :], mask=n_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(pv, v) * (c / 448.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * sv_l + d[None, :], mask=n_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    o = out_ptr + ((b * T + offs_m.to(tl.int64)[:, None]) * H + h) * D + d[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def caches(k, v, qk, pv):
    """The caches each mode reads: codes and a scale per row, or the fp16 tensors (scale unused)."""
    def per_row(x, mode):
        if mode == "fp16":
            return x, torch.ones(x.shape[:-1], device=x.device)
        top = 127.0 if mode == "int8" else 448.0
        amax = x.float().abs().amax(-1)
        scale = amax / top
        y = x.float() / torch.where(scale > 0, scale, 1.0)[..., None]
        return (y.round().clamp(-127, 127).to(torch.int8) if mode == "int8" else y.to(torch.float8_e4m3fn)), scale


    kc, ks = per_row(k, qk)
    vc, vs = per_row(v, "fp8" if pv == "fp8t" else pv)
    if pv == "fp8t":
        vc = vc.transpose(-1, -2).contiguous()  # [B, H, D, L]
    return kc, ks, vc, vs


def attention(q, kc, ks, vc, vs, n_keys, qk, pv, tile):
    B, H, T, D = q.shape
    out = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype)
    bm, bn, warps, stages = tile
    sv_l, sv_d = (vc.stride(3), vc.stride(2)) if pv == "fp8t" else (vc.stride(2), vc.stride(3))
    _attn_q_kernel[(triton.cdiv(T, bm), B * H)](
        q, kc, ks, vc, vs, out, T, H, n_keys, D ** -0.5 * 1.4426950408889634, q.stride(0), q.stride(1), q.stride(2),
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), vc.stride(0), vc.stride(1), sv_l, sv_d,
        vs.stride(0), vs.stride(1), QK=QK_MODES[qk], PV=PV_MODES[pv], D=D, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
        num_stages=stages)
    return out.transpose(1, 2)


def data(B, H, T, L, D, device, gain=8.0):
    q = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1) * gain
    k = F.normalize(torch.randn(B, H, L, D, device=device), dim=-1)
    v = torch.randn(B, H, L, D, device=device)
    return q.half().transpose(1, 2), k.half(), v.half()  # q in the step's layout: [B, T, H, D] viewed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--quick", action="store_true", help="one tiny shape, one tile (a correctness run)")
    args = p.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [("tiny", 2, 2, 20, 45)] if args.quick else SHAPES
    tiles = [(16, 16, 4, 1)] if args.quick else TILES
    variants = [("fp16", "fp16"), ("int8", "fp16"), ("int8", "fp8"), ("int8", "fp8t"), ("fp8", "fp8"), ("fp8", "fp8t")]
    rows = []
    for name, B, H, T, L in shapes:
        D = 64
        q, k, v = data(B, H, T, L, D, device)
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        row = {"shape": name, "B": B, "H": H, "T": T, "L": L}
        if device == "cuda":
            row["sdpa_fp16_ms"] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
            got = F.scaled_dot_product_attention(q, k, v).float()
            row["sdpa_fp16_rel_error"] = float((got - expected).norm() / expected.norm())
        for qk, pv in variants:
            if device == "cpu" and (qk.startswith("fp8") or pv.startswith("fp8")):
                continue  # the interpreter's float32 -> E4M3 cast does not round to nearest
            kc, ks, vc, vs = caches(k, v, qk, pv)
            got = attention(q, kc, ks, vc, vs, L, qk, pv, tiles[0]).float()
            err = float((got - expected).norm() / expected.norm())
            times = {}
            if device == "cuda":
                for t in tiles:
                    try:
                        times["x".join(map(str, t))] = do_bench(lambda t=t: attention(q, kc, ks, vc, vs, L, qk, pv, t))
                    except Exception as e:  # noqa: BLE001  (a tile that does not fit is reported, not fatal)
                        times["x".join(map(str, t))] = f"{type(e).__name__}: {str(e)[:80]}"
            best = min((ms for ms in times.values() if isinstance(ms, float)), default=None)
            row[f"qk_{qk}_pv_{pv}"] = {"rel_error": err, "best_ms": best, "tiles_ms": times}
            ratio = f"{row['sdpa_fp16_ms'] / best:.2f}x cuDNN" if best else ""
            print(f"{name:34s} qk {qk:4s} pv {pv:4s} err {err:.2e} " +
                  (f"best {best * 1e3:7.1f} us ({ratio})" if best else ""), flush=True)
        if device == "cuda":
            print(f"{name:34s} cuDNN SDPA fp16 {row['sdpa_fp16_ms'] * 1e3:7.1f} us err {row['sdpa_fp16_rel_error']:.2e}")
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
