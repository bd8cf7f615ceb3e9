"""Every recipe at every bit setting on one shipped model, from ``tools.compile --compare`` runs (issue 19).

One ``tools.compile`` run per bit setting: ``ptq4arvg`` compiled at those bits (``--target torch``), and
every other built-in recipe at the same bits as a ``--compare`` row, so all rows share one calibration set
(DGC's 8 of 16 sequences, as ``ptq4arvg`` selects them) and score the same ``--evaluate N`` images (classes
in turn, one seed each) against the FP model: token agreement, PSNR, MNIST-FID, class accuracy. A recipe
that cannot quantize the model at those bits is a row holding the tool's error line.

    python -m benchmarks.recipes_table builtin:mnist-var --evaluate 100 --work cmp --json benchmarks/recipes_mnist_var.json
    python -m benchmarks.recipes_table builtin:mnist-gpt --evaluate 100 --work cmp --json benchmarks/recipes_mnist_gpt.json

A run whose ``WORK/<model>_<bits>/report.json`` exists is not repeated. The JSON holds, per bit setting,
the run's command and its ``quality`` rows; the script prints the README's markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from passes.recipes import builtin_recipes

BITS = ("W8A8", "W6A6", "W4A8", "W4A4")
MAIN = "ptq4arvg"


def command(model: str, bits: str, evaluate: int, out: Path) -> list[str]:
    compare = ",".join(f"{r}:{bits}" for r in builtin_recipes() if r != MAIN)
    return [model, "--recipe", MAIN, "--bits", bits, "--target", "torch", "--evaluate", str(evaluate),
            "--no-site-sqnr", "--compare", compare, "--out", str(out), "--force"]


def cell(row: dict) -> str:
    if "error" in row:
        return f"error: {row['error'].split(';')[0]}"
    return (f"{row['token_agreement']:.1%} / {row['psnr_db']:.1f} dB / {row['mnist_fid']:.1f} / "
            f"{row['class_accuracy']:.0%}")


def table(result: dict) -> list[str]:
    runs = result["runs"]
    bits = [b for b in BITS if b in runs]
    recipes = [MAIN] + [r for r in builtin_recipes() if r != MAIN]
    fp = runs[bits[0]]["rows"][0]
    lines = [f"FP: MNIST-FID {fp['mnist_fid']:.1f}, class accuracy {fp['class_accuracy']:.0%} "
             f"({result['images']} images)", "",
             "| recipe | " + " | ".join(bits) + " |", "|---|" + "---|" * len(bits)]
    for r in recipes:
        cells = []
        for b in bits:
            row = next((x for x in runs[b]["rows"][1:] if x["recipe"] == r), None)
            cells.append("—" if row is None else cell(row))
        lines.append(f"| `{r}` | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--bits", default=",".join(BITS))
    p.add_argument("--evaluate", type=int, default=100)
    p.add_argument("--work", default="cmp", help="where the compile runs write their output directories")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("ARVGQ_NO_PROGRESS", "1")
    from tools.compile import main as compile_main

    tag = args.model.split(":")[-1].replace("/", "_")
    result = {"model": args.model, "images": args.evaluate, "compiled": MAIN,
              "command": " ".join(["python -m benchmarks.recipes_table", *(argv if argv is not None else sys.argv[1:])]),
              "runs": {}}
    for bits in args.bits.split(","):
        out = Path(args.work) / f"{tag}_{bits}"
        cmd = command(args.model, bits, args.evaluate, out)
        if not (out / "report.json").exists() and compile_main(cmd) != 0:
            return 2
        report = json.loads((out / "report.json").read_text())
        rows = report["quality"]["rows"]
        ran = command(args.model, bits, args.evaluate, out)  # the compare list in the order the rows ran
        ran[ran.index("--compare") + 1] = ",".join(f"{r['recipe']}:{r['bits']}" for r in rows[2:])
        result["runs"][bits] = {"command": "python -m tools.compile " + " ".join(ran),
                                "calibration": report["calibration"], "rows": rows}
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    for line in table(result):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
