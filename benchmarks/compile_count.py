"""How many ``_qgemm_kernel`` binaries a fresh GPU compiles for a MNIST VAR generation, counted on the CPU.

    TRITON_INTERPRET=1 python benchmarks/compile_count.py [--images 50] [--json FILE]

The MNIST VAR, compiled for ``--target cuda`` (recipe ptq4arvg), generates ``--images`` images in one batch
through ``CudaStep`` under Triton's interpreter (as ``tools.generate`` runs it on a GPU; ``test_cuda_lower.py``'s
GPU agreement test runs it within ``kernels.untuned()``). A hook on the autotuner records what a GPU would do (the
qkv GEMM's fixed tiles aside): the tuning keys, the tiles it times (``kernels._prune`` with Hopper's rules) and
the distinct binaries those tiles compile to. A binary is one combination of constexprs, tile and integer
specializations: Triton specializes an integer argument unless it is in ``do_not_specialize``, by whether it is 1
or a multiple of 16. Each row also counts what each specialized argument of the launch costs (the binaries without
it), and the binaries within ``kernels.untuned()`` (one fixed tile a size, nothing timed; the agreement test's
mode).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("error: run under Triton's interpreter: TRITON_INTERPRET=1 python benchmarks/compile_count.py")

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backends.cuda import kernels
from backends.cuda.runner import CudaStep
from compiler.config import CalibrationConfig, CompileConfig
from compiler.driver import Compiler
from frontends import load_model

VARYING = ("M", "N", "K", "tokens", "res_gain_stride")  # the integer arguments whose values change between GEMMs


def spec(value: int) -> str:
    return "1" if value == 1 else "16" if value % 16 == 0 else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--json")
    p.add_argument("--specialize", default="", help="comma-separated arguments to count as specialized though the "
                   "kernel is not (tokens: the count before the seventh session of 2026-12-07)")
    args = p.parse_args()
    unspecialized = set(kernels._qgemm_kernel.kwargs["do_not_specialize"] or ()) - set(args.specialize.split(","))
    specialized = [n for n in VARYING if n not in unspecialized]
    names = kernels._qgemm_kernel.arg_names
    keys, timed, binaries, untuned = set(), 0, set(), set()
    run = kernels._autotuned.run

    def hook(*a, **kw):
        nonlocal timed
        named = dict(zip(names, a))
        key = (named["N"], named["K"], named["M_BUCKET"], kw["SWIGLU"], kw["RESIDUAL"])
        tiles = kernels._prune(kernels.QGEMM_CONFIGS, named, **kw)
        if key not in keys:
            keys.add(key)
            timed += len(tiles)
        flags = (*sorted((k, v) for k, v in kw.items() if k.isupper()), ("ONE_TOKEN", named["tokens"] == 1))
        ints = tuple((n, spec(named[n])) for n in specialized)
        binaries.update((flags, str(tile), ints) for tile in tiles)
        untuned.add((flags, str(kernels.untuned_tile(named["M"])), ints))
        return run(*a, **kw)

    kernels._autotuned.run = hook
    bundle = load_model("builtin:mnist-var")
    gm = Compiler(CompileConfig(model="builtin:mnist-var", recipe="ptq4arvg", target="cuda",
                                calibration=CalibrationConfig(samples=2)), say=lambda m: None).quantize().gm
    with torch.no_grad():
        bundle.extra["generate"](torch.tensor([i % 10 for i in range(args.images)]), 0,
                                 step=CudaStep(gm, device="cpu"))
    without = {n: len({(f, t, tuple(i for i in ints if i[0] != n)) for f, t, ints in binaries}) for n in specialized}
    result = {"images": args.images, "unspecialized": sorted(unspecialized), "tuning_keys": len(keys),
              "timed_tiles": timed, "binaries": len(binaries), "binaries_without": without,
              "binaries_untuned": len(untuned)}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
