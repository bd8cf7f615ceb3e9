"""The trained MNIST VAR's token agreement with its FP generation: int8, FP8 with weights quantized for FP8 (what
``--target cuda-fp8`` compiles), and FP8 with weights re-quantized from the int8 graph (the earlier lowering).
The lowered graphs run on the kernels' torch reference (CPU) or the Triton kernels (CUDA), default recipe.

    python benchmarks/fp8_token_agreement.py --images 200 --json benchmarks/mnist_var_fp8_agreement.json
"""
import argparse
import json
import tempfile
import time

import torch

from backends.cuda.runner import CudaStep
from backends.torch_target import lowered
from compiler.config import CalibrationConfig, CompileConfig
from compiler.driver import Compiler
from evaluation.metrics import token_agreement
from frontends import load_model

ROUTES = (("int8", "cuda", None), ("fp8, weights for FP8", "cuda-fp8", None),
          ("fp8, weights from int8", "cuda", "fuse-attention,lower-cuda{format=fp8}"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args()
    labels = torch.tensor([i % 10 for i in range(args.images)])
    bundle = load_model("builtin:mnist-var")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp = bundle.extra["generate"](labels, 0)
    out = {"images": args.images, "calib_samples": args.calib_samples, "device": device, "agreement": {}}
    with tempfile.TemporaryDirectory() as cache:
        calibration = CalibrationConfig(samples=args.calib_samples, cache=cache)
        for name, target, lowering in ROUTES:
            t0 = time.perf_counter()
            c = Compiler(CompileConfig(model="builtin:mnist-var", target=target, calibration=calibration),
                         say=lambda m: None)
            gm = c.quantize().gm if lowering is None else lowered(c.quantize(lowering=False).gm, lowering)
            tokens = bundle.extra["generate"](labels, 0, step=CudaStep(gm, device=device))
            out["agreement"][name] = token_agreement(fp, tokens)
            print(f"{name:24s} tokens = FP {out['agreement'][name]:.2%} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
