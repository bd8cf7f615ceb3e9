"""``--target cuda`` (INT8) and ``--target cuda-fp8``: the step graph on the fused Triton kernels.

The lowering passes ``fuse-attention`` (float attention as one SDPA call) and ``lower-cuda``
(``backends/cuda/lower.py``: quantized linears as one fused GEMM each, activation quantization
inside its producer) run in the pass manager after the recipe, so they dump and verify like any
pass. The artefact is data: ``graph.json`` (the lowered graph), ``weights.safetensors`` (int8 or
FP8 weights, scales, the rest of the model) and ``cuda.json`` (format, GPU, torch and Triton
versions, the autotune cache). ``tools.generate --quantized DIR --device cuda`` runs it with CUDA
graphs (``CudaStep``); off CUDA the same graph runs on the torch reference of every kernel.

Runners (``tools.bench``): cuda-int8 and cuda-fp8 (the lowered graph through torch.compile, which fuses
the float ops between the kernels, then CUDA graphs), cuda-int8-kv8 (cuda-int8 with the KV caches in int8,
a scale per cached row, attended by our Triton kernel), cuda-int8-eager (CUDA graphs only), cuda-int8-unfused-qkv
(cuda-int8 without the qkv epilogue that writes the caches: the A/B of ``CudaStep(fuse_qkv=...)``), cuda-int8-sdpa
(cuda-int8 with cuDNN's SDPA and a quantize kernel instead of our attention kernel writing the projection's
codes: the A/B of ``CudaStep(fuse_attention_out=...)``), cuda-int8-norm-residual (cuda-int8 with the residual
stream's add in the norms' kernels instead of the GEMM epilogues: the A/B of ``lower-cuda{residual-epilogue=...}``),
and the fair
FP16 baseline torch-fp16-graphs (the FP16 graph through the same ``CudaStep``: torch.compile, CUDA graphs,
KV caches in place). Each passes the returned caches back, as a sampler does.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from backends.cuda import lower  # noqa: F401  (registers the lower-cuda pass)
from backends.registry import ExportJob, Runner, StepOptions, Target, converter, register_runner, register_target
from core.errors import UserError
from core.numerics import module_bytes

def _sidecar(fmt: str) -> dict:
    from backends.cuda import kernels

    info = {"format": fmt, "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    info["autotune"] = kernels.autotune_cache()
    return info


class _CudaTarget(Target):
    format = "int8"
    runs_on = "torch"  # follows --device: a GPU, or the CPU with the kernels' torch reference (a check, not fast)
    step_options = frozenset({"kv_cache"})

    def precision_blocker(self, precision) -> str | None:
        if precision.group:
            return (f"--bits {precision.name}: the {self.name} kernels take one weight scale per output channel, not "
                    f"groups of {precision.group} input channels; use --target onnx or --target torch")
        return None

    def export(self, job: ExportJob) -> dict:
        from backends.fx_graph import save_graph

        job.say(f"[3/4] target {self.name}: the lowered graph as data (graph.json, weights.safetensors, cuda.json)")
        save_graph(job.gm, job.out, "weights.safetensors")
        (job.out / "graph.py").write_text(job.gm.code)  # to read; never executed
        sidecar = _sidecar(self.format)
        (job.out / "cuda.json").write_text(json.dumps(sidecar, indent=1))
        return {"cuda": {"format": self.format, "files": ["graph.json", "weights.safetensors", "cuda.json"],
                         "weights_bytes": (job.out / "weights.safetensors").stat().st_size,
                         "sidecar": {k: v for k, v in sidecar.items() if k != "autotune"}}}

    def load_step(self, path: Path, bundle, device, options: StepOptions = StepOptions()):
        """On a GPU: the kernels with CUDA graphs (``tools.bench``'s cuda-int8-eager; not through torch.compile,
        which took 2.4 points of the MNIST VAR's token agreement for 0.5 % of speed:
        ``benchmarks/step_agreement.py``), the KV caches in ``options.kv_cache``'s format."""
        from backends.cuda.runner import CudaStep
        from backends.fx_graph import load_graph
        from frontends import trace

        if not path.is_dir():
            raise UserError(f"{path}: a {self.name} artefact is a directory written by tools.compile --target {self.name}")
        gpu = torch.device(device).type == "cuda"
        if options.kv_cache != "float" and not gpu:
            raise UserError(f"--kv-cache {options.kv_cache}: the caches are kept so on a GPU only (--device cuda)")
        gm = load_graph(path, copy.deepcopy(trace(bundle)))  # its kernels are operators of backends.cuda.lower
        step = CudaStep(gm, device, kv_cache=options.kv_cache)
        if not gpu:
            return step, f"{self.format} torch reference of the kernels ({path})"
        return step, f"{self.format} Triton kernels, CUDA graphs, {options.kv_cache} KV caches ({path})"

    def compiled_step(self, out: Path, gm, bundle, reduce_range: bool):
        from backends.cuda.runner import CudaStep

        if torch.cuda.is_available():
            return CudaStep(copy.deepcopy(gm)), f"cuda {self.format} (Triton kernels)"
        return gm, f"cuda {self.format} lowering, CPU reference ops"


