"""``python -m tools.generate CKPT --tokenizer TOK [--onnx F | --quantized DIR | --engine F] --classes 0,1,2,3 --out DIR``
(or ``python -m tools.generate builtin:mnist-var --out DIR``: a shipped model carries its tokenizer;
text-to-image: ``python -m tools.generate infinity_2b_reg.pth --tokenizer infinity_vae_d32reg.pth
--text-encoder flan-t5-xl --prompt "a red fox" --out DIR``)

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

VAR models also edit images (``--task inpaint|outpaint|edit --images SRC --box Y0,X0,Y1,X1``),
the official zero-shot procedure; ``DIR/edit.npz``, ``edit.json`` and ``edit_grid.png`` add the
inputs, their reconstructions, the kept pixels and the scores. A quantized step also edits with
the FP model: ``edit_grid.png`` shows the two side by side and ``edit.json`` scores one against
the other where generated.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from compiler.generation import (
    EDIT_TASKS,
    MNIST_INPUTS,
    BatchStore,
    EditJob,
    decode_each,
    dist_env,
    edit_jobs,
    fingerprint,
    load_edit_images,
    parse_box,
    parse_labels,
    pick_device,
    to_unit_images,
    wait_for,
    write_edit_outputs,
    write_outputs,
)
from core.errors import UserError
from core.io import atomic_output_dir, check_output_dir
from core.progress import progress, say
from evaluation.images import edit_scores
from frontends import load_model
from frontends.sampling import batch_seed, batches, shard
from tools._cli import main_wrapper


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="family checkpoint (VAR, LlamaGen, RAR, PAR, MAR, Infinity), or builtin:mnist-var / builtin:mnist-gpt")
    p.add_argument("--tokenizer", metavar="CKPT",
                   help="the family's tokenizer checkpoint (decodes tokens); required for checkpoints")
    p.add_argument("--family", help="override detection from the checkpoint's keys")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--quantized", metavar="DIR",
                      help="run the step of this tools.compile output: --target torch (the fake-quant graph), "
                           "cuda/cuda-fp8 (our kernels; --device cuda), or a directory with model.onnx (onnxruntime)")
    step.add_argument("--onnx", metavar="FILE", help="run the step from this ONNX model on onnxruntime")
    step.add_argument("--engine", metavar="FILE", help="run the step from this TensorRT engine (needs TensorRT and a GPU)")
    p.add_argument("--ort-mode", choices=("reference", "fast"), default="reference",
                   help="onnxruntime: reference = Q/DQ kept as written (equals torch fake-quant), fast = fused int8")
    p.add_argument("--kv-cache", choices=("float", "int8"), default="float",
                   help="--quantized DIR of --target cuda/cuda-fp8 on a GPU: int8 keeps the KV caches as codes with "
                        "a scale per cached row (half their memory, not faster)")
    p.add_argument("--classes", help="comma-separated class labels (default: 0,1,2,3; with --task edit: the target classes)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="text-to-image families (Infinity): a prompt, instead of --classes (repeatable)")
    p.add_argument("--text-encoder", metavar="DIR", help="text-to-image families: a local T5 encoder directory")
    p.add_argument("--aspect-ratio", type=float, metavar="H/W",
                   help="text-to-image families: image height / width (the nearest official template; default 1)")
    p.add_argument("--per-class", type=int, default=1, metavar="N", help="images per class label or prompt (default: 1)")
    edit = p.add_argument_group("zero-shot edits (VAR)")
    edit.add_argument("--task", choices=tuple(EDIT_TASKS),
                      help="inpaint: regenerate the box; outpaint: keep only the box; edit: regenerate the box "
                           "as each --classes class (class-conditional editing)")
    edit.add_argument("--images", metavar="SRC",
                      help=f"images to edit: an .npz (arr_0 uint8 [N, H, W, 3], arr_1 labels), a folder of PNGs, "
                           f"or {MNIST_INPUTS} (the held-out MNIST digits)")
    edit.add_argument("--box", metavar="Y0,X0,Y1,X1", help="the edit box: fractions in [0, 1] or integer pixels")
    edit.add_argument("--max-images", type=int, metavar="N", help="edit only the first N input images")
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
    return target.load_step(path, bundle, device, step_options(args))


def step_options(args: argparse.Namespace):
    from backends.registry import StepOptions

    return StepOptions(ort_mode=args.ort_mode, kv_cache=args.kv_cache)


def head_fp_steps(quantized: Path) -> int:
    """The ``[head] fp_steps`` a compile wrote into ``report.json`` (0: every step on head.onnx)."""
    import json

    report = quantized / "report.json"
    if not report.is_file():
        return 0
    try:
        steps = json.loads(report.read_text()).get("head", {}).get("fp_steps", 0)
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{report} is not a report of tools.compile ({type(e).__name__}: {e})") from None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise UserError(f"{report}: head.fp_steps must be a whole number >= 0, got {steps!r}")
    return steps


def check_inputs(args: argparse.Namespace) -> None:
    """Missing files and an unusable backend fail before any model is loaded."""
    for flag, path in (("model", args.model), ("--tokenizer", args.tokenizer), ("--onnx", args.onnx),
                       ("--engine", args.engine)):
        if path and ":" not in path.split("/")[0] and not Path(path).is_file():
            raise UserError(f"{flag} file not found: {path}")
    if args.text_encoder and not Path(args.text_encoder).is_dir():
        raise UserError(f"--text-encoder directory not found: {args.text_encoder}")
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
    if args.kv_cache != "float" and (source is None or "kv_cache" not in source[0].step_options):
        raise UserError(f"--kv-cache {args.kv_cache} applies to --quantized DIR of tools.compile --target cuda or "
                        f"cuda-fp8, not to {'the FP model' if source is None else source[0].name + ' artefacts'}")
    if source is not None and source[0].runs_on_for(source[1]) == "cuda" and not torch.cuda.is_available() \
            and not args.engine:
        raise UserError(f"{source[1]} runs on the {source[0].name} target, which needs a CUDA device")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")


def plan_edit(args: argparse.Namespace) -> tuple[list[int], EditJob | None]:
    """The class of every output image, and the edit job (None for plain generation)."""
    if not args.task:
        for flag in ("images", "box", "max_images"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} needs --task inpaint|outpaint|edit")
        if args.prompt:  # text-to-image: the labels index the prompts
            return parse_labels(",".join(str(i) for i in range(len(args.prompt))), args.per_class), None
        return parse_labels(args.classes or "0,1,2,3", args.per_class), None
    if not args.images or not args.box:
        raise UserError(f"--task {args.task} needs --images and --box")
    images, own = load_edit_images(args.images, args.max_images)
    box = parse_box(args.box, *images.shape[1:3])
    classes = None if args.classes is None else parse_labels(args.classes, args.per_class)
    sources, labels, recorded = edit_jobs(args.task, len(images), classes, own, args.per_class)
    return labels, EditJob(args.task, box, images[sources], recorded)


def generate_batches(args, store: BatchStore, todo: list[tuple[int, range]], labels: list[int], local_rank: int,
                     job: EditJob | None = None) -> bool:
    """Make the batches ``todo`` into ``store``; False when --max-batches stopped it early."""
    bundle = load_model(args.model, family=args.family, tokenizer=args.tokenizer, text_encoder=args.text_encoder,
                        prompts=args.prompt or None, aspect_ratio=args.aspect_ratio)
    if bundle.extra.get("tokenizer") is None or "generate" not in bundle.extra:
        raise UserError(f"{args.model} needs --tokenizer (the family's tokenizer checkpoint) to make images")
    if job is not None and "edit" not in bundle.extra:
        raise UserError(f"--task {job.task}: zero-shot edits are implemented for VAR, not {bundle.family}")
    if job is not None:
        bundle.extra["edit_check"](job.inputs.shape[1:3], job.box, inpainting=EDIT_TASKS[job.task])
    if "prompts" in bundle.extra:  # text-to-image: the labels index the prompts
        if not args.prompt:
            raise UserError(f"{args.model} is a text-to-image model ({bundle.family}): pass --prompt TEXT")
    elif args.prompt or args.aspect_ratio:
        raise UserError(f"--prompt and --aspect-ratio: {args.model} is a class-conditional model ({bundle.family}); "
                        f"use --classes")
    else:
        n_classes = bundle.extra["model"].config.num_classes
        bad = sorted({c for c in labels if c >= n_classes or c < -1})
        if bad:
            raise UserError(f"class ids {bad} are out of range: the model has {n_classes} classes "
                            f"(0..{n_classes - 1}; -1 unconditional)")
    source = step_source(args)
    runs_on = "torch" if source is None else source[0].runs_on_for(source[1])
    device = pick_device("cuda" if runs_on == "cuda" else args.device, local_rank,  # CUDA runtimes return CUDA tensors
                         uses_torch=runs_on != "cpu")
    for part in ("model", "tokenizer"):
        bundle.extra[part].to(device)
    step, what = make_step(args, bundle, device)
    graphs = {}  # a compiled second graph (MAR's diffusion head, a recipe's [head]) runs on onnxruntime
    if args.quantized and (Path(args.quantized) / "head.onnx").is_file() and "head" in bundle.extra:
        from backends.ort_runner import OrtStep

        from frontends.mar import head_with_fp_steps

        fp_steps = head_fp_steps(Path(args.quantized))
        graphs["head"] = head_with_fp_steps(bundle, OrtStep(Path(args.quantized) / "head.onnx", args.ort_mode), fp_steps)
        what += " + head.onnx on onnxruntime" + (f" (the first {fp_steps} denoising steps on the FP head)" if fp_steps else "")
    say(f"generating {len(todo)} batches with {what} ({bundle.family}, {device})")
    for made, (k, idx) in enumerate(progress(todo, desc="generating", unit="batch")):
        if args.max_batches is not None and made >= args.max_batches:
            return False
        extra = None
        with torch.no_grad():
            batch_labels, seed = torch.tensor(labels[idx.start: idx.stop]), batch_seed(args.seed, idx.start)
            if job is None:
                tokens = bundle.extra["generate"](batch_labels, seed, step=step, **graphs)
            else:
                edit_inputs = (batch_labels, to_unit_images(job.inputs[idx.start: idx.stop]), job.box)
                tokens, input_tokens, keep = bundle.extra["edit"](*edit_inputs, inpainting=EDIT_TASKS[job.task],
                                                                  seed=seed, step=step)
                extra = {"recon": torch.from_numpy(decode_each(bundle.extra["tokenizer"], input_tokens)),
                         "keep": keep.cpu()}
                if step is not None:  # a quantized edit: the FP edit of the same inputs and seeds beside it
                    fp_tokens = bundle.extra["edit"](*edit_inputs, inpainting=EDIT_TASKS[job.task], seed=seed).tokens
                    extra["fp"] = torch.from_numpy(decode_each(bundle.extra["tokenizer"], fp_tokens))
            images = decode_each(bundle.extra["tokenizer"], tokens)
        tokens = [t.cpu() for t in tokens] if isinstance(tokens, (list, tuple)) else tokens.cpu()
        store.save(k, tokens, images, extra)
    return True


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    labels, job = plan_edit(args)
    rank, world, local_rank = dist_env()
    out = Path(args.out)
    inputs = [p for p in (args.model, args.tokenizer, args.text_encoder, args.onnx, args.engine, args.quantized,
                          args.images)
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
                "labels": labels, "prompts": args.prompt, "text_encoder": args.text_encoder,
                "aspect_ratio": args.aspect_ratio, "seed": args.seed, "batch_size": args.batch_size, "device": args.device}
    if args.kv_cache != "float":  # other tokens; a float run's settings stay as they were, so its batches stay valid
        settings["kv_cache"] = args.kv_cache
    if job is not None:  # plain runs keep their settings, so their partial batches stay valid
        images_file = args.images if Path(args.images).is_file() else None
        settings.update(task=job.task, box=list(job.box), images=fingerprint(images_file) or args.images,
                        max_images=args.max_images)
    plan = batches(len(labels), args.batch_size)
    store = BatchStore(partial, settings, len(plan))
    if not args.merge:
        mine = shard(list(enumerate(plan)), rank, world)
        todo = [(k, idx) for k, idx in mine if not store.path(k).is_file()]
        if len(todo) < len(mine):
            say(f"resuming: {len(mine) - len(todo)} of {len(mine)} batches already in {partial}")
        if todo and not generate_batches(args, store, todo, labels, local_rank, job):
            say(f"stopped after {args.max_batches} batches (--max-batches); run the same command again to resume")
            return 0
        if rank != 0:
            say(f"rank {rank}: done; rank 0 writes {out}")
            return 0
        wait_for(store, args.wait if world > 1 else 0)
    elif store.missing():
        wait_for(store, 0)
    tokens, images = store.load_all()
    if job is not None:
        recon, keep = store.load_extra("recon").numpy(), torch.load(store.path(0), weights_only=True)["keep"].numpy()
        fp = store.load_extra("fp").numpy() if step_source(args) is not None else None
        scores = edit_scores(images, recon, keep, None if min(job.recorded) < 0 else np.asarray(job.recorded), fp)
    with atomic_output_dir(out, force=args.force, inputs=inputs) as tmp:
        write_outputs(tmp, tokens, images, job.recorded if job is not None else labels)
        if job is not None:
            write_edit_outputs(tmp, job.inputs, recon, images, keep, {"task": job.task, "box": list(job.box), **scores},
                               fp)
    shutil.rmtree(partial)
    if job is not None:
        acc = "n/a" if scores["class_accuracy"] is None else f"{100 * scores['class_accuracy']:.1f}%"
        print(f"{job.task}: PSNR to the input's reconstruction {scores['psnr_kept_db']:.1f} dB where kept, "
              f"{scores['psnr_generated_db']:.1f} dB where generated; class accuracy {acc}")
        if fp is not None:
            print(f"  against the FP edits where generated: PSNR {scores['psnr_generated_vs_fp_db']:.1f} dB, "
                  f"SSIM {scores['ssim_generated_vs_fp']:.3f} (edit_grid.png: input | reconstruction | FP | quantized)")
    print(f"wrote {len(images)} images to {out}/ (grid.png, samples.npz, tokens.pt{', edit.npz' if job else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
