"""The backend seam: every target a quantized step is built for, and every runner ``tools.bench`` times.

A **target** (``--target``) says whether it can run here and why not, which registered lowering
passes it appends to the recipe's pipeline (so they dump and verify like any pass), how it
exports a quantized graph into the output directory, and how it runs one step for the
generation drivers (``tools.generate``, the report's quality rows). A **runner** is one named way
to time a step (``tools.bench --backends``): FP or quantized, on a target's runtime.

Adding a backend is one module that defines its ``Target`` subclass and runners with
``@register_target`` / ``@register_runner``, plus its name in ``BUILTIN``.
"""
from __future__ import annotations

import abc
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch.utils._pytree import tree_map

from core.errors import UserError

# modules that register the built-in targets and runners (imported on first lookup)
BUILTIN = ("backends.onnx_target", "backends.tensorrt.target", "backends.torch_target", "backends.cuda.target")


@dataclass(frozen=True)
class StepOptions:
    """How ``tools.generate`` runs an artefact's step; a target reads the fields it names in ``step_options``
    (``ort_mode`` also reaches a compile's ``head.onnx``)."""

    ort_mode: str = "reference"  # onnxruntime: the Q/DQ graph as written, or "fast" (its fused int8 kernels)
    kv_cache: str = "float"  # the KV caches' format on the GPU: "int8" keeps codes with a scale per cached row


@dataclass
class ExportJob:
    """What a target exports: the quantized graph (after the target's lowering), the FP graph, the
    model bundle, and the output directory (a temporary one that becomes ``--out`` on success)."""

    gm: torch.fx.GraphModule
    fp_gm: torch.fx.GraphModule
    bundle: object
    out: Path
    reduce_range: bool = False
    say: Callable[[str], None] = lambda msg: None


