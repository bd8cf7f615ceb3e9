"""``python -m tools.generate CKPT --tokenizer TOK [--onnx F | --quantized DIR | --engine F] --classes 0,1,2,3 --out DIR``
(or ``python -m tools.generate builtin:mnist-var --out DIR``: a shipped model carries its tokenizer)

Sample images with the family's own driver (its official CFG and sampling settings) and write
``DIR/grid.png``, ``DIR/<i>_class<c>.png``, ``DIR/samples.npz`` (``arr_0``: uint8 ``[N, H, W, 3]``,
``arr_1``: labels; the layout the guided-diffusion evaluator reads) and ``DIR/tokens.pt``.

The step runs in PyTorch (FP), as the fake-quant graph of a compile output directory
(``--quantized``), from an exported ONNX model on onnxruntime (``--onnx``) or from a TensorRT
engine (``--engine``). Image i always draws from its own generator, seeded by (seed, i): FP and
quantized images share their seeds, and no image depends on its batch or on the process that
made it. Images are made in batches saved to ``DIR.partial/``: an interrupted run resumes there,
and ``torchrun --nproc_per_node K -m tools.generate ...`` splits the batches over K processes
(one GPU each); rank 0 waits for the others' batches and writes DIR.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from compiler.generation import (
    BatchStore,
    decode_each,
    dist_env,
    fingerprint,
    pick_device,
    wait_for,
    write_outputs,
)
from core.errors import UserError
from core.io import atomic_output_dir, check_output_dir
from core.progress import progress, say
from frontends import load_model
from frontends.sampling import batch_seed, batches, shard
from tools._cli import main_wrapper


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="family checkpoint (VAR, LlamaGen, RAR, PAR), or builtin:mnist-var / builtin:mnist-gpt")
    p.add_argument("--tokenizer", metavar="CKPT",
                   help="the family's tokenizer checkpoint (decodes tokens); required for checkpoints")
    p.add_argument("--family", help="override detection from the checkpoint's keys")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--quantized", metavar="DIR",
                      help="run the fake-quant torch graph of this 'tools.compile --target torch' output "
                           "(a directory with only model.onnx runs that on onnxruntime reference mode)")
    step.add_argument("--onnx", metavar="FILE", help="run the step from this ONNX model on onnxruntime")
    step.add_argument("--engine", metavar="FILE", help="run the step from this TensorRT engine (needs TensorRT and a GPU)")
    p.add_argument("--ort-mode", choices=("reference", "fast"), default="reference",
                   help="onnxruntime: reference = Q/DQ kept as written (equals torch fake-quant), fast = fused int8")
    p.add_argument("--classes", default="0,1,2,3", help="comma-separated class labels (default: 0,1,2,3)")
    p.add_argument("--per-class", type=int, default=1, metavar="N", help="images per class label (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="image i draws from a generator seeded by (seed, i)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per batch (default: 16)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: GPU LOCAL_RANK when CUDA exists (CUDA draws other random streams than CPU)")
    p.add_argument("--out", required=True, help="output directory (batches go to OUT.partial until the end)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--max-batches", type=int, metavar="N",
                   help="stop after making N batches (run again to resume); for splitting a long job")
    p.add_argument("--merge", action="store_true",
                   help="make no images: write OUT from the batches in OUT.partial (after a sharded run)")
    p.add_argument("--wait", type=float, default=3600.0, metavar="S",
                   help="sharded runs: how long rank 0 waits for the other ranks' batches (default: 3600 s)")
    return p


def parse_labels(classes: str, per_class: int) -> list[int]:
    try:
        labels = [int(c) for c in classes.split(",")]
    except ValueError:
        raise UserError(f"--classes must be integers separated by commas, got {classes!r}") from None
    if per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {per_class}")
    return [c for c in labels for _ in range(per_class)]


def step_source(args: argparse.Namespace):
    """(target, artefact path) the step runs from, or None for the FP PyTorch step."""
    from backends import registry

    if args.engine:
        return registry.target("trt"), Path(args.engine)
    if args.onnx:
        return registry.target("onnx"), Path(args.onnx)
    if args.quantized:
        return registry.artefact_target(Path(args.quantized)), Path(args.quantized)
    return None


def make_step(args: argparse.Namespace, bundle, device: torch.device):
    """The step callable for the drivers (None: the FP PyTorch step) and a description."""
    source = step_source(args)
    if source is None:
        return None, "PyTorch FP"
    target, path = source
    return target.load_step(path, bundle, device, mode=args.ort_mode)


def check_inputs(args: argparse.Namespace) -> None:
    """Missing files and an unusable backend fail before any model is loaded."""
    for flag, path in (("model", args.model), ("--tokenizer", args.tokenizer), ("--onnx", args.onnx),
                       ("--engine", args.engine)):
        if path and ":" not in path.split("/")[0] and not Path(path).is_file():
            raise UserError(f"{flag} file not found: {path}")
    if args.quantized:
        q = Path(args.quantized)
        if not q.is_dir():
            raise UserError(f"--quantized directory not found: {q}")
        if not (q / "graph.json").is_file() and not (q / "model.onnx").is_file():
            raise UserError(f"{q} has neither graph.json (tools.compile --target torch) nor model.onnx")
    if args.engine:
        from backends.tensorrt import availability

        reason = availability()
        if reason is not None:
            raise UserError(f"--engine needs TensorRT and a GPU: {reason}")
    source = step_source(args)
    if source is not None and source[0].runs_on_for(source[1]) == "cuda" and not torch.cuda.is_available() \
            and not args.engine:
        raise UserError(f"{source[1]} runs on the {source[0].name} target, which needs a CUDA device")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")


def generate_batches(args, store: BatchStore, todo: list[tuple[int, range]], labels: list[int], local_rank: int) -> bool:
    """Make the batches ``todo`` into ``store``; False when --max-batches stopped it early."""
    bundle = load_model(args.model, family=args.family, tokenizer=args.tokenizer)
    if bundle.extra.get("tokenizer") is None or "generate" not in bundle.extra:
        raise UserError(f"{args.model} needs --tokenizer (the family's tokenizer checkpoint) to make images")
    n_classes = bundle.extra["model"].config.num_classes
    bad = sorted({c for c in labels if c >= n_classes or c < -1})
    if bad:
        raise UserError(f"class ids {bad} are out of range: the model has {n_classes} classes (0..{n_classes - 1}; -1 unconditional)")
    source = step_source(args)
    runs_on = "torch" if source is None else source[0].runs_on_for(source[1])
    device = pick_device("cuda" if runs_on == "cuda" else args.device, local_rank,  # CUDA runtimes return CUDA tensors
                         uses_torch=runs_on != "cpu")
    for part in ("model", "tokenizer"):
        bundle.extra[part].to(device)
    step, what = make_step(args, bundle, device)
    extra = {}  # a compiled second graph (MAR's diffusion head, a recipe's [head]) runs on onnxruntime
    if args.quantized and (Path(args.quantized) / "head.onnx").is_file() and "head" in bundle.extra:
        from backends.ort_runner import OrtStep

        extra["head"] = OrtStep(Path(args.quantized) / "head.onnx", args.ort_mode)
        what += " + head.onnx on onnxruntime"
    say(f"generating {len(todo)} batches with {what} ({bundle.family}, {device})")
    for made, (k, idx) in enumerate(progress(todo, desc="generating", unit="batch")):
        if args.max_batches is not None and made >= args.max_batches:
            return False
        with torch.no_grad():
            tokens = bundle.extra["generate"](torch.tensor(labels[idx.start: idx.stop]), batch_seed(args.seed, idx.start),
                                              step=step, **extra)
            images = decode_each(bundle.extra["tokenizer"], tokens)
        tokens = [t.cpu() for t in tokens] if isinstance(tokens, (list, tuple)) else tokens.cpu()
        store.save(k, tokens, images)
    return True


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    labels = parse_labels(args.classes, args.per_class)
    rank, world, local_rank = dist_env()
    out = Path(args.out)
    inputs = [p for p in (args.model, args.tokenizer, args.onnx, args.engine, args.quantized)
              if p and not p.startswith("builtin:")]
    check_output_dir(out, force=args.force, inputs=inputs)  # before any work: nothing is lost or half-made
    partial = out.with_name(out.name + ".partial")
    if args.merge and not partial.is_dir():
        raise UserError(f"--merge: {partial} not found (nothing was generated into {out})")
    check_inputs(args)
    settings = {"model": fingerprint(args.model if Path(args.model).is_file() else None) or args.model,
                "tokenizer": fingerprint(args.tokenizer), "family": args.family,
                "step": [k for k in ("quantized", "onnx", "engine") if getattr(args, k)],
                "step_file": fingerprint(args.onnx or args.engine) or args.quantized, "ort_mode": args.ort_mode,
                "labels": labels, "seed": args.seed, "batch_size": args.batch_size, "device": args.device}
    plan = batches(len(labels), args.batch_size)
    store = BatchStore(partial, settings, len(plan))
    if not args.merge:
        mine = shard(list(enumerate(plan)), rank, world)
        todo = [(k, idx) for k, idx in mine if not store.path(k).is_file()]
        if len(todo) < len(mine):
            say(f"resuming: {len(mine) - len(todo)} of {len(mine)} batches already in {partial}")
        if todo and not generate_batches(args, store, todo, labels, local_rank):
            say(f"stopped after {args.max_batches} batches (--max-batches); run the same command again to resume")
            return 0
        if rank != 0:
            say(f"rank {rank}: done; rank 0 writes {out}")
            return 0
        wait_for(store, args.wait if world > 1 else 0)
    elif store.missing():
        wait_for(store, 0)
    tokens, images = store.load_all()
    with atomic_output_dir(out, force=args.force, inputs=inputs) as tmp:
        write_outputs(tmp, tokens, images, labels)
    shutil.rmtree(partial)
    print(f"wrote {len(images)} images to {out}/ (grid.png, samples.npz, tokens.pt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
