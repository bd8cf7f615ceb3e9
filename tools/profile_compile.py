"""``python -m tools.profile_compile --model var-d16 --samples 1,2,4``

Time and peak memory of each stage of a compile (build the workload, trace, every pass of the
pipeline, ONNX export) as the number of calibration samples grows. Each sample count runs in a
fresh subprocess, so that its peak resident memory (``ru_maxrss``) is its own; a stage's "peak
+MB" is how much that peak grew during the stage (0 when the stage stayed under an earlier
peak). Pass times are the pass manager's records; "pass-manager-checks" is the rest of the pipeline's
wall time (its probe runs and the verification after every pass). Workloads are the benchmark's (``tools.bench``,
random weights): a sample is one image of calibration steps at batch 1 (VAR: every scale;
LlamaGen decode: a few steps). Progress goes to stderr, the table to stdout.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from compiler.profile import profile_one, profiled_workloads, render
from core.errors import UserError
from core.io import atomic_write_text, check_writable
from core.progress import say
from tools._cli import main_wrapper

RESULT_PREFIX = "profile_compile_result="


def run_sample_count(model: str, samples: int, pipeline: str, bits: str, onnx: bool = True) -> dict:
    """profile_one in a fresh interpreter (its own peak RSS); stderr passes through."""
    cmd = [sys.executable, "-m", "tools.profile_compile", "--model", model, "--pipeline", pipeline, "--bits", bits,
           "--worker", str(samples)] + ([] if onnx else ["--no-onnx"])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise UserError(f"profiling {model} at {samples} samples failed (exit status {proc.returncode}); see above")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.profile_compile", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="var-tiny", help="a benchmark workload with a calibration set (see --list)")
    p.add_argument("--list", action="store_true", help="list the workloads that can be profiled")
    p.add_argument("--samples", default="1,2,4", help="comma-separated calibration sample counts (images)")
    p.add_argument("--recipe", default="minmax", help="recipe whose pipeline and bits are run (default: minmax)")
    p.add_argument("--pipeline", help="pass pipeline text (overrides the recipe's)")
    p.add_argument("--bits", help="weight/activation bit widths (overrides the recipe's)")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export stage")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: profile one sample count here
    return p


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    from core.qmath import precision
    from passes.infra import parse_pipeline
    from passes.recipes import load_recipe

    args = build_parser().parse_args(argv)
    named = profiled_workloads()
    if args.list:
        print("\n".join(sorted(named)))
        return 0
    if args.model not in named:
        raise UserError(f"unknown workload {args.model!r}; choose from {', '.join(sorted(named))}")
    recipe = load_recipe(args.recipe)
    pipeline, bits = args.pipeline or recipe.pipeline, args.bits or recipe.bits
    parse_pipeline(pipeline)
    precision(bits)
    if args.worker is not None:
        print(RESULT_PREFIX + json.dumps(profile_one(args.model, args.worker, pipeline, bits, not args.no_onnx)), flush=True)
        return 0
    try:
        counts = [int(s) for s in args.samples.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--samples must be integers separated by commas, got {args.samples!r}") from None
    if not counts or min(counts) < 1:
        raise UserError(f"--samples must be positive integers, got {args.samples!r}")
    if args.json:
        check_writable(args.json, "--json", kind="file")  # before any work
    results = []
    for n in counts:
        say(f"profiling {args.model} with {n} calibration sample(s) in a fresh process")
        results.append(run_sample_count(args.model, n, pipeline, bits, not args.no_onnx))
    print(render(results))
    if args.json:
        atomic_write_text(args.json, json.dumps({"pipeline": pipeline, "bits": bits, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
