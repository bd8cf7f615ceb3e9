"""Pass infrastructure: the pass contract, the context, pipelines and the pass manager.

A pass is a small dataclass with one job. Its fields are its options, so a pipeline string
such as ``canonicalize,smooth{alpha=0.5},insert-qdq`` parses into pass objects and prints
back to the same string (MLIR's textual pipelines). Passes transform ``gm`` (usually in
place), read and write the shared ``PassContext``, and return ``PassResult(gm, modified,
stats)``. They never print and never write files: the manager and its instruments do.

The manager runs the pipeline, stamps every node a pass created with ``created_by`` (the
provenance the dumps show), lints the graph after each pass and, when the context carries a
probe batch, checks numerics against the graph before the pass: a pass that declares
``preserves_numerics`` must keep the outputs (relative error below ``fold_tolerance``),
any other pass has its SQNR against the previous graph recorded.
"""
from __future__ import annotations

import abc
import dataclasses
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Protocol

import torch
import torch.fx as fx

from core.errors import PassError, UserError
from core.numerics import min_sqnr_db, relative_error, run_outputs
from core.progress import no_progress
from core.qmath import PRECISIONS, Precision, QParams


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)


@dataclass
class Site:
    """A quantizable tensor operation, named by the user's module path (``blocks.3.attn.mat_qkv``)."""

    name: str
    kind: str  # "linear" | "matmul"
    node: str  # fx node name of the op
    in_features: int | None = None
    out_features: int | None = None
    excluded_by: str | None = None  # the pattern that excluded it, if any
    weight: str | None = None  # linears: the get_attr target of the weight (``attn.in_proj_weight``)


@dataclass(frozen=True)
class QuantConfig:
    """What the compilation asks of every pass, as typed values.

    ``precision``: the bit widths passes use when their own option is 0; ``weight_reduce_range``:
    7-bit weights (onnxruntime on CPUs without VNNI); ``group_maps``: module-path glob -> how that
    site merges the model's token groups; ``exclude``: patterns of sites kept in full precision;
    ``token_groups_input``: the graph input holding the STWQ group ids (None: the one named so);
    ``attention_sites``: a glob of attention matmul sites the target runs in int8 (``act-quant``
    quantizes their operands as with ``matmuls=true``; onnxruntime on VNNI: q @ k^T, ``*.matmul1``);
    ``weight_format``: ``int8``, or ``fp8`` (E4M3 weights, ``--target cuda-fp8``).
    """

    precision: Precision = PRECISIONS["W8A8"]
    weight_reduce_range: bool = False
    group_maps: dict[str, list[int]] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    token_groups_input: str | None = None
    attention_sites: str = ""
    weight_format: str = "int8"


@dataclass
class PassContext:
    """State shared by the passes of one compilation.

    ``config`` is what the compilation asks for; ``stats`` holds calibration statistics keyed by site name, ``qparams`` the quantization
    decisions keyed by ``<site>.<role>`` (role: input, weight, a, b), ``notes`` the
    human-readable findings a report should show (regions that cannot fold and why).
    """

    config: QuantConfig = field(default_factory=QuantConfig)
    sites: dict[str, Site] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)
    qparams: dict[str, QParams] = field(default_factory=dict)
    calib_inputs: list[tuple] = field(default_factory=list)
    probe_inputs: tuple | None = None
    notes: list[str] = field(default_factory=list)
    progress: Callable[..., Iterable] = no_progress


