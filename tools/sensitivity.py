"""``python -m tools.sensitivity [MODEL] [compile's model options] --out FILE``

Compile once, then quantize one site at a time (and every site but one) with the compile's
own calibration and decisions, rank the sites by the model's output SQNR against FP, print
the ranking and write the worst sites as an exclusion list that ``tools.compile
--exclude-file FILE`` accepts (module paths, one per line).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from calib.device import default_device, inputs_to
from compiler.driver import Compiler
from core.errors import UserError
from core.io import atomic_write_text, check_writable
from core.progress import progress, say
from passes.analysis import PreQDQSnapshot, rank_sites, site_sqnr
from tools._cli import add_model_arguments, compile_config, main_wrapper, model_input_paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.sensitivity", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE", help="exclusion list to write (for tools.compile --exclude-file)")
    p.add_argument("--top", type=int, default=3, metavar="K", help="write the K worst sites (default 3)")
    p.add_argument("--threshold", type=float, metavar="DB",
                   help="write instead every site whose SQNR alone is below DB dB")
    p.add_argument("--batches", type=int, default=4, metavar="N",
                   help="calibration batches the output error is measured on, with the example inputs (default 4)")
    p.add_argument("--no-all-but-one", action="store_true", help="skip the all-but-one column (halves the time)")
    return p


def chosen(ranking: list[str], sensitivity: dict, top: int, threshold: float | None) -> list[str]:
    if threshold is not None:
        return [s for s in ranking if sensitivity[s]["only"] < threshold]
    return ranking[:top]


def write_list(path: Path, sites: list[str], sensitivity: dict, header: str) -> None:
    lines = [f"# {header}", "# site  (SQNR with only it quantized / with all but it, dB)"]
    lines += [f"{s}  # {sensitivity[s]['only']:.1f} / {sensitivity[s].get('all_but', float('nan')):.1f}" for s in sites]
    atomic_write_text(path, "\n".join(lines) + "\n")


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top < 1 or args.batches < 0:
        raise UserError("--top must be at least 1 and --batches at least 0")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise UserError(f"--threshold must be a finite number of dB, got {args.threshold}")
    out = check_writable(args.out, "--out", kind="file")  # before any work
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    if any(Path(p).resolve() == out.resolve() for p in model_input_paths(args)):
        raise UserError(f"--out {out} is an input of this run; write the exclusion list elsewhere")
    check_writable(args.calib_cache, "--calib-cache", kind="cache")
    compiler = Compiler(compile_config(args, target="torch"))
    device = compiler.device
    say(f"loading {args.model}")
    bundle, recipe, pipeline, bits = compiler.load(), compiler.recipe, compiler.pipeline, compiler.bits
    compiler.exclusions()
    calib = compiler.calibrate().inputs
    snapshot = PreQDQSnapshot()
    fp_gm, _, ctx, _ = compiler.quantize(instruments=[snapshot])
    if snapshot.gm is None:
        raise UserError(f"the pipeline {pipeline!r} has no 'insert-qdq': nothing is quantized")
    batches = [inputs_to(b, device) for b in [bundle.example_inputs, *(calib[i] for i in range(min(len(calib), args.batches)))]]
    with default_device(device):
        sens = site_sqnr(fp_gm, snapshot.gm, ctx, batches, all_but_one=not args.no_all_but_one, progress=progress)
    if not sens:
        raise UserError("no site is quantized by this recipe and these exclusions")
    ranking = rank_sites(sens)
    width = max(len(s) for s in ranking)
    print(f"{'rank':>4}  {'site':<{width}}  {'alone (dB)':>10}  {'all but it (dB)':>15}")
    for i, s in enumerate(ranking, 1):
        all_but = f"{sens[s]['all_but']:.1f}" if "all_but" in sens[s] else "-"
        print(f"{i:>4}  {s:<{width}}  {sens[s]['only']:>10.1f}  {all_but:>15}")
    picked = chosen(ranking, sens, args.top, args.threshold)
    write_list(out, picked, sens, f"tools.sensitivity {args.model} (recipe {recipe.name}, {bits}): "
                                  f"{len(picked)} most sensitive of {len(ranking)} sites")
    say(f"wrote {len(picked)} sites to {out} (tools.compile --exclude-file {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