@register_target
class CudaTarget(_CudaTarget):
    name = "cuda"
    summary = "INT8 Triton kernels with the STWQ epilogue fused, CUDA graphs (sm80+)"
    lowering = "fuse-attention,lower-cuda"


@register_target
class CudaFp8Target(_CudaTarget):
    name = "cuda-fp8"
    summary = "FP8 (E4M3) Triton kernels with the same static token-group scales, CUDA graphs (sm89+)"
    lowering = "fuse-attention,lower-cuda{format=fp8}"
    format = "fp8"

    def precision_blocker(self, precision) -> str | None:
        if (precision.weight, precision.act) != (8, 8):
            return (f"--bits {precision.name}: FP8 (E4M3) has 8 bits for weights and activations; use --bits W8A8, "
                    f"or --target cuda for integer grids")
        return super().precision_blocker(precision)

    def weight_format(self) -> str:
        return "fp8"


def _lowered_step(name: str, fmt: str, compile_: bool = True, kv_cache: str = "float", fuse_qkv: bool = True,
                  fuse_attention_out: bool = True, residual_epilogue: bool = True):
    def prepare(fp_gm, q_gm, workdir, bundle) -> Runner:
        from backends.cuda.runner import CudaStep, chained
        from backends.torch_target import lowered

        if not torch.cuda.is_available():
            raise UserError(f"backend {name} needs CUDA")
        options = [f"format={fmt}"] if fmt == "fp8" else []
        options += [] if residual_epilogue else ["residual-epilogue=false"]
        gm = lowered(q_gm, "fuse-attention,lower-cuda" + ("{" + ",".join(options) + "}" if options else ""))
        # fp16 out, as the FP16 runners
        step = CudaStep(gm, compile=compile_, float_outputs=False, kv_cache=kv_cache, fuse_qkv=fuse_qkv,
                        fuse_attention_out=fuse_attention_out)
        how = "torch.compile + CUDA graphs" if compile_ else "CUDA graphs, float ops eager"
        kv = "int8 KV cache" if step.kv_scales else "KV in place" + (", qkv into caches" if step.qkv_fused else "")
        kv += ", attention writes codes" if step.attention_fused else ""
        return Runner(name, chained(step), converter("cuda", torch.float16), module_bytes(step.gm), "cuda",
                      torch.float16, note=f"{fmt} Triton kernels, {how}, {kv}")
    return prepare


register_runner("cuda-int8", target="cuda", quantized=True, needs_cuda=True)(_lowered_step("cuda-int8", "int8"))
register_runner("cuda-int8-eager", target="cuda", quantized=True, needs_cuda=True)(
    _lowered_step("cuda-int8-eager", "int8", compile_=False))
register_runner("cuda-fp8", target="cuda-fp8", quantized=True, needs_cuda=True)(_lowered_step("cuda-fp8", "fp8"))
register_runner("cuda-int8-kv8", target="cuda", quantized=True, needs_cuda=True)(
    _lowered_step("cuda-int8-kv8", "int8", kv_cache="int8"))
register_runner("cuda-int8-unfused-qkv", target="cuda", quantized=True, needs_cuda=True)(
    _lowered_step("cuda-int8-unfused-qkv", "int8", fuse_qkv=False))
register_runner("cuda-int8-sdpa", target="cuda", quantized=True, needs_cuda=True)(
    _lowered_step("cuda-int8-sdpa", "int8", fuse_attention_out=False))
register_runner("cuda-int8-norm-residual", target="cuda", quantized=True, needs_cuda=True)(
    _lowered_step("cuda-int8-norm-residual", "int8", residual_epilogue=False))


@register_runner("torch-fp16-graphs", target="torch", quantized=False, needs_cuda=True)
def _fp16_graphs(fp_gm, q_gm, workdir, bundle) -> Runner:
    """The fair FP16 baseline of the CUDA runners: the FP16 graph through the same ``CudaStep`` (torch.compile's
    fusions, CUDA graphs, KV caches in place)."""
    from backends.cuda.runner import CudaStep, chained
    from backends.torch_target import lowered

    if not torch.cuda.is_available():
        raise UserError("backend torch-fp16-graphs needs CUDA")
    step = CudaStep(lowered(fp_gm, "fuse-attention"), compile=True, float_outputs=False)
    return Runner("torch-fp16-graphs", chained(step), converter("cuda", torch.float16), module_bytes(step.gm), "cuda",
                  torch.float16, note="torch.compile, CUDA graphs, KV in place")
