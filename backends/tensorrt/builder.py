"""Build a TensorRT engine from our QDQ ONNX model (reference/tensorrt.md §1.8–§1.9).

Split in two halves:

* pure helpers, testable without TensorRT: :func:`profiles_from_bundle` (min/opt/max shapes
  from a bundle's example inputs and the export's dynamic axes), :func:`sidecar` (what the
  engine was built from and for), :func:`sha256_file`;
* :func:`build_engine`, which calls TensorRT. It was written against the documented 10.x/11.x
  Python API and has never run here: TensorRT cannot be installed in this workplace (§0).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from core.errors import UserError
from core.io import atomic_write_bytes

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
ProgressFn = Callable[[str, int, int], None]  # (phase, steps done, steps in phase)
DEFAULT_MAX_CAP = 4096


# ----------------------------------------------------------------------------- pure helpers

def _finite_int(value) -> int | None:
    """An int, or None for a missing or infinite bound (torch's ``int_oo`` raises on ``int()``)."""
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):  # sympy's infinity raises these
        return None


def _dim_range(dim, name: str, axis: int, max_cap: int) -> tuple[int, int]:
    """(min, max) of one torch.export Dim. Min is raised to 1 (a zero-size token or batch axis
    is never a real shape); an unbounded or over-large max is capped at ``max_cap``. Hints
    without a range (``Dim.AUTO``, ``Dim.DYNAMIC``) are refused: a profile needs bounds."""
    lo, hi = _finite_int(getattr(dim, "min", None)), _finite_int(getattr(dim, "max", None))
    if lo is None and hi is None:
        raise UserError(f"input {name!r} axis {axis}: dynamic dimension {dim!r} has no explicit range; "
                        "give a torch.export.Dim with min and max to build a TensorRT profile")
    lo = max(1, lo or 1)
    hi = max_cap if hi is None else min(hi, max_cap)
    if hi < lo:
        raise UserError(f"input {name!r} axis {axis}: Dim {getattr(dim, '__name__', dim)} range [{lo}, {hi}] is empty "
                        f"after capping the maximum at {max_cap}")
    return lo, hi


def _axes_spec(spec, ndim: int) -> dict[int, object]:
    """One input's dynamic-shape spec ({axis: Dim}, [Dim|None per axis], or None) as {axis: Dim}."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {int(a) % ndim: d for a, d in spec.items() if d is not None}
    if isinstance(spec, (list, tuple)):
        return {a: d for a, d in enumerate(spec) if d is not None}
    raise UserError(f"unsupported dynamic-shape spec {spec!r}: expected a dict of axis -> Dim or a list per axis")


def profiles_from_bundle(input_names: Sequence[str], example_inputs: Sequence, dynamic_shapes=None, *,
                         max_cap: int = DEFAULT_MAX_CAP, caps: Mapping[str, int] | None = None) -> Profile:
    """One optimisation profile, ``{input_name: (min_shape, opt_shape, max_shape)}``.

    Static axes get the example's size three times; dynamic axes (the ``dynamic_shapes`` given to
    the ONNX export: per input a dict ``{axis: torch.export.Dim}``, in input order, or a dict
    keyed by input name) span the Dim's [min, max], with the example's size as the optimum
    (clamped into the range). ``caps`` limits a Dim, by its name, below ``max_cap``: a profile's
    maximum sizes the activation memory TensorRT plans for (reference/tensorrt.md §1.9 shows a
    VAR profile of batch ≤ 16, tokens ≤ 680).
    """
    caps = dict(caps or {})
    if len(input_names) != len(example_inputs):
        raise UserError(f"{len(input_names)} input names for {len(example_inputs)} example inputs")
    if isinstance(dynamic_shapes, Mapping):
        specs = [dynamic_shapes.get(n) for n in input_names]
    else:
        specs = list(dynamic_shapes) if dynamic_shapes is not None else [None] * len(input_names)
        if len(specs) != len(input_names):
            raise UserError(f"dynamic_shapes has {len(specs)} entries for {len(input_names)} inputs")
    profile: Profile = {}
    for name, x, spec in zip(input_names, example_inputs, specs):
        shape = tuple(int(s) for s in x.shape)
        lo, opt, hi = list(shape), list(shape), list(shape)
        for axis, dim in _axes_spec(spec, len(shape)).items():
            cap = min(max_cap, caps.get(getattr(dim, "__name__", ""), max_cap))
            lo[axis], hi[axis] = _dim_range(dim, name, axis, cap)
            opt[axis] = min(max(shape[axis], lo[axis]), hi[axis])
        profile[name] = (tuple(lo), tuple(opt), tuple(hi))
    return profile


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar(*, onnx_path: str | Path, profiles: Sequence[Profile], trt_version: str, gpu_name: str,
            capability: tuple[int, int], build: Mapping | None = None) -> dict:
    """What an engine was built from and for. Plans are specific to the TensorRT version and the
    GPU, so a loader compares these before deserialising (reference/tensorrt.md §1.9)."""
    return {
        "tensorrt_version": trt_version,
        "gpu": {"name": gpu_name, "sm": f"{capability[0]}.{capability[1]}"},
        "onnx": {"path": Path(onnx_path).name, "sha256": sha256_file(onnx_path)},
        "inputs": {name: list(p[name][1]) for p in profiles[:1] for name in p},  # opt shapes of profile 0
        "profiles": [{name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                      for name, (lo, opt, hi) in p.items()} for p in profiles],
        "build": dict(build or {}),
    }


def read_timing_cache(path: str | Path | None) -> bytes:
    """The serialised timing cache, or b"" (an empty cache) when there is none yet."""
    if path is None or not Path(path).is_file():
        return b""
    return Path(path).read_bytes()


def _as_profile_list(profiles: Profile | Sequence[Profile]) -> list[Profile]:
    plist = [profiles] if isinstance(profiles, Mapping) else list(profiles)
    if not plist:
        raise UserError("build_engine needs at least one optimisation profile")
    for p in plist:
        for name, (lo, opt, hi) in p.items():
            if not (len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))):
                raise UserError(f"profile for {name!r}: need min <= opt <= max per axis, got {lo} / {opt} / {hi}")
    return plist


# ----------------------------------------------------------------------------- TensorRT calls (unrun here)

def _network_flags(trt) -> tuple[int, bool]:
    """(creation flags, strongly typed). STRONGLY_TYPED where the enum exists (required in 10.x,
    the default and a no-op in 11.x: reference/tensorrt.md §1.8–§1.9)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return (1 << int(flag), True) if flag is not None else (0, False)


