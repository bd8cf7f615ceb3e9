"""The MNIST VAR's tokens on the CPU in float32 with ``CudaStep``'s graph rewrites (caches in place, visible-prefix
attention, qkv into the caches, attention writing codes), eager against torch.compile (aot_eager, inductor): whether
compiling changes what the rewritten step computes, apart from the GPU's fp16 numerics.

    python benchmarks/compile_tokens_cpu.py [--images 48]

``CudaStep`` applies these rewrites only with CUDA graphs; here a small stand-in keeps each cache in one buffer and
sets the visible keys per call, as it does.
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backends.cuda.kv_cache import (attention_into_codes, in_place_caches, qkv_into_caches, visible_keys,
                                    visible_prefix, visible_prefix_attention)
from backends.cuda.lower import to_device
from compiler.config import CalibrationConfig, CompileConfig
from compiler.driver import Compiler
from evaluation.metrics import token_agreement
from frontends import load_model
from frontends.sampling import batch_seed


class InPlaceStep:
    def __init__(self, gm, backend):
        self.gm = to_device(gm, "cpu", torch.float32).eval()
        self.state = in_place_caches(self.gm)
        self.mask = visible_prefix_attention(self.gm)
        qkv_into_caches(self.gm)
        attention_into_codes(self.gm)
        self.run = torch.compile(self.gm, backend=backend) if backend else self.gm
        self.buffers = {}

    @torch.no_grad()
    def __call__(self, *inputs):
        inputs = list(inputs)
        for i in self.state:
            buf = self.buffers.setdefault((i, tuple(inputs[i].shape)), inputs[i].clone())
            if inputs[i] is not buf:
                buf.copy_(inputs[i])
            inputs[i] = buf
        with visible_keys(visible_prefix(inputs[self.mask])):
            out = self.run(*inputs)
        return [t if j in self.state.values() else t.clone() for j, t in enumerate(out)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48)
    args = p.parse_args()
    labels = torch.tensor([i % 10 for i in range(args.images)])
    bundle = load_model("builtin:mnist-var")
    gm = Compiler(CompileConfig(model="builtin:mnist-var", recipe="minmax", target="cuda",
                                calibration=CalibrationConfig(samples=2)), say=lambda m: None).quantize().gm

    def generate(step):
        return [t for s in range(0, len(labels), 16)
                for t in bundle.extra["generate"](labels[s:s + 16], batch_seed(0, s), step=step)]

    fp = generate(None)
    eager = None
    for backend in (None, "aot_eager", "inductor"):
        t0 = time.perf_counter()
        tokens = generate(InPlaceStep(copy.deepcopy(gm), backend))
        eager = tokens if backend is None else eager
        print(f"{backend or 'eager':10s} tokens = FP {token_agreement(fp, tokens):.2%}, = eager "
              f"{token_agreement(eager, tokens):.2%} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
