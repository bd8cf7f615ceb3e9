"""``python -m tools.compile [MODEL] --target onnx|ort|trt|torch|cuda|cuda-fp8 --out DIR``

Load a model, trace one step to an fx graph, run the recipe's pass pipeline and the target's
lowering passes (dumping after every pass that changed the graph), export the target's artefact
(ONNX with Q/DQ checked on onnxruntime against the torch fake-quant graph, a TensorRT engine, the
graph as data, or the graph on our GPU kernels), and write ``report.json`` + ``report.md``.
Everything is written to a temporary directory that becomes DIR only when the whole job succeeded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backends.registry import targets
from compiler.config import DEFAULT_MODEL, EditTaskConfig
from compiler.driver import Compiler
from compiler.generation import EDIT_TASKS, MNIST_INPUTS, parse_labels
from core.errors import UserError
from core.io import atomic_output_dir, check_output_dir, check_writable
from tools._cli import add_model_arguments, compile_config, main_wrapper, model_input_paths

# The shipped MNIST VAR is the newcomer's first run: with no other choice made, compile it for
# onnxruntime and score images from FP, the artefact and the baselines in the same run.
SHOWCASE = {"target": "ort", "evaluate": 100,
            "compare": "smoothquant:W8A8,minmax:W8A8,ptq4arvg:W6A6,smoothquant:W6A6,minmax:W6A6"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.compile", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--target", choices=list(targets()),
                   help=f"what to build (default: onnx; {SHOWCASE['target']} for the default model): "
                        + "; ".join(f"{t.name}: {t.summary}" for t in targets().values()))
    p.add_argument("--out", default="out", help="output directory (default: out)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--stop-after", metavar="PASS", help="stop the pipeline after this pass")
    p.add_argument("--disable-pass", metavar="PASS", action="append", default=[], help="skip this pass (repeatable)")
    p.add_argument("--evaluate", type=int, metavar="N",
                   help="family models: generate N images (classes in turn, one seed each) with FP and the compiled "
                        f"model and report fidelity, MNIST-FID and class accuracy (default: 0; {SHOWCASE['evaluate']} "
                        "for the default model)")
    p.add_argument("--compare", metavar="RECIPE:BITS,...",
                   help="with --evaluate: also score these recipes as torch fake-quant models from the same "
                        "calibration set; one that cannot quantize the model is a row with its error line "
                        "(default for the default model: "
                        f"{SHOWCASE['compare']})")
    edit = p.add_argument_group("zero-shot edits (VAR): score --evaluate N on a task instead of generation")
    edit.add_argument("--task", choices=tuple(EDIT_TASKS),
                      help="inpaint: regenerate the box; outpaint: keep only the box; edit: regenerate the box as each "
                           "--classes class; every model edits the same N inputs with the same seeds")
    edit.add_argument("--images", metavar="SRC", help=f"images to edit: an .npz, a folder of PNGs or {MNIST_INPUTS} "
                                                       f"(default: {MNIST_INPUTS}, the held-out MNIST digits)")
    edit.add_argument("--box", metavar="Y0,X0,Y1,X1", help="the edit box: fractions or integer pixels (default: the "
                                                           "centre half, 0.25,0.25,0.75,0.75)")
    edit.add_argument("--classes", help="--task edit: comma-separated target classes")
    p.add_argument("--no-site-sqnr", action="store_true",
                   help="skip the per-site SQNR of the report (one insert-qdq and one forward per site)")
    return p


def edit_task(args: argparse.Namespace) -> EditTaskConfig | None:
    if not args.task:
        for flag in ("images", "box", "classes"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag} needs --task inpaint|outpaint|edit")
        return None
    if not args.evaluate:
        raise UserError(f"--task {args.task} needs --evaluate N (the edits to score)")
    if args.classes is not None and args.task != "edit":
        raise UserError(f"--classes applies to --task edit; {args.task} is unconditional")
    if args.task == "edit" and not args.classes:
        raise UserError("--task edit needs --classes (the target classes)")
    defaults = EditTaskConfig(args.task)
    return EditTaskConfig(args.task, args.images or defaults.images, args.box or defaults.box,
                          parse_labels(args.classes) if args.classes else None)


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    showcase = args.model == DEFAULT_MODEL
    args.target = args.target or (SHOWCASE["target"] if showcase else "onnx")
    if args.evaluate is None:
        args.evaluate = SHOWCASE["evaluate"] if showcase else 0
    if args.compare is None and showcase and args.evaluate:
        args.compare = SHOWCASE["compare"]
    if args.compare and not args.evaluate:
        raise UserError("--compare needs --evaluate N (the images to score)")
    from compiler.quality import parse_compare

    config = compile_config(args, target=args.target, stop_after=args.stop_after, disabled=args.disable_pass,
                            site_sqnr=not args.no_site_sqnr, evaluate=args.evaluate,
                            compare=parse_compare(args.compare or ""), task=edit_task(args))  # typos fail before any work
    out, inputs = Path(args.out), model_input_paths(args)
    check_output_dir(out, force=args.force, inputs=inputs)  # before any work: nothing is lost or half-made
    check_writable(args.calib_cache, "--calib-cache", kind="cache")
    compiler = Compiler(config)
    with atomic_output_dir(out, force=args.force, inputs=inputs) as tmp:
        report = compiler.compile(tmp)
    fid = report["fidelity"]
    lines = [
        f"compiled {report['model']} -> {out}/ (recipe {report['recipe']}, {report['bits']})",
        f"  quantized tensors: {len(report['qparams'])}   output SQNR vs FP: {fid['min_sqnr_db']:.1f} dB",
    ]
    if "onnx" in report:
        o = report["onnx"]
        lint_ = o["tensorrt_lint"]
        lines.append(f"  ONNX: {o['QuantizeLinear']} Q / {o['DequantizeLinear']} DQ, onnxruntime vs torch max |diff| "
                     f"{o['ort_reference_max_abs_diff']:.2e} (SQNR {o['ort_reference_sqnr_db']:.0f} dB)")
        lines.append(f"  TensorRT Q/DQ lint: {sum(lint_['int8_gemms'].values())} int8 GEMMs, "
                     f"{len(lint_['violations'])} violations" + ("" if lint_["ok"] else f" (python -m tools.inspect {out}/model.onnx --lint)"))
    excluded = [n for n, site in report["sites"].items() if site["excluded_by"]]
    if excluded:
        lines.append(f"  kept in full precision: {len(excluded)} sites ({', '.join(excluded[:4])}{', ...' if len(excluded) > 4 else ''})")
    s = report["size_bytes"]
    lines.append(f"  size: {s['fp'] / 1e6:.2f} MB FP -> {s['quantized'] / 1e6:.2f} MB")
    if report.get("tensorrt", {}).get("built"):
        lines.append(f"  TensorRT: {out}/model.engine ({report['tensorrt']['sidecar']['tensorrt_version']}, "
                     f"{report['tensorrt']['sidecar']['gpu']['name']})")
    if "quality" in report:
        from compiler.quality import table_rows

        headers, rows = table_rows(report["quality"])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines += ["", f"image quality, {report['quality']['images']} images with the same seeds ({out}/report.md):"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [headers, *rows]]
        if "speed" in report["quality"]:
            sp = report["quality"]["speed"]
            lines.append(f"  onnxruntime int8 vs FP32 on one step: {sp['int8_speedup']:.2f}x")
    print("\n".join(lines))
    if "incomplete" in report:  # after the rename: what was built stays for another machine
        inc = report["incomplete"]
        raise UserError(f"{inc['reason']}; {inc['kept']} was kept at {out}/{inc['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
