"""``python -m tools.generate CKPT --tokenizer TOK [--onnx out/model.onnx] --classes 0,1,2,3 --out DIR``
(or ``python -m tools.generate builtin:mnist-var --out DIR``: a shipped model carries its tokenizer)

Sample images with the family's own driver (its official CFG and sampling settings), one
generator per image so an image does not depend on the batch it is in, and write
``DIR/grid.png``, ``DIR/<i>_class<c>.png``, ``DIR/samples.npz`` (``arr_0``: uint8
``[N, H, W, 3]``, ``arr_1``: labels; the layout the guided-diffusion evaluator reads) and
``DIR/tokens.pt``. The step runs in PyTorch (FP), or from an exported ONNX model on
onnxruntime (``--onnx``), so FP and quantized images come from the same seeds.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from frontends import load_model
from passes.diagnostics import UserError
from tools._cli import atomic_output_dir, main_wrapper, say


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, H, W, 3]`` uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="family checkpoint (VAR, LlamaGen, RAR, PAR), or builtin:mnist-var / builtin:mnist-gpt")
    p.add_argument("--tokenizer", metavar="CKPT",
                   help="the family's tokenizer checkpoint (decodes tokens); required for checkpoints")
    p.add_argument("--family", help="override detection from the checkpoint's keys")
    p.add_argument("--onnx", metavar="FILE", help="run the step from this ONNX model on onnxruntime (else PyTorch FP)")
    p.add_argument("--ort-mode", choices=("reference", "fast"), default="reference")
    p.add_argument("--classes", default="0,1,2,3", help="comma-separated class labels, one image each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    return p


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        labels = torch.tensor([int(c) for c in args.classes.split(",")])
    except ValueError:
        raise UserError(f"--classes must be integers separated by commas, got {args.classes!r}") from None
    if args.onnx and not Path(args.onnx).is_file():
        raise UserError(f"ONNX model not found: {args.onnx}")
    with atomic_output_dir(args.out, force=args.force) as tmp:
        bundle = load_model(args.model, family=args.family, tokenizer=args.tokenizer)
        if bundle.extra.get("tokenizer") is None or "generate" not in bundle.extra:
            raise UserError(f"{args.model} needs --tokenizer (the family's tokenizer checkpoint) to make images")
        step = None
        if args.onnx:
            from backends.ort_runner import OrtStep

            step = OrtStep(args.onnx, args.ort_mode)
        say(f"generating {len(labels)} images with {'onnxruntime' if step else 'PyTorch'} ({bundle.family})")
        with torch.no_grad():
            tokens = bundle.extra["generate"](labels, args.seed, step=step)
            images = to_uint8(bundle.extra["tokenizer"].decode(tokens))
        from PIL import Image

        Image.fromarray(grid(images)).save(tmp / "grid.png")
        for i, (img, c) in enumerate(zip(images, labels.tolist())):
            Image.fromarray(img).save(tmp / f"{i}_class{c}.png")
        np.savez(tmp / "samples.npz", images, labels.numpy())
        torch.save(tokens, tmp / "tokens.pt")
    print(f"wrote {len(images)} images to {args.out}/ (grid.png, samples.npz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
