"""``python -m tools.evaluate REF.npz SAMPLE.npz [--features mnist|inception] [--json OUT]``

Compare generated images (SAMPLE) with a reference set (REF): FID, Inception Score and
precision/recall (k=3) in the chosen feature space; for MNIST-size images also MNIST-FID against
the shipped held-out statistics and the class accuracy of the requested labels; and when both
files come from the same classes and seeds (FP vs quantized from ``tools.generate``), fidelity:
PSNR, SSIM, token agreement (``tokens.pt`` beside the npz) and logit KL (``logits`` in the npz).
Files use the evaluator layout that ``tools.generate`` writes: ``arr_0`` uint8 [N, H, W, 3],
``arr_1`` labels.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from core.errors import UserError
from core.io import atomic_write_bytes, check_writable
from core.progress import progress, say
from evaluation.images import evaluate, load_samples
from tools._cli import main_wrapper

ROWS = [  # key, label, format
    ("fid", "FID", "{:.3f}"), ("is", "IS", "{:.3f}"), ("is_ref", "IS (reference)", "{:.3f}"),
    ("precision", "precision (k=3)", "{:.4f}"), ("recall", "recall (k=3)", "{:.4f}"),
    ("mnist_fid", "MNIST-FID (held-out digits)", "{:.3f}"), ("mnist_fid_ref", "MNIST-FID of REF", "{:.3f}"),
    ("mnist_is", "MNIST-IS", "{:.3f}"), ("class_accuracy", "class accuracy", "{:.4f}"),
    ("psnr_db", "PSNR vs REF (dB)", "{:.2f}"), ("ssim", "SSIM vs REF", "{:.4f}"),
    ("token_agreement", "token agreement", "{:.4f}"), ("logit_kl", "logit KL (nats)", "{:.5f}"),
]


def table(results: dict) -> str:
    head = (f"features: {results['features']}  REF {results['count_ref']} images, "
            f"SAMPLE {results['count_sample']} images")
    lines = [head, "", "| metric | value |", "|---|---|"]
    for key, label, fmt in ROWS:
        if key not in results:
            continue
        v = results[key]
        lines.append(f"| {label} | {'n/a' if v is None else ('inf' if math.isinf(v) else fmt.format(v))} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", metavar="REF.npz", help="reference images (real data, or the FP generation)")
    p.add_argument("sample", metavar="SAMPLE.npz", help="generated images to evaluate")
    p.add_argument("--features", choices=("auto", "mnist", "inception"), default="auto",
                   help="feature network for FID/IS/precision/recall (auto: mnist for 28/32 px images, else inception)")
    p.add_argument("--inception", metavar="PATH",
                   help="TorchScript FID Inception network (default: the one of pip install 'arvg-quant[fid]')")
    p.add_argument("--mnist", action=argparse.BooleanOptionalAction, default=None,
                   help="MNIST-FID and class accuracy (default: when the images are 28 or 32 px square)")
    p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=None,
                   help="fidelity of SAMPLE to REF image by image (default: when both hold the same labels)")
    p.add_argument("--batch", type=int, default=250, metavar="N", help="images per feature batch")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON (atomically)")
    return p


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    if args.json:  # before any work
        check_writable(args.json, "--json", kind="file")
        if any(Path(args.json).resolve() == Path(p).resolve() for p in (args.ref, args.sample)):
            raise UserError(f"--json {args.json} is an input of this run; write the results elsewhere")
    ref, sample = load_samples(args.ref), load_samples(args.sample)
    say(f"evaluating {len(sample.images)} images of {args.sample} against {len(ref.images)} of {args.ref}")
    results = evaluate(ref, sample, features=args.features, inception=args.inception, mnist=args.mnist,
                       paired=args.paired, batch=args.batch, progress=progress)
    results = {"ref": args.ref, "sample": args.sample, **results}
    if args.json:
        # strict JSON: PSNR of identical images is +inf, written as the string "inf"
        safe = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in results.items()}
        atomic_write_bytes(args.json, (json.dumps(safe, indent=1, allow_nan=False) + "\n").encode())
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
