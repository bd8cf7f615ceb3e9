"""``python -m tools.train_tiny --out DIR [--data DIR] [--seed S] [--only STAGE ...]``

Train the shipped MNIST models on the CPU (the logic is ``frontends.train_tiny``): each stage
writes its checkpoints in the official layouts, a samples grid and ``train_<stage>.json``
(losses, times, settings) into DIR. ``--out frontends/embedded`` reproduces the shipped files.
"""
from __future__ import annotations

import argparse
import sys

import torch

from core.io import check_writable
from core.progress import progress, say
from frontends import train_tiny
from tools._cli import main_wrapper


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.train_tiny", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the checkpoints (created if missing)")
    p.add_argument("--data", metavar="DIR", help="folder of the MNIST idx .gz files (default: data/mnist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", metavar="STAGE", help=f"stages to run, of {', '.join(train_tiny.STAGES)} (default: "
                                                               f"{', '.join(train_tiny.DEFAULT_STAGES)}; mar-head needs mar's files in --out)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_writable(args.out, "--out", kind="cache")  # written into, stage by stage: checked before training
    if args.threads:
        torch.set_num_threads(args.threads)
    logs = train_tiny.run(args.out, data_root=args.data, seed=args.seed, only=args.only, progress=progress)
    for name, log in logs.items():
        if name == "classifier":
            say(f"classifier: held-out accuracy {log['heldout_accuracy']:.1%}, {log['seconds']:.0f} s")
            continue
        secs = sum(log["seconds"].values())
        if "head" in log:
            h = log["head"]
            say(f"{name}: head loss {h['loss']}, epsilon MSE at t=999 {h['first_step_mse']:.3g}, {secs:.0f} s")
            continue
        say(f"{name}: tokenizer loss {log['tokenizer']['loss']}, generator loss {log['generator']['loss']}, {secs:.0f} s")
    print(f"wrote {', '.join(f for name in logs for f in train_tiny.written_files(name))} to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