def _parse_onnx(trt, network, logger, onnx_path: Path) -> None:
    """Parse with ``parse_from_file`` (resolves external weight data beside the model); errors
    name the ONNX node so they can be traced back to a module path."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = e.node_name() if hasattr(e, "node_name") else f"#{e.node()}"
        op = e.node_operator() if hasattr(e, "node_operator") else "?"
        errors.append(f"node {node or '#' + str(e.node())} ({op}): {e.desc()}")
    raise UserError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(errors or ["no error recorded"]))


def _add_profiles(trt, builder, network, config, plist: list[Profile]) -> None:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for p in plist:
        unknown = sorted(set(p) - set(inputs))
        if unknown:
            raise UserError(f"profile names inputs the network does not have: {', '.join(unknown)} "
                            f"(network inputs: {', '.join(inputs)})")
        missing = sorted(n for n, t in inputs.items() if n not in p and any(d < 0 for d in t.shape))
        if missing:
            raise UserError(f"dynamic network inputs without a profile: {', '.join(missing)}")
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)


def _progress_monitor(trt, progress: ProgressFn | None):
    """An ``IProgressMonitor`` forwarding to ``progress(phase, done, total)``; None when the
    API has no progress monitor (before TensorRT 10) or no callback was given."""
    if progress is None or not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.totals: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.totals[phase_name] = num_steps
            progress(phase_name, 0, num_steps)

        def step_complete(self, phase_name, step):
            progress(phase_name, step + 1, self.totals.get(phase_name, 0))
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            total = self.totals.pop(phase_name, 0)
            progress(phase_name, total, total)

    return _Monitor()


def _make_config(trt, builder, *, strongly_typed: bool, workspace_gb: float, cache_bytes: bytes, monitor):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector needs it (inspect.py)
    if not strongly_typed:  # pre-strong-typing TensorRT: the weakly typed Q/DQ path (§1.3)
        for flag in ("INT8", "FP16"):
            if hasattr(trt.BuilderFlag, flag):
                config.set_flag(getattr(trt.BuilderFlag, flag))
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if monitor is not None:
        config.progress_monitor = monitor
    return config


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, profiles: Profile | Sequence[Profile],
                 timing_cache: str | Path | None = None, workspace_gb: float = 4.0,
                 progress: ProgressFn | None = None) -> dict:
    """Build ``engine_path`` (+ ``engine_path.json`` sidecar) from a QDQ ONNX model; returns the sidecar.

    Strongly typed, no precision flags: types come from the Q/DQ nodes and the graph's dtypes
    (reference/tensorrt.md §1.3, §1.8). ``profiles``: one ``{input: (min, opt, max)}`` dict or a
    list of them (one optimisation profile each). The timing cache is read from and written
    back to ``timing_cache`` (it is keyed by device, §1.9).
    """
    from backends.tensorrt import availability

    reason = availability()
    if reason is not None:
        raise UserError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt
    import torch

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    plist = _as_profile_list(profiles)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strongly_typed = _network_flags(trt)
    network = builder.create_network(flags)
    _parse_onnx(trt, network, logger, onnx_path)
    config = _make_config(trt, builder, strongly_typed=strongly_typed, workspace_gb=workspace_gb,
                          cache_bytes=read_timing_cache(timing_cache), monitor=_progress_monitor(trt, progress))
    _add_profiles(trt, builder, network, config, plist)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path.name} (see the TensorRT log above)")
    atomic_write_bytes(engine_path, bytes(plan))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    meta = sidecar(onnx_path=onnx_path, profiles=plist, trt_version=trt.__version__,
                   gpu_name=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                   build={"strongly_typed": strongly_typed, "workspace_gb": workspace_gb,
                          "profiling_verbosity": "DETAILED", "engine_bytes": engine_path.stat().st_size})
    atomic_write_bytes(str(engine_path) + ".json", json.dumps(meta, indent=1).encode())
    return meta