class Target(abc.ABC):
    """One ``--target``. Subclasses set ``name``, ``summary`` and implement ``export``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # registered passes appended to the recipe's pipeline, e.g. "fuse-attention,lower-cuda"
    lowering: ClassVar[str] = ""
    # where its steps run: "torch" (follows --device), "cpu" (onnxruntime) or "cuda"
    runs_on: ClassVar[str] = "torch"
    # the ``StepOptions`` fields its ``load_step`` reads besides ``ort_mode`` (others must stay at their default)
    step_options: ClassVar[frozenset[str]] = frozenset()

    def runs_on_for(self, path: Path) -> str:
        """Where the step of this artefact (a compile output directory or a file) runs."""
        return self.runs_on

    def unavailable(self) -> str | None:
        """None when this target can build here, else a one-line reason (checked before any work)."""
        return None

    def missing(self) -> str | None:
        """What part of the artefact cannot be built here and why, said before any work; the rest is
        written and the export reports ``incomplete`` (the run then ends with an error). None: all of it."""
        return None

    def precision_blocker(self, precision) -> str | None:
        """Why this target cannot take ``precision`` (a ``core.qmath.Precision``), or None when it can."""
        return None

    def weight_reduce_range(self) -> bool:
        """Whether weights must use 7 bits on this machine (onnxruntime's u8 x s8 kernels without VNNI)."""
        return False

    def weight_format(self) -> str:
        """The weights' grid this target runs: ``int8`` (every integer width), or ``fp8`` (E4M3)."""
        return "int8"

    def attention_sites(self) -> str:
        """A glob of attention matmul sites this target runs in int8 whatever the recipe (``QuantConfig``)."""
        return ""

    @abc.abstractmethod
    def export(self, job: ExportJob) -> dict:
        """Write the artefact into ``job.out``; return the report sections it adds (``speed`` entries merge)."""

    def load_step(self, path: Path, bundle, device: torch.device,
                  options: StepOptions = StepOptions()) -> tuple[Callable, str]:
        """(step callable for the family drivers, description) from an artefact: a compile output
        directory of this target, or one of its files."""
        raise UserError(f"target {self.name} has no runner for generation")

    def compiled_step(self, out: Path, gm, bundle, reduce_range: bool) -> tuple[Callable, str]:
        """(step, what it runs on) of a just-compiled ``out`` for the quality rows."""
        return gm, "torch fake-quant"

    def quality_speed(self, bundle, fp_gm, out: Path, workdir: Path) -> dict | None:
        """A speed figure of the compiled artefact for the quality section, where the target has one."""
        return None


@dataclass
class Runner:
    """One backend ready to run: ``fn(convert(inputs))`` runs the step on its device and dtype."""

    name: str
    fn: Callable[[tuple], object]
    convert: Callable[[tuple], tuple]
    size_bytes: int
    device: str
    dtype: torch.dtype
    inputs: tuple = ()
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    clocks_mhz: list[int] = field(default_factory=list)  # CUDA: the SM clock after each timed call (NVML)
    # CUDA, blocked order: the GPU's mean power over the block of timed calls (NVML), between the first and the
    # last update of its energy counter seen in the block (``block_power``); J/call is it times the median call.
    power_w: float | None = None
    note: str = ""
    onnx: tuple[Path, str] | None = None  # onnxruntime runners: (model file, session mode), for profiles
    sqnr_db: float | None = None  # its step's first output (logits) against the FP graph's, on the timed inputs


@dataclass(frozen=True)
class RunnerSpec:
    """A named runner: ``prepare(fp_gm, q_gm, workdir, bundle) -> Runner``; ``target``: whose runtime it times."""

    name: str
    target: str
    quantized: bool
    prepare: Callable[..., Runner]
    needs_cuda: bool = False


_TARGETS: dict[str, Target] = {}
_RUNNERS: dict[str, RunnerSpec] = {}


def register_target(cls: type[Target]) -> type[Target]:
    if not cls.name or cls.name in _TARGETS:
        raise TypeError(f"target {cls.__name__} has no name or a taken one ({cls.name!r})")
    _TARGETS[cls.name] = cls()
    return cls


def register_runner(name: str, *, target: str, quantized: bool, needs_cuda: bool = False):
    def wrap(prepare: Callable[..., Runner]) -> Callable[..., Runner]:
        if name in _RUNNERS:
            raise TypeError(f"two runners are named {name!r}")
        _RUNNERS[name] = RunnerSpec(name, target, quantized, prepare, needs_cuda)
        return prepare
    return wrap


def _load_builtin() -> None:
    for module in BUILTIN:
        importlib.import_module(module)


def targets() -> dict[str, Target]:
    _load_builtin()
    return dict(_TARGETS)


def runners() -> dict[str, RunnerSpec]:
    _load_builtin()
    return dict(_RUNNERS)


def _lookup(known: dict, name: str, what: str):
    if name not in known:
        raise UserError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
    return known[name]


def target(name: str) -> Target:
    return _lookup(targets(), name, "target")


def runner(name: str) -> RunnerSpec:
    return _lookup(runners(), name, "backend")


def artefact_target(directory: Path) -> Target:
    """The target that wrote a compile output directory (its ``report.json``; older ones by their files)."""
    import json

    report = directory / "report.json"
    if report.is_file():
        try:
            name = json.loads(report.read_text())["target"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{report} is not a report of tools.compile ({type(e).__name__}: {e})") from None
        if not isinstance(name, str):
            raise UserError(f"{report} names no target")
        return target(name)
    return target("torch" if (directory / "graph.json").is_file() else "onnx")


# -- timing, shared by every runner ----------------------------------------------------------

def converter(device: str, dtype: torch.dtype) -> Callable[[tuple], tuple]:
    """Inputs to ``device``, floating ones to ``dtype``."""
    def convert(inputs: tuple) -> tuple:
        return tuple(tree_map(lambda t: (t.to(dtype) if t.is_floating_point() else t).to(device)
                              if isinstance(t, torch.Tensor) else t, list(inputs)))
    return convert


def file_bytes(path: Path) -> int:
    """An ONNX model's size with its external data."""
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def median_ms(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in ms after one warm-up call (a sanity figure, not a benchmark)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


ORDERS = ("interleaved", "blocked")


def block_power(readings: list[tuple[float, int]]) -> float | None:
    """Mean power in W from ``(time s, energy counter mJ)`` read after each call of a block (the first before it),
    between the first and the last reading that saw the counter move; None when it moved fewer than twice.
    NVML updates the counter about every 100 ms, so a reading can be that old: a window from the block's start
    to its end (as first measured) can open up to an update early, in the warm-up, and it gave 800-900 W on a
    700 W H100. Between two updates, each seen within a call of when it happened, the window is the counter's
    own."""
    moves = [readings[i] for i in range(1, len(readings)) if readings[i][1] != readings[i - 1][1]]
    if len(moves) < 2 or moves[-1][0] <= moves[0][0]:
        return None
    (t0, e0), (t1, e1) = moves[0], moves[-1]
    return (e1 - e0) / 1e3 / (t1 - t0)


def measure(runners: list[Runner], *, warmup: int, repeats: int, order: str = "interleaved") -> str:
    """Time every runner on its inputs after a warm-up; on CUDA also the memory one call needs beyond what is
    resident, and from NVML the SM clock after each timed call and the energy it took. ``interleaved``: round by
    round, so drift in machine load hits every backend alike. ``blocked``: each runner's warm-up and repeats in
    one block, so a GPU at its power cap settles into that runner's own clock instead of the one the previous
    backend left (H100, VAR-d16: the int8 step takes 23.2 ms after itself and 25.1 ms after the FP16 step;
    BENCHMARKS.md); only then is the power recorded, over each runner's block (``block_power``). Returns why
    clocks or energy are missing on CUDA, else ""."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    meter, missing = None, ""
    if any(r.device == "cuda" for r in runners):
        from backends.nvml import meter as nvml_meter

        meter, missing = nvml_meter(torch.cuda.current_device())
        if meter is not None and meter.has_energy and order != "blocked":
            missing = ("energy per call in blocked order only: NVML's counter moves about every 100 ms, "
                       "longer than a call")

    def warm(r: Runner) -> None:
        for _ in range(warmup):
            r.fn(r.inputs)
        sync(r.device)
        if r.device == "cuda":
            torch.cuda.empty_cache()

    def timed(r: Runner, readings: list | None = None) -> None:
        sync(r.device)
        t0 = time.perf_counter()
        r.fn(r.inputs)
        sync(r.device)
        t1 = time.perf_counter()
        r.times.append(t1 - t0)
        if meter is not None and r.device == "cuda":
            energy, mhz = meter.sample()
            r.clocks_mhz.append(mhz)
            if readings is not None:
                readings.append((t1, energy))

    if order == "blocked":
        for r in runners:
            warm(r)
            readings = [(time.perf_counter(), meter.sample()[0])] \
                if meter is not None and meter.has_energy and r.device == "cuda" else None
            for _ in range(repeats):
                timed(r, readings)
            if readings is not None:
                r.power_w = block_power(readings)
                if r.power_w is None:
                    missing = ("energy: a block shorter than two updates of NVML's counter (about 200 ms); "
                               "give it more --repeats")
    else:
        for r in runners:
            warm(r)
        for _ in range(repeats):
            for r in runners:
                timed(r)
    for r in runners:
        if r.device == "cuda":
            torch.cuda.empty_cache()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            r.fn(r.inputs)
            sync("cuda")
            r.peak_bytes = torch.cuda.max_memory_allocated() - resident
    return missing
