"""Run an exported ONNX model on onnxruntime.

``reference`` mode disables QDQ fusion (``session.disable_quant_qdq``): every Q and DQ runs
as written, so the outputs must equal the torch fake-quant graph. ``fast`` mode lets
onnxruntime fuse Q/DQ into int8 kernels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from core.errors import UserError

MODES = ("reference", "fast")


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI int8 dot products (AVX512-VNNI or AVX-VNNI).

    Without it onnxruntime's fused u8s8 kernels can saturate when weights use the full int8
    range (DESIGN.md); reports say which kind of CPU a fast-mode number came from.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: unknown, say no
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def make_session(path: str | Path, mode: str = "reference", *, threads: int | None = None,
                 profile_prefix: str | None = None, spin: bool = True) -> ort.InferenceSession:
    """``spin=False``: idle worker threads sleep instead of spinning, so that other sessions or torch
    timed in the same process get the cores (benchmarks)."""
    if mode not in MODES:
        raise UserError(f"unknown onnxruntime mode {mode!r}; choose {' or '.join(MODES)}")
    so = ort.SessionOptions()
    if mode == "reference":
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime's own types (InvalidProtobuf, Fail, ...) for a file it cannot load
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        # onnxruntime puts its source location first and the reason (an IR version, a bad node) last
        reason = first if len(first) <= 300 else f"{first[:80]} ... {first[-220:]}"
        raise UserError(f"onnxruntime cannot load {path} as an ONNX model: {reason}") from None


def run(session: ort.InferenceSession, inputs: tuple) -> list[np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise UserError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    feed = {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)) for n, x in zip(names, inputs)}
    return session.run(None, feed)


class OrtStep:
    """An onnxruntime session with a step module's call signature, for the generation drivers."""

    def __init__(self, path: str | Path, mode: str = "reference"):
        self.session = make_session(path, mode)

    def __call__(self, *inputs):
        return tuple(torch.from_numpy(o) for o in run(self.session, inputs))


def profile_by_op(path: str | Path, mode: str, inputs: tuple, *, calls: int = 3, workdir: str | Path = ".") -> list[tuple[str, float, int]]:
    """Where one call's time goes: (op type, ms per call, nodes run per call), largest first.

    Runs ``calls`` calls of a profiling session (onnxruntime's node-level trace) after one
    warm-up call and sums the kernel time of every node by its op type (after fusion: the
    op types onnxruntime actually ran).
    """
    import json
    import os

    sess = make_session(path, mode, profile_prefix=str(Path(workdir) / "ort_profile"))
    for _ in range(calls + 1):
        run(sess, inputs)
    trace = sess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = runs[1] if len(runs) > 1 else 0  # skip the first call: allocations, pre-packing
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            t = totals.setdefault(e["args"]["op_name"], [0.0, 0])
            t[0] += e["dur"] / 1e3 / calls
            t[1] += 1 / calls
    return sorted(((op, ms, round(n)) for op, (ms, n) in totals.items()), key=lambda r: -r[1])
