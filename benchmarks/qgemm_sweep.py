"""Every candidate ``qgemm`` tile on the VAR-d16 block GEMMs, to choose ``kernels.QGEMM_CONFIGS``.

    python benchmarks/qgemm_sweep.py [--json FILE] [--dtypes int8,fp8] [--tiles all|in-flight]
                                     [--shapes qkv,proj,fc1,fc2,proj+res,fc2+res]

Per GEMM (last VAR-d16 scale, batch 64 with CFG: M = 32768) and dtype: cuBLAS FP16 (the 1.0x baseline), every
tile of ``CANDIDATES`` with the epilogue as lowered (``gemm_bench.operands``), the best tile again without
the epilogue (no groups, zero point, bias: what the epilogue costs), and FP8 ``torch._scaled_mm`` row-wise
with and without bias. Candidates that fail to compile or run (shared memory, an unsupported warp
specialization) are reported with their error. Times: ``triton.testing.do_bench`` medians. ``--tiles in-flight``
times Hopper's MMAs kept in flight (``backends/cuda/wgmma.py``) against the same tiles without; every tile's
output is compared with the first tile's (``max_abs_diff``: the rewrite must not change a number).
``proj+res`` and ``fc2+res``: those GEMMs with the residual stream's add in their epilogue, as the step runs them
(``lower-cuda{residual-epilogue}``); against ``proj`` and ``fc2`` they give what the add costs each GEMM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backends.cuda import kernels  # noqa: E402
from gemm_bench import DTYPES, error, operands, precompile  # noqa: E402

T = kernels.tile_config
CANDIDATES = [
    T(128, 128, 128, 4, 3), T(128, 128, 128, 4, 4), T(128, 128, 64, 4, 5), T(128, 128, 64, 4, 6),
    T(64, 256, 128, 4, 3), T(128, 128, 128, 4, 3, group_m=16),
    T(128, 256, 128, 8, 3), T(128, 256, 128, 8, 4), T(256, 128, 128, 8, 3), T(256, 128, 128, 8, 4),
    T(128, 256, 64, 8, 5), T(128, 256, 64, 8, 5, tma=True),
    T(128, 128, 128, 4, 3, persistent=True, occupancy=2), T(128, 128, 128, 4, 3, persistent=True, tma=True,
                                                              occupancy=2),
    T(128, 256, 128, 8, 3, persistent=True, tma=True), T(128, 256, 128, 8, 4, persistent=True, tma=True),
    T(128, 256, 128, 8, 3, tma=True, ws=True), T(128, 256, 128, 8, 3, persistent=True, tma=True, ws=True),
    T(128, 128, 128, 4, 3, persistent=True, tma=True, ws=True, occupancy=2),
    T(256, 128, 128, 8, 3, persistent=True, tma=True, ws=True), T(128, 128, 128, 8, 4, tma=True, ws=True),
    T(128, 128, 128, 4, 3, persistent=True, tma=True, occupancy=2, tma_store=True),
    T(128, 128, 128, 4, 2, persistent=True, tma=True, occupancy=2, tma_store=True),
    T(128, 128, 128, 8, 3, persistent=True, tma=True, tma_store=True),
    T(128, 128, 128, 8, 4, persistent=True, tma=True, tma_store=True),
    T(256, 128, 128, 8, 3, persistent=True, tma=True, tma_store=True),
]
# Persistent tiles flattened (their MMAs synchronous: the reset of a flattened loop's accumulator keeps them
# so), not flattened, and not flattened with the MMAs in flight; plain tiles without and with.
IN_FLIGHT = []
for kw in ({"bm": 128, "bn": 128, "bk": 128, "warps": 4, "stages": 3, "occupancy": 2},
           {"bm": 128, "bn": 128, "bk": 128, "warps": 4, "stages": 3, "occupancy": 2, "tma_store": True},
           {"bm": 128, "bn": 256, "bk": 128, "warps": 8, "stages": 3},
           {"bm": 256, "bn": 128, "bk": 128, "warps": 8, "stages": 3},
           {"bm": 128, "bn": 256, "bk": 64, "warps": 8, "stages": 4}):
    IN_FLIGHT += [T(**kw, persistent=True, tma=True), T(**kw, persistent=True, tma=True, flatten=False),
                  T(**kw, persistent=True, tma=True, async_mma=True)]
for kw in ({"bm": 128, "bn": 128, "bk": 128, "warps": 4, "stages": 3},
           {"bm": 128, "bn": 256, "bk": 128, "warps": 8, "stages": 3},
           {"bm": 256, "bn": 128, "bk": 128, "warps": 8, "stages": 3}):
    IN_FLIGHT += [T(**kw), T(**kw, async_mma=True)]
WIDTH = 1024
SHAPES = [(32768, WIDTH, 3 * WIDTH, "bias", "qkv"), (32768, WIDTH, WIDTH, "bias", "proj"),
          (32768, WIDTH, 4 * WIDTH, "bias+gelu+quant", "fc1"), (32768, 4 * WIDTH, WIDTH, "bias", "fc2"),
          (32768, WIDTH, WIDTH, "bias+res", "proj+res"), (32768, 4 * WIDTH, WIDTH, "bias+res", "fc2+res")]


def bench(fn):
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def describe(c) -> str:
    kw = c.kwargs
    flags = "".join(f for f, on in (("P", kw["PERSISTENT"]), ("T", kw["TMA"]), ("W", kw["WS_TILES"] or kw["WS_K"]),
                                    ("F", kw["FLATTEN"]), ("S", kw["TMA_STORE"]), ("A", kw["ASYNC_MMA"])) if on)
    return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages} g{kw['GROUP_M']}"
            f" o{kw['OCCUPANCY']} {flags or '-'}")


def timed(fn):
    try:
        return {"ms": bench(fn)}
    except Exception as e:  # noqa: BLE001 - a candidate that cannot run here is reported, not fatal
        return {"error": error(e)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--dtypes", default="int8,fp8")
    p.add_argument("--tiles", choices=("all", "in-flight"), default="all")
    p.add_argument("--shapes", default="qkv,proj,fc1,fc2", help=f"of {','.join(s[4] for s in SHAPES)}")
    args = p.parse_args()
    dtypes = args.dtypes.split(",")
    candidates = CANDIDATES if args.tiles == "all" else IN_FLIGHT
    names = args.shapes.split(",")
    unknown = sorted(set(names) - {s[4] for s in SHAPES})
    if unknown:
        p.error(f"unknown shapes {unknown}; known: {', '.join(s[4] for s in SHAPES)}")
    shapes = [s for s in SHAPES if s[4] in names]
    precompile([s[:4] for s in shapes], candidates)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    totals = {}
    for M, K, N, epilogue, name in shapes:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        w = torch.randn(N, K, device="cuda", dtype=torch.float16)
        bias = torch.randn(N, device="cuda", dtype=torch.float16)
        base = bench(lambda: torch.nn.functional.linear(x, w, bias))
        row = {"gemm": name, "M": M, "K": K, "N": N, "epilogue": epilogue, "cublas_fp16_bias_ms": base}
        f8 = operands(M, K, N, epilogue, torch.float8_e4m3fn)
        sa, sb = torch.rand(M, 1, device="cuda"), torch.rand(1, N, device="cuda")
        for label, kw in (("scaled_mm_bf16", {"out_dtype": torch.bfloat16}),
                          ("scaled_mm_bf16_bias", {"out_dtype": torch.bfloat16, "bias": bias.bfloat16()}),
                          ("scaled_mm_fp16", {"out_dtype": torch.float16})):
            row[label] = timed(lambda: torch._scaled_mm(f8["a"], f8["w"].t(), scale_a=sa, scale_b=sb, **kw))
        for dtype in dtypes:
            ops = operands(M, K, N, epilogue, DTYPES[dtype])
            results, first = [], None
            for c in candidates:
                r = timed(lambda: kernels.qgemm(**ops, config=c))
                if "ms" in r:
                    out = kernels.qgemm(**ops, config=c).float()
                    first = out if first is None else first
                    r["max_abs_diff"] = (out - first).abs().max().item()
                results.append({"tile": describe(c), **r})
            ok = [r for r in results if "ms" in r]
            best = min(ok, key=lambda r: r["ms"]) if ok else None
            if best:
                c = candidates[[describe(c) for c in candidates].index(best["tile"])]
                bare = {k: v for k, v in ops.items()
                        if k not in ("groups", "bias", "out_inv_scale", "out_zero", "residual", "gain")}
                bare.update(a_zero=torch.zeros_like(ops["a_zero"]), gelu=False)
                row[f"{dtype}_bare_best_tile"] = timed(lambda: kernels.qgemm(**bare, config=c))
                totals.setdefault(dtype, 0.0)
                totals[dtype] += best["ms"]
            row[dtype] = results
            print(f"{name} {dtype}: cuBLAS fp16+bias {base:.4f} ms", flush=True)
            for r in sorted(ok, key=lambda r: r["ms"])[:6]:
                print(f"   {r['tile']:40s} {r['ms']:.4f} ms  {base / r['ms']:.2f}x  diff {r['max_abs_diff']:.3g}",
                      flush=True)
            for r in results:
                if "error" in r:
                    print(f"   {r['tile']:40s} {r['error'][:120]}", flush=True)
            print(f"   bare (best tile): {row.get(f'{dtype}_bare_best_tile')}", flush=True)
        print(f"   scaled_mm: " + " ".join(f"{k}={row[k]}" for k in row if k.startswith("scaled_mm")), flush=True)
        totals["fp16"] = totals.get("fp16", 0.0) + base
        report["shapes"].append(row)
    report["totals_ms"] = totals
    print("four GEMMs:", {k: f"{v:.3f} ms ({totals['fp16'] / v:.2f}x)" for k, v in totals.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
