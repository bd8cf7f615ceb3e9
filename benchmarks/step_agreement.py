"""The trained MNIST VAR's token agreement with its FP generation, for ``CudaStep``'s variants on the GPU: the
attention writing the output projection's codes (``fuse_attention_out``, the default) or cuDNN's SDPA and a
quantize kernel, each with and without torch.compile; and the same lowered graph on the kernels' torch
reference on the CPU (float32), which ``tests/test_cuda_target.py`` holds the GPU to (within 1 point).

    python benchmarks/step_agreement.py --images 200 --json FILE

Batches of 16 images seeded as ``tools.generate`` seeds them; FP runs on the same device as each variant
(CUDA draws other random streams than the CPU).
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backends.cuda.runner import CudaStep
from compiler.config import CalibrationConfig, CompileConfig
from compiler.driver import Compiler
from evaluation.metrics import token_agreement
from frontends import load_model
from frontends.sampling import batch_seed

VARIANTS = {"attention writes codes, eager": {}, "SDPA + quantize kernel, eager": {"fuse_attention_out": False},
            "attention writes codes, torch.compile": {"compile": True},
            "SDPA + quantize kernel, torch.compile": {"fuse_attention_out": False, "compile": True}}


def generate(bundle, labels, device, step=None, batch=16):
    for part in ("model", "tokenizer"):
        bundle.extra[part].to(device)
    tokens = []
    with torch.no_grad():
        for start in range(0, len(labels), batch):
            tokens += [t.cpu() for t in bundle.extra["generate"](labels[start:start + batch], batch_seed(0, start),
                                                                 step=step)]
    return tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--recipe", default="minmax", help="the recipe tests/test_cuda_target.py compiles with")
    p.add_argument("--calib-samples", type=int, default=2)
    p.add_argument("--variants", default=";".join(VARIANTS), help="names of VARIANTS, separated by semicolons")
    p.add_argument("--json")
    args = p.parse_args()
    labels = torch.tensor([i % 10 for i in range(args.images)])
    bundle = load_model("builtin:mnist-var")
    c = Compiler(CompileConfig(model="builtin:mnist-var", recipe=args.recipe, target="cuda",
                               calibration=CalibrationConfig(samples=args.calib_samples)), say=lambda m: None)
    gm = c.quantize().gm
    out = {"images": args.images, "recipe": args.recipe, "calib_samples": args.calib_samples, "agreement": {}}
    fp = {"cpu": generate(bundle, labels, "cpu")}
    out["agreement"]["torch reference, CPU (float32)"] = token_agreement(
        fp["cpu"], generate(bundle, labels, "cpu", CudaStep(copy.deepcopy(gm), device="cpu")))
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        fp["cuda"] = generate(bundle, labels, "cuda")
        for name in args.variants.split(";"):
            t0 = time.perf_counter()
            step = CudaStep(copy.deepcopy(gm), device="cuda", **VARIANTS[name])
            out["agreement"][name] = token_agreement(fp["cuda"], generate(bundle, labels, "cuda", step))
            out.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    for name, a in out["agreement"].items():
        print(f"{name:40s} tokens = FP {a:.2%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
