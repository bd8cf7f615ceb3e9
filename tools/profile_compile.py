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
import inspect
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.errors import UserError
from core.progress import say
from tools._cli import main_wrapper

RESULT_PREFIX = "profile_compile_result="


def _rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profiled_workloads() -> dict:
    """The benchmark workloads whose calibration set grows with ``samples``."""
    from compiler.bench import workloads

    return {k: b for k, b in workloads().items() if "samples" in inspect.signature(b).parameters}


class _Stages:
    """Seconds and peak-RSS growth of consecutive stages."""

    def __init__(self):
        self.rows: list[dict] = []
        self.base_mb = _rss_mb()
        self._t, self._mb = time.perf_counter(), self.base_mb

    def mark(self, stage: str, seconds: float | None = None) -> None:
        now, mb = time.perf_counter(), _rss_mb()
        self.rows.append({"stage": stage, "seconds": round(now - self._t if seconds is None else seconds, 4),
                          "peak_delta_mb": round(mb - self._mb, 1), "peak_mb": round(mb, 1)})
        self._t, self._mb = time.perf_counter(), mb


class _PassMemory:
    """Pass-manager instrument: one stage row per pass, with the pass's own ``seconds`` record.

    The rest of the wall time between two passes (the manager's probe runs and verification of
    every pass) is added up in ``checks_seconds``, reported as a stage of its own.
    """

    def __init__(self, stages: _Stages):
        self.stages = stages
        self.checks_seconds = 0.0

    def start(self, pipeline: str) -> None:
        self.stages.mark("(pipeline start)")  # resets the clock: not a row of its own
        self.stages.rows.pop()

    def after_pass(self, index, pass_, result, ctx, record) -> None:
        seconds = record.get("seconds", 0.0)
        self.checks_seconds += max(time.perf_counter() - self.stages._t - seconds, 0.0)
        self.stages.mark(f"pass:{pass_.name}", seconds)

    def finish(self, records, ctx, pipeline) -> None:
        self.checks_seconds += time.perf_counter() - self.stages._t
        self.stages.mark("pass-manager-checks", self.checks_seconds)


def profile_one(model: str, samples: int, pipeline: str, bits: str, onnx: bool = True) -> dict:
    """Run the stages of one compile in this process; returns the rows and the model's size."""
    import copy
    import dataclasses

    import torch

    from backends.onnx_target import export_model
    from compiler.driver import quantize
    from core.numerics import module_bytes as model_bytes
    from frontends import trace

    stages = _Stages()
    say(f"[samples {samples}] building {model}")
    bundle = profiled_workloads()[model](1, samples=samples)
    stages.mark("build")
    say(f"[samples {samples}] tracing")
    gm = trace(bundle)
    stages.mark("trace")
    bundle = dataclasses.replace(bundle, graph=gm)  # quantize reuses this trace instead of tracing again
    say(f"[samples {samples}] passes: {pipeline} on {len(bundle.calib_inputs)} calibration steps")
    _, q_gm, _, pm = quantize(bundle, pipeline, bits, list(bundle.calib_inputs), instruments=[_PassMemory(stages)])
    onnx_bytes = None
    if onnx:
        say(f"[samples {samples}] exporting ONNX")
        stages._t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = export_model(copy.deepcopy(q_gm), bundle, Path(tmp) / "model.onnx")
            onnx_bytes = path.stat().st_size
        stages.mark("onnx-export")
    module = bundle.module
    return {"model": model, "samples": samples, "calib_steps": len(bundle.calib_inputs), "base_mb": round(stages.base_mb, 1),
            "params": sum(p.numel() for p in module.parameters()), "fp_bytes": model_bytes(module),
            "onnx_bytes": onnx_bytes, "passes": [r["name"] for r in pm.records], "stages": stages.rows,
            "torch_threads": torch.get_num_threads()}


def run_sample_count(model: str, samples: int, pipeline: str, bits: str, onnx: bool = True) -> dict:
    """profile_one in a fresh interpreter (its own peak RSS); stderr passes through."""
    cmd = [sys.executable, "-m", "tools.profile_compile", "--model", model, "--pipeline", pipeline, "--bits", bits,
           "--worker", str(samples)] + ([] if onnx else ["--no-onnx"])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise UserError(f"profiling {model} at {samples} samples failed (exit status {proc.returncode}); see above")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):])


def render(results: list[dict]) -> str:
    """One row per stage and sample count; growth is against the smallest sample count."""
    first = results[0]
    lines = [(f"workload {first['model']}: {first['params'] / 1e6:.2f} M parameters, {first['fp_bytes'] / 2**20:.1f} MB fp32, "
              f"quantized ONNX {(first['onnx_bytes'] or 0) / 2**20:.1f} MB; pipeline {','.join(first['passes'])}"),
             "calibration steps per sample count: " + ", ".join(f"{r['samples']}: {r['calib_steps']}" for r in results),
             ("peak +MB: growth of the process's peak RSS during the stage (ru_maxrss, fresh process per sample count; "
              f"{first['base_mb']:.0f} MB after imports)"),
             f"{'stage':24s} {'samples':>7s} {'seconds':>9s} {'x time':>7s} {'peak +MB':>9s} {'peak MB':>8s}"]
    for stage in [s["stage"] for s in first["stages"]]:
        base = None
        for r in results:
            row = next(s for s in r["stages"] if s["stage"] == stage)
            base = row["seconds"] if base is None else base
            grow = f"{row['seconds'] / base:.2f}" if base > 0 else "-"
            lines.append(f"{stage:24s} {r['samples']:7d} {row['seconds']:9.3f} {grow:>7s} "
                         f"{row['peak_delta_mb']:9.1f} {row['peak_mb']:8.1f}")
    totals = ", ".join(f"{r['samples']}: {sum(s['seconds'] for s in r['stages']):.2f} s / "
                       f"{max(s['peak_mb'] for s in r['stages']):.0f} MB" for r in results)
    lines.append(f"total (samples: seconds / peak RSS): {totals}")
    return "\n".join(lines)


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
    results = []
    for n in counts:
        say(f"profiling {args.model} with {n} calibration sample(s) in a fresh process")
        results.append(run_sample_count(args.model, n, pipeline, bits, not args.no_onnx))
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"pipeline": pipeline, "bits": bits, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
