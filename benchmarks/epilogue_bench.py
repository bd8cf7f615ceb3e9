"""EXPERIMENT: ``qgemm`` epilogue variants (``kernels.qgemm(epi=...)``) on the VAR-d16 block GEMMs.

    python benchmarks/epilogue_bench.py [--json FILE]

Per GEMM (last VAR-d16 scale, batch 64 with CFG: M = 32768), the sweep's tile (128 x 128 x 128, persistent, TMA,
two programs an SM) and others, each with the plain and the TMA store: cuBLAS FP16 + bias, the bare GEMM (no
epilogue), and each variant with the epilogue as
lowered (``gemm_bench.operands``). fc1's variants also report how many output codes differ from variant 0.
Times: ``triton.testing.do_bench`` medians, variants interleaved over two rounds (the minimum kept).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backends.cuda import kernels  # noqa: E402
from gemm_bench import _compile_only, error, operands  # noqa: E402

T = kernels.tile_config
BASE = {"P4": (128, 128, 128, 4, 3, True, True, 8, False, None, 2),  # QGEMM_CONFIGS' large-M winner before
        "P4s2": (128, 128, 128, 4, 2, True, True, 8, False, None, 2),
        "P4nf": (128, 128, 128, 4, 3, True, True, 8, False, False, 2),
        "P8o1": (128, 128, 128, 8, 3, True, True),
        "P8o1s4": (128, 128, 128, 8, 4, True, True),
        "P8o2r128": (128, 128, 128, 8, 2, True, True, 8, False, None, 2, 128),
        "P256x128": (256, 128, 128, 8, 3, True, True),
        "P128x256": (128, 256, 128, 8, 3, True, True)}
# each with the plain store and the TMA store (+S)
TILES = {name + s: T(*t, **({"tma_store": True} if s else {})) for name, t in BASE.items() for s in ("", "+S")}
W = 1024
M = 32768
# (gemm, K, N, epilogue, variants): 2 GELU + quantization folded, 8 the residual add with a per-image gate
SHAPES = [("qkv", W, 3 * W, "bias", [0]), ("proj", W, W, "bias", [0, 8]),
          ("fc1", W, 4 * W, "bias+gelu+quant", [0, 2]), ("fc2", 4 * W, W, "bias", [0, 8])]


def args_for(K, N, epilogue, epi):
    ops = operands(M, K, N, epilogue, torch.int8)
    if epilogue == "bare":  # no groups, zero point, bias: the GEMM alone
        ops.update(groups=None, a_zero=torch.zeros_like(ops["a_zero"]))
    if epi & 8:
        gen = torch.Generator(device="cuda").manual_seed(1)
        ops["residual"] = torch.randn(M, N, device="cuda", dtype=torch.float16, generator=gen)
        ops["res_scale"] = torch.randn(M // 256, N, device="cuda", dtype=torch.float16, generator=gen)
    return ops


def _compile(job):
    K, N, epilogue, epi, tile = job
    try:
        kernels.qgemm(**args_for(K, N, epilogue, epi), config=TILES[tile], epi=epi)
    except Exception as e:  # noqa: BLE001 - reported, the others go on
        return f"{job}: {error(e)}"
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args()
    jobs = [(K, N, e, epi, t) for _, K, N, e, variants in SHAPES for epi in variants for t in TILES]
    jobs += [(K, N, "bare", 0, t) for _, K, N, _, _ in SHAPES for t in TILES]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(16, os.cpu_count()), mp_context=spawn, initializer=_compile_only) as pool:
        failed = [e for e in pool.map(_compile, jobs) if e]
    print(f"compiled {len(jobs)}, failed: {failed}", flush=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "tiles": {k: str(v) for k, v in TILES.items()}, "shapes": []}
    for name, K, N, epilogue, variants in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        w = torch.randn(N, K, device="cuda", dtype=torch.float16)
        bias = torch.randn(N, device="cuda", dtype=torch.float16)
        bare = args_for(K, N, "bare", 0)
        fns = {"cublas_fp16_bias": lambda: F.linear(x, w, bias)}
        variant_args = {epi: args_for(K, N, epilogue, epi) for epi in variants}
        for t, tile in TILES.items():
            fns[f"bare/{t}"] = (lambda tile=tile: kernels.qgemm(**bare, config=tile))
            for epi, a in variant_args.items():
                fns[f"epi{epi}/{t}"] = (lambda a=a, epi=epi, tile=tile: kernels.qgemm(**a, config=tile, epi=epi))
        times = {}
        for _ in range(2):
            for label, fn in fns.items():
                try:
                    t = do_bench(fn, warmup=10, rep=40, return_mode="median")
                    times[label] = min(times.get(label, t), t)
                except Exception as e:  # noqa: BLE001
                    times[label] = error(e)
        row = {"gemm": name, "M": M, "K": K, "N": N, "epilogue": epilogue, "ms": times}
        base = times["cublas_fp16_bias"]
        row["vs_fp16_bias"] = {k: base / v for k, v in times.items() if isinstance(v, float)}
        if name == "fc1":
            ref = kernels.qgemm(**variant_args[0], config=TILES['P4']).int()
            row["codes_vs_epi0"] = {}
            for epi in variants[1:]:
                d = (kernels.qgemm(**variant_args[epi], config=TILES['P4'], epi=epi).int() - ref).abs()
                row["codes_vs_epi0"][f"epi{epi}"] = {"differ": int((d > 0).sum()), "max": int(d.max()),
                                                     "of": d.numel()}
        for epi in variants:
            if epi & 8:  # the residual variant's result against the plain one plus the add done by torch
                a = variant_args[epi]
                plain = {k: v for k, v in a.items() if k not in ("residual", "res_scale")}
                y = kernels.qgemm(**plain, config=TILES['P4'], epi=epi & ~8, out_dtype=torch.float32)
                gate = a["res_scale"].float().repeat_interleave(256, 0)
                want = y * gate + a["residual"].float()
                got = kernels.qgemm(**a, config=TILES['P4'], epi=epi, out_dtype=torch.float32)
                row.setdefault("residual_max_err", {})[f"epi{epi}"] = float((got - want).abs().max())
        report["shapes"].append(row)
        print(name, {k: (f"{v:.4f} ms ({base / v:.2f}x)" if isinstance(v, float) else v) for k, v in times.items()},
              row.get("codes_vs_epi0", ""), row.get("residual_max_err", ""), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
