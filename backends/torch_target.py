"""``--target torch`` and the PyTorch runners.

The target keeps the fake-quant graph and saves it as data (``graph.json`` + tensors;
``backends.fx_graph``), which ``tools.generate --quantized DIR`` rebuilds without running code
from the files. Runners (``tools.bench``): torch-fp32, torch-fp16 (eager), torch-fp16-compiled,
torch-fp16-autotune (inductor max-autotune), torch-int8 (``torch._int_mm`` + torch.compile, CUDA;
the lowering passes ``fuse-attention,lower-int8-torch``) and torch-int8-autotune. Every torch runner
runs floating-point attention as one ``scaled_dot_product_attention`` call, as the official models
do; the traced step spells it out as matmuls only so that passes can see them.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from backends import torch_int8
from backends.registry import ExportJob, Runner, StepOptions, Target, converter, register_runner, register_target
from core.errors import UserError
from core.numerics import module_bytes


@register_target
class TorchTarget(Target):
    name = "torch"
    summary = "the fake-quant torch graph, saved as data (graph.json + tensors)"

    def export(self, job: ExportJob) -> dict:
        from backends.fx_graph import save_graph

        job.say("[3/4] target torch: keeping the fake-quant graph (real INT8 GEMMs: --target cuda)")
        # graph.json + tensors: what tools.generate --quantized rebuilds (data, never executed); graph.py to read
        save_graph(job.gm, job.out)
        (job.out / "graph.py").write_text(job.gm.code)
        return {}

    def load_step(self, path: Path, bundle, device, options: StepOptions = StepOptions()):
        from backends.fx_graph import load_graph
        from frontends import trace

        gm = load_graph(path, copy.deepcopy(trace(bundle)))  # a copy: the driver keeps the FP model
        return gm.eval().to(device), f"fake-quant torch graph of {path}"


def compiled(module, mode: str | None = None):
    """``torch.compile`` that keeps every VAR scale's shape (10 shapes) instead of falling back to eager."""
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    return torch.compile(module, mode=mode)


def lowered(q_gm, pipeline: str):
    """A copy of ``q_gm`` through registered lowering passes (verified like every pass; no probe here)."""
    from passes.infra import PassContext, PassManager

    return PassManager(pipeline).run(copy.deepcopy(q_gm), PassContext())


def _cuda_or_error(name: str) -> str:
    if not torch.cuda.is_available():
        raise UserError(f"backend {name} needs CUDA")
    return "cuda"


@register_runner("torch-fp32", target="torch", quantized=False)
def _fp32(fp_gm, q_gm, workdir, bundle) -> Runner:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = lowered(fp_gm, "fuse-attention").to(dev).float()
    return Runner("torch-fp32", lambda x: m(*x), converter(dev, torch.float32), module_bytes(m), dev, torch.float32)


def _fp16(name: str, mode: str | None, compile_: bool):
    def prepare(fp_gm, q_gm, workdir, bundle) -> Runner:
        dev = _cuda_or_error(name)
        m = lowered(fp_gm, "fuse-attention").to(dev).half()
        f = compiled(m, mode) if compile_ else m
        return Runner(name, lambda x: f(*x), converter(dev, torch.float16), module_bytes(m), dev, torch.float16)
    return prepare


def _int8(name: str, mode: str | None):
    def prepare(fp_gm, q_gm, workdir, bundle) -> Runner:
        cuda = torch.cuda.is_available()
        dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
        low = lowered(q_gm, f"fuse-attention,lower-int8-torch{{dtype={str(dtype).removeprefix('torch.')}}}")
        n_int8 = sum(1 for n in low.graph.nodes if n.target is torch_int8.int8_linear)
        low = torch_int8.to_device(low, dev, dtype)
        f = compiled(low, mode) if cuda else low
        note = f"{n_int8} int8 linears" + ("" if cuda else " (CPU: dequantized float fallback)")
        return Runner(name, lambda x: f(*x), converter(dev, dtype), module_bytes(low), dev, dtype, note=note)
    return prepare


# -autotune: inductor's max-autotune picks among cuBLAS, CUTLASS and Triton GEMMs per shape
register_runner("torch-fp16", target="torch", quantized=False, needs_cuda=True)(_fp16("torch-fp16", None, False))
register_runner("torch-fp16-compiled", target="torch", quantized=False, needs_cuda=True)(
    _fp16("torch-fp16-compiled", None, True))
register_runner("torch-fp16-autotune", target="torch", quantized=False, needs_cuda=True)(
    _fp16("torch-fp16-autotune", "max-autotune-no-cudagraphs", True))
register_runner("torch-int8", target="torch", quantized=True)(_int8("torch-int8", None))
register_runner("torch-int8-autotune", target="torch", quantized=True)(_int8("torch-int8-autotune", "max-autotune-no-cudagraphs"))
