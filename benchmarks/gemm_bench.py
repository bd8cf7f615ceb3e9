"""Block GEMMs of VAR and LlamaGen: our fused INT8/FP8 ``qgemm`` against cuBLAS FP16 and torch's FP8/INT8.

    python benchmarks/gemm_bench.py [--json FILE]

Per GEMM: cuBLAS FP16 ``x @ w.t()`` (the 1.0x baseline), FP16 + bias (``F.linear``), ``qgemm`` INT8 and FP8
(autotuned over ``kernels.QGEMM_CONFIGS``) with the whole epilogue (group gather, zero-point correction, bias;
VAR's fc1 also GELU and a quantized output, as lowered), FP8 row-wise ``torch._scaled_mm`` (bf16 out, no bias)
and ``torch._int_mm`` (int32 out, no epilogue). Times are ``triton.testing.do_bench`` medians (L2 flushed
before each run); decode rows (at most ``GRAPH_ROWS``), whose kernels take a few microseconds, replay each call
from a CUDA graph (``do_bench_cudagraph``, L2 not flushed) as the decode step does, so Python's launch is not
what they time. The JSON also holds the autotuner's timing of every candidate tile per shape.
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
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backends.cuda import kernels

DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
GRAPH_ROWS = 256  # decode rows and below: timed from CUDA graphs


def blocks():
    """(model, M, [(gemm, K, N, epilogue)]): the four GEMMs of one transformer block."""
    out = []
    for depth, batch in ((16, 64), (30, 16)):
        width, hidden = 64 * depth, 4 * 64 * depth  # frontends/var.py: width 64 * depth, mlp_ratio 4
        # Last VAR scale: 16x16 tokens, batch doubled for classifier-free guidance.
        out.append((f"VAR-d{depth}", 2 * batch * 256, [("qkv", width, 3 * width, "bias"),
                                                       ("proj", width, width, "bias"),
                                                       ("fc1", width, hidden, "bias+gelu+quant"),
                                                       ("fc2", hidden, width, "bias")]))
    dim, ffn = 1024, 2816  # frontends/llamagen.py CONFIGS["GPT-L"]: dim, ffn_dim
    gemms = [("wqkv", dim, 3 * dim, ""), ("wo", dim, dim, ""), ("w1|w3", dim, 2 * ffn, ""),
             ("w2", ffn, dim, "")]
    # Class-conditional prefill is one token, so prefill and decode both have 2*64 rows; the full
    # sequence (256 tokens at once: teacher forcing, calibration) is the large case.
    out += [("GPT-L decode (=c2i prefill)", 2 * 64, gemms), ("GPT-L full sequence", 2 * 64 * 256, gemms)]
    return out


def operands(M, K, N, epilogue, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    if dtype == torch.int8:
        a = torch.randint(-128, 128, (M, K), device="cuda", dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8, generator=gen)
    else:
        a = (torch.randn(M, K, device="cuda", generator=gen) * 8).to(dtype)
        w = torch.randn(N, K, device="cuda", generator=gen).to(dtype)
    tokens = min(256, M)
    args = {"a": a, "w": w, "w_scale": torch.rand(N, device="cuda") * 1e-3, "colsum": w.float().sum(1),
            "a_scale": torch.rand(3, device="cuda") * 0.05,
            "a_zero": torch.tensor([-3.0, 0.0, 5.0] if dtype == torch.int8 else [0.0] * 3, device="cuda"),
            "bias": torch.randn(N, device="cuda") if "bias" in epilogue else None,
            "groups": torch.randint(0, 3, (tokens,), device="cuda", dtype=torch.int32), "tokens": tokens,
            "gelu": "gelu" in epilogue}
    if "quant" in epilogue:
        args["out_inv_scale"] = torch.tensor([20.0, 30.0, 40.0], device="cuda")
        args["out_zero"] = torch.tensor([0.0, 1.0, -1.0], device="cuda")
    if "res" in epilogue:  # the residual stream's add (VAR's proj and fc2): fp16 stream, a per-image gain chunk
        images = -(-M // tokens)
        args["residual"] = torch.randn(M, N, device="cuda", generator=gen).half()
        args["gain"] = torch.randn(images, 2 * N, device="cuda", generator=gen).half()[:, :N]
    return args


def bench(fn, graphs=False):
    """``graphs``: ``do_bench_cudagraph`` warms up (the autotuner tunes and compiles) before it captures."""
    if graphs:
        return do_bench_cudagraph(fn, rep=40, return_mode="median")
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def error(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _compile_only():
    """In a worker process: launches only compile (into Triton's disk cache), they don't run."""
    real = kernels._heuristic.run
    kernels._heuristic.run = lambda *a, **k: real(*a, **{**k, "warmup": True})


def _compile(job):
    M, K, N, epilogue, dtype, (kwargs, warps, stages) = job
    try:
        config = triton.Config(kwargs, num_warps=warps, num_stages=stages)
        kernels.qgemm(**operands(M, K, N, epilogue, DTYPES[dtype]), config=config)
    except Exception as e:  # noqa: BLE001 - too much shared memory etc.: the autotuner skips it too
        return error(e)
    return None


def precompile(shapes=None, configs=None):
    """The autotuner compiles its candidates one by one (threads don't help: compiling holds the GIL).
    Compile each (epilogue, dtype, candidate) once in parallel processes; the tuner loads them from disk.
    ``shapes``: (M, K, N, epilogue) tuples (default: every GEMM of ``blocks()``); ``configs``: the candidates
    (default: the autotuner's)."""
    jobs = {}
    shapes = shapes or [(M, K, N, epilogue) for _, M, gemms in blocks() for _, K, N, epilogue in gemms]
    for M, K, N, epilogue in shapes:
        args = {"M_BUCKET": triton.next_power_of_2(M), "K": K, "N": N, "a_ptr": torch.empty(0, device="cuda")}
        for c in kernels._prune(configs or kernels.QGEMM_CONFIGS, args):
            config = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
            for dtype in DTYPES:
                jobs.setdefault((M <= 256, epilogue, dtype, config),
                                (M, K, N, epilogue, dtype, (dict(config[0]), config[1], config[2])))
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(16, os.cpu_count()), mp_context=spawn, initializer=_compile_only) as pool:
        failed = [e for e in pool.map(_compile, jobs.values()) if e]
    print(f"precompiled {len(jobs)} kernels, {len(failed)} failed", *failed[:5], sep="\n  ", flush=True)


def run_gemm(M, K, N, epilogue):
    flop = 2.0 * M * N * K
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    w = torch.randn(N, K, device="cuda", dtype=torch.float16)
    bias = torch.randn(N, device="cuda", dtype=torch.float16)
    i8, f8 = operands(M, K, N, epilogue, torch.int8), operands(M, K, N, epilogue, torch.float8_e4m3fn)
    sa, sb = torch.rand(M, 1, device="cuda"), torch.rand(1, N, device="cuda")
    impls = {
        "cublas_fp16": lambda: x @ w.t(),
        "cublas_fp16_bias": lambda: F.linear(x, w, bias),
        "qgemm_int8": lambda: kernels.qgemm(**i8),
        "qgemm_fp8": lambda: kernels.qgemm(**f8),
        "scaled_mm_fp8_rowwise": lambda: torch._scaled_mm(f8["a"], f8["w"].t(), scale_a=sa, scale_b=sb,
                                                          out_dtype=torch.bfloat16),
        "int_mm": lambda: torch._int_mm(i8["a"], i8["w"].t()),
    }
    res = {}
    for name, fn in impls.items():
        try:
            ms = bench(fn, graphs=M <= GRAPH_ROWS)
            res[name] = {"ms": ms, "tflops": flop / ms * 1e-9, "timed": "cuda graph" if M <= GRAPH_ROWS else "launches"}
        except Exception as e:  # noqa: BLE001 - e.g. a torch op missing for this shape: report it
            res[name] = {"error": error(e)}
    base = res["cublas_fp16"]["ms"]
    for r in res.values():
        if "ms" in r:
            r["vs_fp16"] = base / r["ms"]
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "shapes": [], "blocks": []}
    precompile()
    for model, M, gemms in blocks():
        total = {}
        for name, K, N, epilogue in gemms:
            before = set(kernels.autotune_cache()["chosen"])
            res = run_gemm(M, K, N, epilogue)
            chosen = {k: v for k, v in kernels.autotune_cache()["chosen"].items() if k not in before}
            report["shapes"].append({"model": model, "gemm": name, "M": M, "K": K, "N": N,
                                     "epilogue": epilogue, "results": res, "tiles": chosen})
            for impl, r in res.items():
                if "ms" in r:
                    total[impl] = total.get(impl, 0.0) + r["ms"]
            print(f"{model:28s} {name:6s} M={M:6d} K={K:5d} N={N:5d} " + "  ".join(
                f"{impl}={r['ms']:.4f}ms({r['vs_fp16']:.2f}x)" if "ms" in r else f"{impl}=ERR {r['error']}"
                for impl, r in res.items()), *chosen.values(), sep="\n    ", flush=True)
        block = {impl: {"ms": ms, "vs_fp16": total["cublas_fp16"] / ms} for impl, ms in total.items()}
        report["blocks"].append({"model": model, "M": M, "results": block})
    report["autotune_timings"] = list(kernels.autotune_cache()["files"].values())
    print(f"\n{report['gpu']}, torch {report['torch']}, triton {report['triton']}: "
          "the four GEMMs of a block, speed-up over cuBLAS FP16")
    for b in report["blocks"]:
        print(f"{b['model']:28s} " + "  ".join(f"{impl} {r['vs_fp16']:.2f}x ({r['ms']:.3f} ms)"
                                               for impl, r in b["results"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
