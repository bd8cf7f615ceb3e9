"""Per-pass dumps: the record of what each pass did, for people and for tools.

After every pass that changed the graph, ``DumpInstrument`` writes ``NNN_<pass>.txt`` (the
graph as Python code, the quantization parameters by site, and which pass created each
node) and ``NNN_<pass>.json`` (the same, machine-readable). ``manifest.json`` lists the whole
run. Dumps are written to the directory the tool gives; passes never write them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.fx as fx

from passes.infra import Pass, PassContext, PassResult

SCHEMA_VERSION = 1


def _fmt_target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", None) or str(t)
    mod = getattr(t, "__module__", "") or ""
    if "torch._ops" in type(t).__module__ or str(t).startswith(("arvgq.", "aten.")):
        return f"torch.ops.{t}"
    return f"{mod}.{name}" if mod and not mod.startswith("builtins") else name


def node_table(gm: fx.GraphModule) -> list[dict]:
    rows = []
    for n in gm.graph.nodes:
        rows.append({
            "name": n.name,
            "op": n.op,
            "target": _fmt_target(n),
            "args": [str(a) for a in n.args],
            "site": n.meta.get("site"),
            "created_by": n.meta.get("created_by", "?"),
        })
    return rows


def qparam_table(ctx: PassContext) -> dict[str, dict]:
    return {key: qp.describe() for key, qp in sorted(ctx.qparams.items())}


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(none)\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]) + "\n"


def render_text(index: int, pass_: Pass, result: PassResult, ctx: PassContext, record: dict, pipeline: str) -> str:
    gm = result.gm
    out = [f"# {index:03d} {pass_.spec()}", f"# pipeline: {pipeline}"]
    if result.stats:
        out.append("# stats: " + ", ".join(f"{k}={v}" for k, v in result.stats.items() if not isinstance(v, (dict, list))))
    if "probe_rel_err" in record:
        out.append(f"# probe vs previous graph: rel err {record['probe_rel_err']:.3g}, SQNR {record['probe_sqnr_db']:.1f} dB")
    out += ["", "## code", gm.code.strip(), "", "## quantization parameters (by site)"]
    qrows = []
    for key, d in qparam_table(ctx).items():
        qrows.append([key, d["granularity"], str(d["bits"]), "sym" if d["symmetric"] else "asym",
                      "-" if d["axis"] is None else str(d["axis"]), str(d["n_scales"]),
                      f"{d['scale_min']:.4g}..{d['scale_max']:.4g}", f"{d['zero_point_min']}..{d['zero_point_max']}"])
    out.append(_text_table(["tensor", "granularity", "bits", "mode", "axis", "n", "scale", "zero point"], qrows))
    out.append("## nodes (provenance)")
    nrows = [[r["name"], r["op"], r["target"], r["site"] or "", r["created_by"]] for r in node_table(gm)]
    out.append(_text_table(["node", "op", "target", "site", "created by"], nrows))
    if ctx.notes:
        out.append("## notes")
        out += [f"- {n}" for n in ctx.notes]
    return "\n".join(out) + "\n"


class DumpInstrument:
    """Writes the dumps of a pipeline run into ``directory`` (created if missing)."""

    def __init__(self, directory: str | Path, *, all_passes: bool = False):
        self.dir = Path(directory)
        self.all_passes = all_passes
        self.files: dict[int, str] = {}
        self._pipeline = ""

    def after_pass(self, index: int, pass_: Pass, result: PassResult, ctx: PassContext, record: dict) -> None:
        if not (result.modified or self.all_passes):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = f"{index:03d}_{pass_.name}"
        text = render_text(index, pass_, result, ctx, record, self._pipeline or "")
        (self.dir / f"{stem}.txt").write_text(text)
        doc = {
            "schema": SCHEMA_VERSION,
            "index": index,
            "pass": pass_.name,
            "spec": pass_.spec(),
            "modified": result.modified,
            "stats": result.stats,
            "verification": {k: record[k] for k in ("probe_rel_err", "probe_sqnr_db") if k in record},
            "graph_sha256": hashlib.sha256(result.gm.code.encode()).hexdigest(),
            "code": result.gm.code,
            "qparams": qparam_table(ctx),
            "nodes": node_table(result.gm),
        }
        (self.dir / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
        self.files[index] = stem
        record["dump"] = stem

    def start(self, pipeline: str) -> None:
        self._pipeline = pipeline

    def finish(self, records: list[dict], ctx: PassContext, pipeline: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = {"schema": SCHEMA_VERSION, "pipeline": pipeline, "passes": records, "notes": ctx.notes}
        (self.dir / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))

    def failed(self, index: int, pass_: Pass, gm: fx.GraphModule, ctx: PassContext, records: list[dict],
               error: Exception) -> None:
        """``NNN_<pass>.failed.txt``: the error and the graph as the failing pass left it (as MLIR prints
        the IR after a failure), and the manifest of the passes so far."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            code = gm.graph.python_code("self").src.strip()
        except Exception as e:  # noqa: BLE001  (a broken graph may not print; say so instead)
            code = f"(the graph cannot be printed: {type(e).__name__}: {e})"
        text = [f"# {index:03d} {pass_.spec()} FAILED", f"# pipeline: {self._pipeline}", f"# error: {error}", "",
                "## code (as the pass left it)", code]
        (self.dir / f"{index:03d}_{pass_.name}.failed.txt").write_text("\n".join(text) + "\n")
        self.finish(records, ctx, self._pipeline)