class Pass(abc.ABC):
    """Base of every pass. Subclasses are dataclasses whose fields are the pass options."""

    name: ClassVar[str] = ""
    preserves_numerics: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Transform ``gm`` (usually in place), reading and writing ``ctx``."""

    def spec(self) -> str:
        """This pass as pipeline text: ``name`` or ``name{opt=value,...}`` (non-default options)."""
        opts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if value != default:
                opts.append(f"{f.name.replace('_', '-')}={_format_value(value)}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipeline strings under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"two passes are named {cls.name!r}")
    _REGISTRY[cls.name] = dataclass(cls) if not dataclasses.is_dataclass(cls) else cls
    return _REGISTRY[cls.name]


def registered_passes() -> dict[str, type[Pass]]:
    import passes.builtin  # noqa: F401  (importing it registers every built-in pass)

    return dict(_REGISTRY)


# -- pipeline text --------------------------------------------------------------------------

def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ";".join(_format_value(x) for x in v) + "]"
    return str(v)


def _parse_value(text: str, annotation: Any, where: str) -> Any:
    ann = str(annotation)
    if ann.startswith(("list", "tuple")) or (text.startswith("[") and text.endswith("]")):
        inner = text[1:-1] if text.startswith("[") else text
        return tuple(x for x in inner.split(";") if x)
    if "bool" in ann:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"{where}: expected true/false, got {text!r}")
    if "int" in ann and "float" not in ann:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{where}: expected an integer, got {text!r}") from None
    if "float" in ann:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{where}: expected a number, got {text!r}") from None
    return text


_ITEM = re.compile(r"\s*([a-z0-9][a-z0-9-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``a,b{k=v,k2=v2},c`` into pass objects; unknown names or options are UserErrors."""
    known = registered_passes()
    result: list[Pass] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise UserError(f"cannot parse pipeline at character {pos}: {text[pos:pos + 30]!r}")
        name, body = m.group(1), m.group(2)
        if name not in known:
            raise UserError(f"unknown pass {name!r} in pipeline; known passes: {', '.join(sorted(known))}")
        cls = known[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for item in filter(None, (s.strip() for s in (body or "").split(","))):
            if "=" not in item:
                raise UserError(f"pass {name}: option {item!r} needs the form key=value")
            key, value = (s.strip() for s in item.split("=", 1))
            attr = key.replace("-", "_")
            if attr not in fields:
                raise UserError(f"pass {name} has no option {key!r}; options: {', '.join(f.replace('_', '-') for f in fields) or 'none'}")
            kwargs[attr] = _parse_value(value, fields[attr].type, f"pass {name} option {key}")
        result.append(cls(**kwargs))
        pos = m.end()
    return result


def format_pipeline(pipeline: Iterable[Pass]) -> str:
    return ",".join(p.spec() for p in pipeline)


# -- the manager -----------------------------------------------------------------------------

class Instrument(Protocol):
    """Observer of a pipeline run (dumps, timing). Called by the manager, never by passes."""

    def start(self, pipeline: str) -> None: ...

    def after_pass(self, index: int, pass_: Pass, result: PassResult, ctx: PassContext, record: dict) -> None: ...

    def finish(self, records: list[dict], ctx: PassContext, pipeline: str) -> None: ...

    # optional: ``failed(index, pass_, gm, ctx, records, error)`` when a pass raised or broke the graph


class PassManager:
    """Runs a pipeline on an fx GraphModule with verification, provenance and instruments."""

    def __init__(
        self,
        pipeline: str | list[Pass],
        *,
        stop_after: str | None = None,
        disabled: Iterable[str] = (),
        instruments: Iterable[Instrument] = (),
        fold_tolerance: float = 1e-5,
    ):
        self.pipeline = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        names = [p.name for p in self.pipeline]
        self.disabled = set(disabled)
        for n in [stop_after, *self.disabled]:
            if n is not None and n not in names:
                raise UserError(f"pass {n!r} is not in the pipeline {format_pipeline(self.pipeline)!r}")
        self.stop_after = stop_after
        self.instruments = list(instruments)
        self.fold_tolerance = fold_tolerance
        self.records: list[dict] = []

    def __str__(self) -> str:
        return format_pipeline(self.pipeline)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for node in gm.graph.nodes:
            node.meta.setdefault("created_by", "trace")
        done: list[str] = []
        self.records = []
        for inst in self.instruments:
            inst.start(str(self))
        for index, pass_ in enumerate(self.pipeline):
            record: dict[str, Any] = {"index": index, "name": pass_.name, "spec": pass_.spec()}
            if pass_.name in self.disabled:
                record.update(modified=False, skipped="disabled")
                self.records.append(record)
                continue
            before = set(gm.graph.nodes)
            reference = run_outputs(gm, ctx.probe_inputs) if ctx.probe_inputs is not None else None
            start = time.perf_counter()
            try:
                try:
                    result = pass_(gm, ctx)
                except UserError:
                    raise
                except Exception as e:  # add the pipeline position, keep the cause
                    where = failure_module(e.__traceback__)
                    raise PassError(f"pass {pass_.spec()!r} failed after {done or 'no passes'}"
                                    f"{f' at {where}' if where else ''}: {e}") from e
                if not isinstance(result, PassResult):
                    raise PassError(f"pass {pass_.name!r} returned {type(result).__name__}, not PassResult")
                gm = result.gm
                record.update(modified=result.modified, seconds=round(time.perf_counter() - start, 4), stats=result.stats)
                for node in gm.graph.nodes:
                    if node not in before:
                        node.meta.setdefault("created_by", pass_.name)
                self._verify(gm, pass_, reference, ctx, record, done)
            except (UserError, PassError) as e:  # the instruments keep what the user debugs with
                record.update(failed=str(e))
                self.records.append(record)
                for inst in self.instruments:
                    if hasattr(inst, "failed"):
                        inst.failed(index, pass_, gm, ctx, self.records, e)
                raise
            done.append(pass_.name)
            for inst in self.instruments:
                inst.after_pass(index, pass_, result, ctx, record)
            self.records.append(record)
            if pass_.name == self.stop_after:
                record["stopped_here"] = True
                break
        for inst in self.instruments:
            inst.finish(self.records, ctx, str(self))
        return gm

    def _verify(self, gm, pass_, reference, ctx, record, done) -> None:
        try:
            gm.graph.lint()
            for node in gm.graph.nodes:
                if node.op == "get_attr":
                    _resolve_attr(gm, node.target)
            gm.recompile()
        except Exception as e:
            raise PassError(f"pass {pass_.name!r} left an invalid graph (after {done or 'no passes'}): {e}") from e
        if reference is None:
            return
        new = run_outputs(gm, ctx.probe_inputs)
        if len(new) != len(reference):
            raise PassError(f"pass {pass_.name!r} changed the number of outputs ({len(reference)} -> {len(new)})")
        err = relative_error(reference, new)
        record["probe_rel_err"] = err
        record["probe_sqnr_db"] = min_sqnr_db(reference, new)
        if pass_.preserves_numerics and err > self.fold_tolerance:
            raise PassError(
                f"pass {pass_.name!r} must not change outputs but did: relative error {err:.3g} > {self.fold_tolerance:g}")


def node_module(node: fx.Node) -> str | None:
    """The module path an fx node belongs to: its quantization site, else its ``nn_module_stack``."""
    if node.meta.get("site"):
        return node.meta["site"]
    stack = node.meta.get("nn_module_stack") or {}
    return (list(stack.values())[-1][0] or None) if stack else None


def failure_module(tb) -> str | None:
    """``module <path> (node <name>)`` of the fx node the innermost frame of a traceback was handling
    (a pass's loop variable, ``fx.Interpreter``'s current node), if any frame holds one."""
    frames = [frame for frame, _ in traceback.walk_tb(tb)]
    for frame in reversed(frames):
        for value in list(frame.f_locals.values()):
            if isinstance(value, fx.Node) and (path := node_module(value)):
                return f"module {path} (node {value.name})"
    return None


def _resolve_attr(gm: torch.nn.Module, target: str):
    obj: Any = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"get_attr target {target!r} does not exist")
        obj = getattr(obj, part)
    return obj


def get_attr(gm: torch.nn.Module, target: str):
    """The parameter or buffer behind a dotted ``get_attr`` target."""
    return _resolve_attr(gm, target)


def set_buffer(gm: torch.nn.Module, target: str, value: torch.Tensor) -> str:
    """Register ``value`` as a buffer at a dotted path, creating empty parent modules as needed.

    Buffers live at the user's module path (``blocks.0.fc1.input_scale``) so that ONNX
    initializers, dumps and reports all carry that name.
    """
    *parents, leaf = target.split(".")
    mod = gm
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    mod.register_buffer(leaf, value)
    return target


def delete_attr(gm: torch.nn.Module, target: str) -> None:
    *parents, leaf = target.split(".")
    mod = gm
    for p in parents:
        mod = getattr(mod, p)
    delattr(mod, leaf)
