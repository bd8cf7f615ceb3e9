"""``python -m tools.bench --model NAME --backends ort-int8,ort-fp32,torch-fp32 --batch B``

Runs every backend on the same inputs in one process, interleaved round by round after a
warm-up (``--order blocked``: each backend's warm-up and repeats in one block; ``--order interleaved,blocked``:
both in turn), and prints median / min / max latency, the ratio against the first floating-point
backend, the SQNR of the step's first output (logits) against the FP graph's on the same inputs
(``--steps last``), the memory one call needs beyond the resident weights and inputs ("run MB",
CUDA only) and the model size; on CUDA also the SM clock after each call (median) and, in blocked order,
the energy per call: the block's mean power (between the first and last update of NVML's energy counter seen
in it; the counter moves about every 100 ms, so a block needs 200 ms or more) times the median call. Timings
on shared machines are noisy: compare ratios from one run, never absolute numbers across runs. The last line is machine-readable:
``speedup_vs_fp32=<first int8 backend / first fp backend>``.

Backends are the runners of ``backends.registry`` (``--list-backends``): the torch runners
(``backends.torch_target``), the onnxruntime runners and onnxruntime's own quantizers as peers
(``backends.onnx_target``), and the GPU backend's (``backends.cuda``). On a CPU without VNNI the
int8 weights of onnxruntime runners are quantized to 7 bits (reduce-range), so that onnxruntime's
u8 x s8 kernels cannot saturate. FP8 backends (cuda-fp8) run a second quantized graph whose weights were
quantized for the FP8 grid, as ``tools.compile --target cuda-fp8`` quantizes them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from backends.registry import ORDERS, Runner, measure, runner, runners, target
from compiler.bench import generation, output_sqnr, profile_table, render, workloads
from compiler.config import CompileConfig
from compiler.driver import Compiler, quantize
from core.errors import UserError
from core.io import atomic_write_text, check_writable
from core.progress import say
from core.qmath import PRECISIONS
from passes.recipes import load_recipe
from tools._cli import main_wrapper


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-block", help="a named workload (see --list)")
    p.add_argument("--list", action="store_true", help="list the named workloads")
    p.add_argument("--list-backends", action="store_true", help="list the runners --backends takes")
    p.add_argument("--backends", default="ort-fp32,ort-int8,torch-fp32", help="comma-separated runner names (--list-backends)")
    p.add_argument("--batch", default="2", help="images per batch, or a comma-separated list measured in turn "
                                                 "(CFG doubles the rows of family workloads)")
    p.add_argument("--steps", choices=("last", "all"), default="last",
                   help="last: one step (VAR, Infinity: the last scale; LlamaGen: a decode step); all: a whole "
                        "generation, sampling included (VAR, Infinity, LlamaGen, PAR)")
    p.add_argument("--recipe", help="recipe of the int8 backends (default: tools.compile's, ptq4arvg for family "
                                     "models); its exclusions and the family's default ones apply, as in tools.compile")
    p.add_argument("--pipeline", help="pass pipeline for the int8 backends (overrides the recipe's; labelled as an override)")
    p.add_argument("--bits", choices=sorted(PRECISIONS), help="default: the recipe's")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--order", default="interleaved",
                   help="interleaved: the backends take turns each repeat; blocked: each backend's warm-up and "
                        "repeats in one block (a GPU at its power cap keeps that backend's own clock); "
                        "'interleaved,blocked': both, one after the other on the same compiled backends")
    p.add_argument("--threads", type=int, help="torch / onnxruntime CPU threads")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    p.add_argument("--profile", action="store_true",
                   help="after timing, print each backend's top kernels by device time (where the time goes)")
    return p


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    named = workloads()
    if args.list:
        print("\n".join(sorted(named)))
        return 0
    if args.list_backends:
        print("\n".join(f"{name:22s} {'int8' if spec.quantized else 'fp  '}  target {spec.target}"
                        for name, spec in runners().items()))
        return 0
    if args.model not in named:
        raise UserError(f"unknown workload {args.model!r}; choose from {', '.join(sorted(named))}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    specs = [runner(b) for b in backends]  # an unknown name fails here
    if not torch.cuda.is_available() and (gpu_only := [s.name for s in specs if s.needs_cuda]):
        raise UserError(f"backend {gpu_only[0]} needs CUDA")  # before the workload is built and quantized
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    try:
        batches = [int(b) for b in str(args.batch).split(",")]
    except ValueError:
        raise UserError(f"--batch must be integers separated by commas, got {args.batch!r}") from None
    if min(batches) < 1:
        raise UserError(f"--batch sizes must be at least 1, got {args.batch!r}")
    orders = [o.strip() for o in args.order.split(",")]
    if not orders or any(o not in ORDERS for o in orders) or len(set(orders)) < len(orders):
        raise UserError(f"--order must be one or more of {', '.join(ORDERS)} separated by commas, got {args.order!r}")
    if args.repeats < 1 or args.warmup < 0:
        raise UserError(f"--repeats must be at least 1 and --warmup at least 0, got {args.repeats} and {args.warmup}")
    if args.json:
        check_writable(args.json, "--json", kind="file")  # before any work
    if args.recipe:
        load_recipe(args.recipe)  # a typo fails before the workload is built
    say(f"building {args.model}")
    bundle = named[args.model](batches[0])
    calib = bundle.calib_inputs or [bundle.example_inputs]
    t0 = time.perf_counter()
    reduce_range = any(s.quantized and target(s.target).weight_reduce_range() for s in specs)
    # attention matmuls a target runs in int8 (ort on VNNI: q @ k^T), for every int8 backend of the run, as reduce_range
    attention = next((a for s in specs if s.quantized and (a := target(s.target).attention_sites())), "")
    # The int8 graph is built as tools.compile builds it: the recipe, its bits and exclusions, the family's
    # default exclusions (one-row AdaLN linears stay in float).
    build = Compiler(CompileConfig(model=f"workload:{args.model}", recipe=args.recipe, pipeline=args.pipeline,
                                   bits=args.bits), bundle=bundle, say=lambda msg: None)
    exclusions = build.exclusions(announce=False)
    pipeline = args.pipeline or build.recipe.pipeline
    how = (f"pipeline override {pipeline!r}" if args.pipeline else f"recipe {build.recipe.name}") + \
        (f", {sum(map(len, exclusions.values()))} sites excluded ({', '.join(exclusions)})" if exclusions else "") + \
        (f", attention matmuls {attention} in int8 (the ort target's)" if attention else "")
    # one quantized graph per weight format the backends run: FP8 backends get weights calibrated for FP8
    formats = [target(s.target).weight_format() if s.quantized else "int8" for s in specs]
    q_gms = {}
    for fmt in dict.fromkeys(formats):
        fp_gm, q_gms[fmt], _, _ = quantize(bundle, pipeline, build.bits, calib, exclude=list(exclusions),
                                           reduce_range=reduce_range, attention_sites=attention, weight_format=fmt)
    fp8 = ", FP8 weights for " + ", ".join(s.name for s, f in zip(specs, formats) if f == "fp8") if "fp8" in q_gms else ""
    say(f"quantized with {how} ({build.bits}{', 7-bit weights' if reduce_range else ''}{fp8}) "
        f"in {time.perf_counter() - t0:.1f} s")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        prepared = [s.prepare(fp_gm, q_gms[f], Path(tmp), bundle) for s, f in zip(specs, formats)]
        step_fns = [(r.fn, r.convert) for r in prepared]
        for batch, order in itertools.product(batches, orders):
            first = prepared[0]  # inputs are made once, on the first backend's device and dtype, and shared
            inputs = (bundle.extra["inputs_for_batch"](batch, device=first.device, dtype=first.dtype)
                      if "inputs_for_batch" in bundle.extra else bundle.example_inputs)
            timed = []
            for r, (fn, convert) in zip(prepared, step_fns):
                r = Runner(r.name, fn, convert, r.size_bytes, r.device, r.dtype, note=r.note, onnx=r.onnx)
                if args.steps == "all":
                    r.fn, r.inputs = generation(r, bundle, batch), ()
                else:
                    r.inputs = r.convert(inputs)
                timed.append(r)
            say(f"timing {', '.join(backends)} at batch {batch}")
            missing = measure(timed, warmup=args.warmup, repeats=args.repeats, order=order)
            if args.steps == "last":  # fidelity beside speed: the step's logits against the FP graph's
                output_sqnr(fp_gm, timed, inputs)
            table, speedup = render(timed)
            what = ("full generation" if args.steps == "all" else
                    "one decode step" if bundle.family == "llamagen" else "one last-scale step")
            print(f"workload {args.model} ({what}), batch {batch}, {args.repeats} {order} repeats after "
                  f"{args.warmup} warm-up; {device}; int8 graph: {how}, {build.bits}")
            print(table, flush=True)
            if missing:
                print(f"not recorded: {missing}")
            if args.profile and order == orders[0]:  # after the table: at d16 on a CPU the profiles take minutes
                for r in timed:
                    print(f"--- profile of {r.name} (3 calls)")
                    print(profile_table(r), flush=True)
            print(f"speedup_vs_fp32={speedup:.3f}" if speedup else "speedup_vs_fp32=n/a", flush=True)
            results.append({"batch": batch, "order": order, "speedup_vs_fp32": speedup, "backends": {
                r.name: {"times_s": r.times, "peak_bytes": r.peak_bytes, "size_bytes": r.size_bytes, "note": r.note,
                         "sqnr_db": r.sqnr_db, "clocks_mhz": r.clocks_mhz,
                         "power_w": r.power_w}
                for r in timed}})
            del timed
    if args.json:
        atomic_write_text(args.json, json.dumps({"workload": args.model, "steps": args.steps, "device": device,
                                               "order": ",".join(orders),
                                               "recipe": None if args.pipeline else build.recipe.name,
                                               "pipeline": pipeline, "pipeline_override": bool(args.pipeline),
                                               "exclude": exclusions, "bits": build.bits, "attention_sites": attention,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
