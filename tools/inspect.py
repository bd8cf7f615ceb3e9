"""``python -m tools.inspect PATH``: look inside compiled artefacts.

* ``model.onnx --lint``: check TensorRT's Q/DQ rules; list int8 GEMMs by module (exit 1 on violations).
* ``DIR/dumps``: list the passes; ``--pass N|NAME`` prints one dump, ``--diff A B`` diffs two
  passes' graphs, ``--qparams`` lists quantization parameters by site.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from core.errors import UserError
from tools._cli import main_wrapper


def _dump_dir(path: Path) -> Path:
    for cand in (path, path / "dumps"):
        if (cand / "manifest.json").is_file():
            return cand
    raise UserError(f"{path} is neither an .onnx file nor a dump directory (no manifest.json)")


def _find_dump(d: Path, key: str) -> Path:
    stems = sorted(p.stem for p in d.glob("[0-9][0-9][0-9]_*.json"))
    match = [s for s in stems if s == key or s.split("_", 1)[1] == key or s.split("_", 1)[0] == key.zfill(3)]
    if not match:
        raise UserError(f"no dump for pass {key!r} in {d}; dumps: {', '.join(stems) or 'none'}")
    return d / f"{match[-1]}.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.inspect", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("path", help="an .onnx file or a compile output / dump directory")
    p.add_argument("--lint", action="store_true", help="check TensorRT's explicit-quantization rules (ONNX)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--pass", dest="pass_", metavar="N|NAME", help="print this pass's dump")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="diff the graphs of two passes")
    p.add_argument("--qparams", action="store_true", help="list quantization parameters by site (last dump)")
    return p


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = Path(args.path)
    if not path.exists():
        raise UserError(f"not found: {path}")
    if path.suffix == ".onnx":
        from backends.qdq_lint import lint

        try:
            rep = lint(path)
        except Exception as e:
            raise UserError(f"cannot read {path} as ONNX: {type(e).__name__}") from e
        if args.json:
            print(json.dumps({"ok": rep.ok, "quantized_gemms": rep.quantized_gemms, "float_gemms": rep.float_gemms,
                              "violations": [vars(v) for v in rep.violations]}, indent=1))
        else:
            print(rep.summary())
        return 0 if rep.ok or not args.lint else 1
    d = _dump_dir(path)
    if args.pass_:
        print(_find_dump(d, args.pass_).with_suffix(".txt").read_text())
    elif args.diff:
        a, b = (json.loads(_find_dump(d, k).read_text()) for k in args.diff)
        sys.stdout.writelines(difflib.unified_diff(a["code"].splitlines(True), b["code"].splitlines(True),
                                                   f"{a['index']:03d}_{a['pass']}", f"{b['index']:03d}_{b['pass']}"))
    elif args.qparams:
        last = sorted(d.glob("[0-9][0-9][0-9]_*.json"))[-1]
        q = json.loads(last.read_text())["qparams"]
        if args.json:
            print(json.dumps(q, indent=1))
        for key, v in q.items():
            print(f"{key:40s} {v['granularity']:8s} {v['bits']}b {'sym ' if v['symmetric'] else 'asym'} "
                  f"n={v['n_scales']:<5d} scale {v['scale_min']:.4g}..{v['scale_max']:.4g}")
    else:
        manifest = json.loads((d / "manifest.json").read_text())
        print(f"pipeline: {manifest['pipeline']}")
        for p in manifest["passes"]:
            state = "skipped" if p.get("skipped") else ("changed" if p.get("modified") else "unchanged")
            print(f"  {p['index']:03d} {p['spec']:40s} {state:9s} {p.get('dump', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
