"""Where a compile's time and memory go: seconds and peak-RSS growth per stage and per pass, at several
calibration sample counts (``tools.profile_compile`` runs each count in a fresh process)."""
from __future__ import annotations

import inspect
import resource
import tempfile
import time
from pathlib import Path

from core.progress import say


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
