"""``python -m tools.bench --model NAME --backends ort-int8,ort-fp32,torch-fp32 --batch B``

Runs every backend on the same inputs in one process, interleaved round by round after a
warm-up, and prints median / min / max latency, the ratio against the first floating-point
backend, peak memory and model size. Timings on shared machines are noisy: compare ratios
from one run, never absolute numbers across runs. The last line is machine-readable:
``speedup_vs_fp32=<first int8 backend / first fp backend>``.

Backends: torch-fp32, torch-fp16, torch-fp16-compiled, torch-int8 (real int8 GEMMs via
torch._int_mm + torch.compile, CUDA), ort-fp32, ort-int8 (onnxruntime with fused QDQ),
ort-int8-ref (QDQ fusion disabled).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils._pytree import tree_map

from frontends.generic import ModelBundle
from passes.diagnostics import UserError
from passes.pipeline import BITS, load_recipe
from tools._cli import main_wrapper, say
from tools.report import model_bytes

BACKENDS = ("torch-fp32", "torch-fp16", "torch-fp16-compiled", "torch-int8", "ort-fp32", "ort-int8", "ort-int8-ref")


def _rebatch(inputs: tuple, batch: int) -> tuple:
    """Repeat the example batch (dim 0 of every tensor with a batch axis) to ``batch``."""
    def rep(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        b = t.shape[0]
        return t.repeat(batch // b + 1, *[1] * (t.dim() - 1))[:batch] if b > 1 else t
    return tuple(tree_map(rep, list(inputs)))


def workloads() -> dict[str, Callable[[int], ModelBundle]]:
    from frontends import examples

    def block(dim, tokens, heads):
        def build(batch):
            b = examples.tiny_block(dim=dim, tokens=tokens, batch=batch)
            b.module.attn.heads = heads
            return b
        return build

    named = {
        "tiny-block": block(64, 16, 4),
        # one transformer block at VAR-d16 width (1024, 16 heads) on the last scale (256 tokens)
        "block-d16": block(1024, 256, 16),
    }
    try:
        from frontends import bench_workloads
    except ImportError:
        return named
    named.update(bench_workloads.WORKLOADS)
    return named


@dataclass
class Runner:
    name: str
    fn: Callable[[tuple], object]
    inputs: tuple
    size_bytes: int
    device: str
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    note: str = ""


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _prepare(name: str, fp_gm, q_gm, inputs: tuple, workdir: Path, bundle: ModelBundle) -> Runner:
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if name == "torch-fp32":
        m = copy.deepcopy(fp_gm).to(dev).float()
        ins = tuple(tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, list(inputs)))
        return Runner(name, lambda x: m(*x), ins, model_bytes(m), dev)
    if name in ("torch-fp16", "torch-fp16-compiled"):
        if not cuda:
            raise UserError(f"backend {name} needs CUDA")
        m = copy.deepcopy(fp_gm).to(dev).half()
        ins = tuple(tree_map(lambda t: (t.half() if t.is_floating_point() else t).to(dev) if isinstance(t, torch.Tensor) else t, list(inputs)))
        f = torch.compile(m) if name.endswith("compiled") else m
        return Runner(name, lambda x: f(*x), ins, model_bytes(m), dev)
    if name == "torch-int8":
        from backends import torch_int8

        low, counts = torch_int8.lower_to_int8(copy.deepcopy(q_gm), dtype=torch.float16 if cuda else torch.float32)
        low = torch_int8.to_device(low, dev, torch.float16 if cuda else torch.float32)
        ins = tuple(tree_map(lambda t: ((t.half() if cuda else t) if t.is_floating_point() else t).to(dev)
                             if isinstance(t, torch.Tensor) else t, list(inputs)))
        f = torch.compile(low) if cuda else low
        note = f"{counts['int8_linears']} int8 linears" + ("" if cuda else " (CPU: dequantized float fallback)")
        return Runner(name, lambda x: f(*x), ins, model_bytes(low), dev, note=note)
    if name.startswith("ort-"):
        from backends.onnx_export import export_onnx
        from backends.ort_runner import make_session, run

        gm = fp_gm if name == "ort-fp32" else q_gm
        path = export_onnx(copy.deepcopy(gm), bundle.example_inputs, workdir / f"{name}.onnx",
                           input_names=bundle.input_names, output_names=bundle.output_names)
        sess = make_session(path, "reference" if name.endswith("-ref") else "fast")
        np_in = tuple(t.numpy() if isinstance(t, torch.Tensor) else t for t in inputs)
        return Runner(name, lambda x: run(sess, x), np_in, path.stat().st_size, "cpu")
    raise UserError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def measure(runners: list[Runner], *, warmup: int, repeats: int) -> None:
    for r in runners:
        for _ in range(warmup):
            r.fn(r.inputs)
        _sync(r.device)
    for _ in range(repeats):  # interleaved: drift in machine load hits every backend alike
        for r in runners:
            _sync(r.device)
            t0 = time.perf_counter()
            r.fn(r.inputs)
            _sync(r.device)
            r.times.append(time.perf_counter() - t0)
    for r in runners:
        if r.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            r.fn(r.inputs)
            _sync("cuda")
            r.peak_bytes = torch.cuda.max_memory_allocated()


def render(runners: list[Runner]) -> tuple[str, float | None]:
    fp = next((r for r in runners if "int8" not in r.name), None)
    q = next((r for r in runners if "int8" in r.name), None)
    base = statistics.median(fp.times) if fp else None
    lines = [f"{'backend':22s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} {'vs ' + (fp.name if fp else '-'):>24s} "
             f"{'peak MB':>8s} {'size MB':>8s}  note"]
    for r in runners:
        med = statistics.median(r.times)
        ratio = f"{base / med:.2f}x" if base else "-"
        peak = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes else "n/a"
        lines.append(f"{r.name:22s} {med * 1e3:10.2f} {min(r.times) * 1e3:8.2f} {max(r.times) * 1e3:8.2f} {ratio:>24s} "
                     f"{peak:>8s} {r.size_bytes / 2**20:8.2f}  {r.note}")
    speedup = base / statistics.median(q.times) if (fp and q) else None
    return "\n".join(lines), speedup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-block", help="a named workload (see --list)")
    p.add_argument("--list", action="store_true", help="list the named workloads")
    p.add_argument("--backends", default="ort-fp32,ort-int8,torch-fp32", help=f"comma-separated, from {', '.join(BACKENDS)}")
    p.add_argument("--batch", type=int, default=2, help="batch (CFG doubles it inside family workloads)")
    p.add_argument("--recipe", default="minmax", help="recipe used for the int8 backends")
    p.add_argument("--bits", choices=sorted(BITS), default="W8A8")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch / onnxruntime CPU threads")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    return p


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    named = workloads()
    if args.list:
        print("\n".join(sorted(named)))
        return 0
    if args.model not in named:
        raise UserError(f"unknown workload {args.model!r}; choose from {', '.join(sorted(named))}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            raise UserError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from tools.compile import quantize

    recipe = load_recipe(args.recipe)
    say(f"building {args.model} at batch {args.batch}")
    bundle = named[args.model](args.batch)
    calib = bundle.calib_inputs or [bundle.example_inputs]
    t0 = time.perf_counter()
    fp_gm, q_gm, _, _ = quantize(bundle, recipe.pipeline, args.bits, calib)
    say(f"quantized with {recipe.name} ({args.bits}) in {time.perf_counter() - t0:.1f} s")
    inputs = bundle.example_inputs
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        runners = [_prepare(b, fp_gm, q_gm, inputs, Path(tmp), bundle) for b in backends]
        measure(runners, warmup=args.warmup, repeats=args.repeats)
    table, speedup = render(runners)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"workload {args.model}, batch {args.batch}, {args.repeats} interleaved repeats after {args.warmup} warm-up; {device}")
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "workload": args.model, "batch": args.batch, "device": device,
            "backends": {r.name: {"times_s": r.times, "peak_bytes": r.peak_bytes, "size_bytes": r.size_bytes,
                                  "note": r.note} for r in runners}, "speedup_vs_fp32": speedup}, indent=1))
    print(f"speedup_vs_fp32={speedup:.3f}" if speedup else "speedup_vs_fp32=n/a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
