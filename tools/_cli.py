"""What the commands share: one-line errors with a non-zero exit status, and the model options of every
command that compiles a model (turned into a ``compiler.config.CompileConfig``). Not a command itself."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Callable

from core.errors import PassError, UserError


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that every ``with`` block cleans up its temporaries."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def main_wrapper(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn UserError and PassError (which names the pass and the module) into ``error: <message>`` on
    stderr and exit status 2; SIGTERM and SIGHUP end the command like Ctrl-C (temporaries removed), with
    status 128 + the signal number."""

    def wrapped(argv: list[str] | None = None) -> int:
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                handlers[sig] = signal.signal(sig, _terminate)
        try:
            return main(argv)
        except (UserError, PassError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Terminated as e:
            print(f"error: terminated by {e.args[0]}; temporary files removed", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    return wrapped


def model_input_paths(args: argparse.Namespace) -> list[str]:
    """The files and directories ``add_model_arguments``' options read or fill (an output must hold none)."""
    model = args.model
    if ":" in model and not model.startswith("builtin:"):
        model = model.rpartition(":")[0]  # file.py:factory
    paths = [] if model.startswith("builtin:") else [model]
    recipe = getattr(args, "recipe", None)
    paths += [args.tokenizer, args.text_encoder, args.prompts, args.calib_data, args.calib_cache, *args.exclude_file,
              recipe if recipe and recipe.endswith(".toml") else None]
    return [p for p in paths if p]


def read_exclude_file(path: str) -> list[str]:
    """Patterns of an --exclude-file: one per line, blank lines and '#' comments ignored."""
    from pathlib import Path

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"--exclude-file {path}: {e.strerror or e}") from None
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, recipe, calibration and exclusion options of every command that compiles a model."""
    from compiler.config import DEFAULT_MODEL
    from core.qmath import PRECISIONS
    from passes.recipes import builtin_recipes

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"checkpoint (.pt/.pth/.bin), torch.export program (.pt2), builtin:<name>, or file.py:factory "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--recipe", help=f"built-in recipe ({', '.join(builtin_recipes())}) or a .toml path "
                                    f"(default: ptq4arvg for family models, minmax otherwise)")
    p.add_argument("--pipeline", help="pass pipeline text; overrides the recipe's (e.g. 'canonicalize,observe,act-quant,insert-qdq')")
    p.add_argument("--bits", choices=sorted(PRECISIONS), help="weight/activation bit widths; overrides the recipe's")
    p.add_argument("--calib-data", metavar="FILE", help="a .pt file holding a list of input tuples (loaded with weights_only=True)")
    p.add_argument("--calib-samples", type=int, metavar="N",
                   help="family models: generate N images to calibrate on (default 8); others: use at most N batches")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled modules (runs code from the file)")
    p.add_argument("--family", help="model family of a checkpoint (var, llamagen, rar, par, infinity, mar), overriding detection")
    p.add_argument("--tokenizer", metavar="CKPT", help="the family's tokenizer checkpoint (e.g. vae_ch160v4096z32.pth)")
    p.add_argument("--text-encoder", metavar="DIR",
                   help="text-to-image families (Infinity): a local T5 encoder directory (tokenizer + weights); never downloaded")
    p.add_argument("--prompts", metavar="FILE",
                   help="text-to-image families: calibration prompts, one per line (default: the shipped "
                        "frontends/prompts/infinity_calibration.txt)")
    p.add_argument("--calib-batch", type=int, default=4, metavar="N",
                   help="images generated together during self-generated calibration (default 4); on a GPU a "
                        "larger N calibrates faster. Generation batch i is seeded seed+i, so another N draws "
                        "other images, as another --seed would")
    p.add_argument("--calib-cache", metavar="DIR", default=".arvgq-cache",
                   help="where self-generated calibration steps are cached (an interrupted run resumes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration generations")
    p.add_argument("--dgc", choices=("none", "reference", "ranked"),
                   help="Distribution-Guided Calibration on self-generated data: keep N of the 2N CFG sequences, "
                        "'reference' as PTQ4ARVG (sets the cond:uncond ratio only), 'ranked' the farthest from "
                        "their set (Ledoit-Wolf), 'none' all of them; default: the recipe's [calibration] dgc "
                        "(ptq4arvg: reference; the others: none)")
    p.add_argument("--resample", action="store_true",
                   help="resample the self-generated token maps per scale so code counts match the model's "
                        "predicted frequencies (Shift-and-Sum, VAR), then replay them teacher-forced; composes with --dgc")
    p.add_argument("--calib-iterations", choices=("last", "all"),
                   help="MAR: record the last iteration of each calibration generation (default, as PTQ4ARVG) or all")
    p.add_argument("--exclude", metavar="PATTERN", action="append", default=[],
                   help="keep these sites in full precision (repeatable): a module-path glob such as "
                        "'blocks.*.ada_lin.1' or 'head', or an op type 'op:linear' / 'op:matmul'; "
                        "a pattern that matches no site is an error")
    p.add_argument("--exclude-file", metavar="FILE", action="append", default=[],
                   help="file of --exclude patterns, one per line ('#' starts a comment)")
    p.add_argument("--device", default="cpu",
                   help="where calibration runs: generation, observers and passes (cpu, cuda, cuda:N; default cpu); "
                        "export and files stay on the CPU")
    p.add_argument("--no-default-exclude", action="store_true",
                   help="do not apply the model family's default exclusions (e.g. VAR's AdaLN linears)")


def compile_config(args: argparse.Namespace, **overrides):
    """The CompileConfig of ``add_model_arguments``' options (plus any the command adds as overrides)."""
    from compiler.config import CalibrationConfig, CompileConfig
    from frontends.t5_text import read_prompts

    calibration = CalibrationConfig(data=args.calib_data, samples=args.calib_samples, batch=args.calib_batch,
                                    cache=args.calib_cache, seed=args.seed, dgc=args.dgc, resample=args.resample,
                                    iterations=args.calib_iterations)
    exclude = [*args.exclude, *(p for f in args.exclude_file for p in read_exclude_file(f))]
    return CompileConfig(model=args.model, recipe=args.recipe, pipeline=args.pipeline, bits=args.bits,
                         calibration=calibration, exclude=exclude, default_exclude=not args.no_default_exclude,
                         device=args.device, allow_pickle=args.allow_pickle, family=args.family,
                         tokenizer=args.tokenizer, text_encoder=args.text_encoder,
                         prompts=read_prompts(args.prompts) if args.prompts else None, **overrides)
