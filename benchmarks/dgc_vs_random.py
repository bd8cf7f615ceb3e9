"""DGC-selected vs randomly selected calibration sets of the same size (PTQ4ARVG §5, issue 20).

For each model and calibration seed, the FP model generates the candidate set once (``--keep K``
images with CFG: 2K sequences, cached). Then the ``ptq4arvg`` pipeline is calibrated on

* ``all``: every one of the 2K sequences (no selection, twice the size of the others);
* ``reference``: DGC as PTQ4ARVG's code (K kept: sets the cond:uncond ratio, keeps the first);
* ``ranked``: DGC with Ledoit-Wolf distances (the K farthest from their own set);
* ``random``: K of the 2K sequences drawn uniformly (``--random-draws`` seeded draws, averaged);
* ``random-balanced``: K/2 conditional and K/2 unconditional sequences drawn at random (what the
  reference keeps when its distances tie, N < D, but without taking the first ones);

and each quantized graph (torch fake-quant, as the compile's ``--compare`` rows) draws the same
``--evaluate N`` images as the FP model (``compiler.quality``: classes in turn, one seed per
image, the calibration seed), scored for token agreement with FP and MNIST class accuracy.

    python -m benchmarks.dgc_vs_random --models builtin:mnist-var,builtin:mnist-gpt --keep 8 \\
        --seeds 0,1,2 --evaluate 50 --random-draws 3 --json benchmarks/dgc_vs_random.json

Those are the defaults (about 20 minutes on a shared 2-core CPU, one thread). Results are written
after every arm, and a rerun skips the arms already in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ARMS = ("all", "reference", "ranked", "random", "random-balanced")


def _random_subset(compiler, keep: int, seed: int, draw: int, balanced: bool):
    """``keep`` of the 2N captured sequences at random (``balanced``: half of each kind), as DGC's lazily
    sliced steps."""
    from calib.capture import SelectedSteps, _chunks, batch_dims
    from compiler.driver import Calibration

    full = compiler.calibrate()  # dgc none: every captured step, all rows
    steps, sizes = full.inputs, []
    for start, _ in _chunks(steps):
        rows = steps[start][batch_dims(compiler.bundle.input_names).index(0)].shape[0]
        sizes.append(rows // 2)
    n = sum(sizes)
    g = torch.Generator().manual_seed(10_000 * seed + draw)
    if balanced:
        kept = torch.cat([torch.randperm(n, generator=g)[:keep // 2], n + torch.randperm(n, generator=g)[:keep - keep // 2]])
    else:
        kept = torch.randperm(2 * n, generator=g)[:keep]
    cond, uncond = kept[kept < n].sort().values, (kept[kept >= n] - n).sort().values
    rows, offset = [], 0
    for b in sizes:
        c = cond[(cond >= offset) & (cond < offset + b)] - offset
        u = uncond[(uncond >= offset) & (uncond < offset + b)] - offset
        rows.append(torch.cat([c, u + b]).long())
        offset += b
    selected = SelectedSteps(steps, batch_dims(compiler.bundle.input_names), rows)
    summary = {"method": "random-balanced" if balanced else "random", "kept_cond": len(cond), "kept_uncond": len(uncond),
               "cond": cond.tolist(), "uncond": uncond.tolist()}
    return Calibration(selected, f"{full.source}, random {keep}", {"dgc": summary, "rows": selected.rows})


def run_arm(model: str, arm: str, keep: int, seed: int, cache: str, draw: int = 0):
    """(fake-quant step graph, calibration summary, seconds to calibrate and quantize)."""
    from compiler.config import CalibrationConfig, CompileConfig
    from compiler.driver import Compiler
    from core.progress import no_progress

    dgc = {"all": "none", "random": "none", "random-balanced": "none"}.get(arm, arm)
    config = CompileConfig(model=model, recipe="ptq4arvg", target="torch", site_sqnr=False,
                           calibration=CalibrationConfig(samples=keep, seed=seed, cache=cache, dgc=dgc))
    compiler = Compiler(config, say=lambda msg: None, progress=no_progress)
    t0 = time.perf_counter()
    if arm.startswith("random"):
        fixed = _random_subset(compiler, keep, seed, draw, balanced=arm == "random-balanced")
        compiler.calibrate = lambda: fixed  # the same observers and passes, on the random subset
    calibration = compiler.calibrate()
    gm = compiler.quantize(lowering=False, reduce_range=False, device="cpu").gm
    d = calibration.extra.get("dgc", {})
    summary = {"rows": calibration.extra.get("rows") or sum(inputs[0].shape[0] for inputs in calibration.inputs),
               "kept_cond": d.get("kept_cond"), "kept_uncond": d.get("kept_uncond")}
    return compiler.bundle, gm, summary, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="builtin:mnist-var,builtin:mnist-gpt")
    p.add_argument("--keep", type=int, default=8, help="kept sequences (the DGC and random sets; 'all' has 2x)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--evaluate", type=int, default=50)
    p.add_argument("--random-draws", type=int, default=3, help="random subsets per seed (averaged)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--cache", default=".arvgq-cache")
    p.add_argument("--json", default="benchmarks/dgc_vs_random.json")
    args = p.parse_args(argv)
    os.environ.setdefault("ARVGQ_NO_PROGRESS", "1")
    torch.set_num_threads(1)  # a shared 2-core machine
    from compiler import quality

    path = Path(args.json)
    result = json.loads(path.read_text()) if path.exists() else {}
    result["settings"] = {"keep": args.keep, "evaluate": args.evaluate, "recipe": "ptq4arvg W8A8",
                          "runs_on": "torch fake-quant", "command": " ".join(["python -m benchmarks.dgc_vs_random", *sys.argv[1:]])}
    runs = result.setdefault("runs", {})
    arms = [a for a in args.arms.split(",") if a]
    for model in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            fp = None
            for arm in arms:
                for draw in range(args.random_draws if arm.startswith("random") else 1):
                    key = f"{model}|seed={seed}|{arm}" + (f"|draw={draw}" if arm.startswith("random") else "")
                    if key in runs:
                        continue
                    bundle, gm, summary, quant_s = run_arm(model, arm, args.keep, seed, args.cache, draw)
                    labels = quality.fixed_labels(bundle.extra["model"].config.num_classes, args.evaluate)
                    if fp is None:
                        fp = quality.draw(bundle, None, labels, seed, "FP")
                        runs[f"{model}|seed={seed}|FP"] = quality.score(fp, fp)
                    t0 = time.perf_counter()
                    metrics = quality.score(fp, quality.draw(bundle, gm, labels, seed, arm))
                    runs[key] = {**metrics, **summary, "quantize_s": quant_s, "generate_s": time.perf_counter() - t0}
                    print(f"{key}: tokens = FP {metrics['token_agreement']:.1%}, class accuracy "
                          f"{metrics.get('class_accuracy', float('nan')):.1%} ({summary})", flush=True)
                    result["summary"] = summarize(runs)
                    path.write_text(json.dumps(result, indent=1) + "\n")
    result["summary"] = summarize(runs)
    path.write_text(json.dumps(result, indent=1) + "\n")
    for line in table(result["summary"]):
        print(line)
    return 0


def summarize(runs: dict) -> dict:
    """Per model and arm: per seed (random arms: the mean of their draws) and overall means of token
    agreement and class accuracy, and the mean paired difference to ``random`` (same seed)."""
    grouped: dict = {}
    for key, r in runs.items():
        model, seed, arm = key.split("|")[:3]
        if arm != "FP":
            grouped.setdefault(model, {}).setdefault(arm, {}).setdefault(int(seed.split("=")[1]), []).append(r)
    out: dict = {}
    for model, arms in grouped.items():
        for arm, seeds in arms.items():
            s = out.setdefault(model, {}).setdefault(arm, {"seeds": sorted(seeds)})
            for k in ("token_agreement", "class_accuracy"):
                s[k] = [statistics.fmean(r[k] for r in seeds[i]) for i in s["seeds"]]
                s[f"{k}_mean"] = statistics.fmean(s[k])
            s["draws_per_seed"] = [len(seeds[i]) for i in s["seeds"]]
        base = out[model].get("random")
        for s in out[model].values():
            if base is not None and s is not base and s["seeds"] == base["seeds"]:
                for k in ("token_agreement", "class_accuracy"):
                    s[f"{k}_vs_random"] = statistics.fmean(a - b for a, b in zip(s[k], base[k]))
    return out


def table(summary: dict) -> list[str]:
    lines = ["| model | calibration set | tokens = FP, mean (per seed) | vs random | class accuracy, mean (per seed) | vs random |",
             "|---|---|---|---|---|---|"]
    for model, arms in summary.items():
        for arm, s in arms.items():
            tok = " / ".join(f"{v:.1%}" for v in s["token_agreement"])
            acc = " / ".join(f"{v:.1%}" for v in s["class_accuracy"])
            dt, da = s.get("token_agreement_vs_random"), s.get("class_accuracy_vs_random")
            lines.append(f"| {model} | {arm} | {s['token_agreement_mean']:.1%} ({tok}) | "
                         f"{'—' if dt is None else f'{100 * dt:+.1f} pt'} | {s['class_accuracy_mean']:.1%} ({acc}) | "
                         f"{'—' if da is None else f'{100 * da:+.1f} pt'} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
