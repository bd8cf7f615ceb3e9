"""``python -m tools.compile [MODEL] --target onnx|ort|torch|trt --out DIR``

Load a model, trace one step to an fx graph, run the recipe's pass pipeline (dumping after
every pass that changed the graph), export ONNX with Q/DQ, check it on onnxruntime against
the torch fake-quant graph, and write ``report.json`` + ``report.md``. Everything is written
to a temporary directory that becomes DIR only when the whole job succeeded.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from calib.device import default_device, inputs_to, resolve_device, stream_to, to_cpu
from core.errors import UserError
from core.io import atomic_output_dir
from core.numerics import sqnr_db
from core.progress import progress, say
from frontends import load_model, trace
from frontends.generic import ModelBundle, load_checkpoint
from passes.analysis import PreQDQSnapshot, StatsHistory, site_sqnr
from passes.dump import DumpInstrument
from passes.exclude import describe_matches, match_patterns, with_exclude_pass
from passes.infra import PassContext, PassManager, parse_pipeline
from passes.pipeline import BITS, builtin_recipes, load_recipe
from tools._cli import main_wrapper
from tools.plots import write_plots
from tools.report import fidelity, median_ms, model_bytes, quantized_counts, write_reports

TARGETS = ("onnx", "ort", "torch", "trt")
DEFAULT_MODEL = "builtin:mnist-var"
# The shipped MNIST VAR is the newcomer's first run: with no other choice made, compile it for
# onnxruntime and score images from FP, the artefact and the baselines in the same run.
SHOWCASE = {"target": "ort", "evaluate": 100,
            "compare": "smoothquant:W8A8,minmax:W8A8,ptq4arvg:W6A6,smoothquant:W6A6,minmax:W6A6"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.compile", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--target", choices=TARGETS,
                   help=f"what to build (default: onnx; {SHOWCASE['target']} for the default model)")
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
                        "calibration set (default for the default model: "
                        f"{SHOWCASE['compare']})")
    p.add_argument("--no-site-sqnr", action="store_true",
                   help="skip the per-site SQNR of the report (one insert-qdq and one forward per site)")
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, recipe, calibration and exclusion options (shared with tools.sensitivity)."""
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"checkpoint (.pt/.pth/.bin), torch.export program (.pt2), builtin:<name>, or file.py:factory "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--recipe", help=f"built-in recipe ({', '.join(builtin_recipes())}) or a .toml path "
                                    f"(default: ptq4arvg for family models, minmax otherwise)")
    p.add_argument("--pipeline", help="pass pipeline text; overrides the recipe's (e.g. 'canonicalize,observe,act-quant,insert-qdq')")
    p.add_argument("--bits", choices=sorted(BITS), help="weight/activation bit widths; overrides the recipe's")
    p.add_argument("--calib-data", metavar="FILE", help="a .pt file holding a list of input tuples (loaded with weights_only=True)")
    p.add_argument("--calib-samples", type=int, metavar="N",
                   help="family models: generate N images to calibrate on (default 8); others: use at most N batches")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled modules (runs code from the file)")
    p.add_argument("--family", help="model family of a checkpoint (var, llamagen, rar, par), overriding detection")
    p.add_argument("--tokenizer", metavar="CKPT", help="the family's tokenizer checkpoint (e.g. vae_ch160v4096z32.pth)")
    p.add_argument("--calib-batch", type=int, default=4, metavar="N",
                   help="images generated together during self-generated calibration (default 4); on a GPU a "
                        "larger N calibrates faster. Generation batch i is seeded seed+i, so another N draws "
                        "other images, as another --seed would")
    p.add_argument("--calib-cache", metavar="DIR", default=".arvgq-cache",
                   help="where self-generated calibration steps are cached (an interrupted run resumes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration generations")
    p.add_argument("--dgc", choices=("none", "reference", "ranked"), default="none",
                   help="Distribution-Guided Calibration on self-generated data: keep N of the 2N CFG sequences, "
                        "'reference' as PTQ4ARVG (sets the cond:uncond ratio only), 'ranked' the farthest from "
                        "their set (Ledoit-Wolf); default none: all of them")
    p.add_argument("--resample", action="store_true",
                   help="resample the self-generated token maps per scale so code counts match the model's "
                        "predicted frequencies (Shift-and-Sum, VAR), then replay them teacher-forced; composes with --dgc")
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


def read_exclude_file(path: str) -> list[str]:
    """Patterns of an --exclude-file: one per line, blank lines and '#' comments ignored."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"--exclude-file {path}: {e.strerror or e}") from None
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def resolve_exclusions(bundle: ModelBundle, pipeline: str, user: list[str], defaults: list[str]) -> dict[str, list[str]]:
    """Match the exclusion patterns on the canonicalized trace, before any calibration, and say what each matched.

    User patterns (command line, file, recipe) must match a site; a family default that matches
    nothing (a variant without that layer) is skipped with a message. Returns {pattern: sites}.
    """
    if not user and not defaults:
        return {}
    if "canonicalize" not in [p.name for p in parse_pipeline(pipeline)]:
        if user:
            raise UserError(f"exclusions need the 'canonicalize' pass, which names the sites; the pipeline is {pipeline!r}")
        return {}
    from passes.canonicalize import Canonicalize

    ctx = PassContext()
    Canonicalize()(trace(bundle), ctx)  # the same sites the pipeline's canonicalize will name
    matches = match_patterns(user, ctx.sites)
    say("exclusions (kept in full precision):")
    for line in describe_matches(matches):
        say(f"  {line}")
    for pattern, sites in match_patterns([d for d in defaults if d not in matches], ctx.sites, strict=False).items():
        if sites:
            matches[pattern] = sites
            say(f"  {describe_matches({pattern: sites})[0]} (family default; --no-default-exclude to quantize)")
        else:
            say(f"  family default {pattern!r} matches no site of this model; skipped")
    return matches


def load_calib_data(path: str, n_inputs: int) -> list[tuple]:
    data = load_checkpoint(path)
    if not isinstance(data, (list, tuple)) or not data:
        raise UserError(f"--calib-data {path}: expected a non-empty list of input tuples, got {type(data).__name__}")
    batches = []
    for i, item in enumerate(data):
        item = (item,) if isinstance(item, torch.Tensor) else item
        if not isinstance(item, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in item):
            raise UserError(f"--calib-data {path}: item {i} is not a tuple of tensors")
        if len(item) != n_inputs:
            raise UserError(f"--calib-data {path}: item {i} has {len(item)} inputs, the model takes {n_inputs}")
        batches.append(tuple(item))
    return batches


def quantize(bundle: ModelBundle, pipeline: str, bits: str, calib: list[tuple], *, stop_after=None,
             disabled=(), instruments=(), exclude=(), reduce_range: bool = False,
             device: torch.device | str = "cpu") -> tuple:
    """Trace the bundle and run the pipeline: returns (fp graph, quantized graph, context, manager).

    ``exclude`` patterns keep sites in full precision; an ``exclude`` pass is inserted right
    after ``canonicalize`` when the pipeline has none. ``reduce_range``: 7-bit weights (weight-quant).
    ``device``: both graphs and the context's tensors are left there (``calib.device.to_cpu``
    brings them back).
    """
    if exclude:
        pipeline = with_exclude_pass(pipeline)
    device = torch.device(device)
    gm = trace(bundle).to(device)
    fp_gm = copy.deepcopy(gm)
    w_bits, a_bits = BITS[bits]
    options = {"w_bits": w_bits, "a_bits": a_bits, "group_maps": bundle.extra.get("group_maps", {}),
               "exclude": list(exclude), "w_reduce_range": reduce_range}
    ctx = PassContext(options=options, calib_inputs=stream_to(calib, device),
                      probe_inputs=inputs_to(bundle.example_inputs, device), progress=progress)
    pm = PassManager(pipeline, stop_after=stop_after, disabled=disabled, instruments=instruments)
    with default_device(device):
        return fp_gm, pm.run(gm, ctx), ctx, pm


def calibration_inputs(bundle: ModelBundle, args: argparse.Namespace) -> tuple:
    """--calib-data, else the bundle's own, else the model's own generations (families), else its example.

    Returns (inputs, source, extra report fields); --dgc selects among self-generated sequences.
    """
    dgc = getattr(args, "dgc", "none")
    resample = getattr(args, "resample", False)
    if resample and (args.calib_data or bundle.calib_inputs or "generate" not in bundle.extra):
        raise UserError("--resample applies to self-generated calibration of a family model (it redraws sampled tokens)")
    if args.calib_data:
        calib = load_calib_data(args.calib_data, len(bundle.example_inputs))
        if dgc != "none":
            say(f"--dgc {dgc} applies to self-generated calibration only; --calib-data is used as is")
        return calib[: args.calib_samples] if args.calib_samples else calib, args.calib_data, {}
    if bundle.calib_inputs:
        calib = list(bundle.calib_inputs)
        return calib[: args.calib_samples] if args.calib_samples else calib, "built-in", {}
    if "generate" in bundle.extra:
        from calib.capture import capture

        n = args.calib_samples or 8
        if args.calib_batch < 1:
            raise UserError(f"--calib-batch must be at least 1, got {args.calib_batch}")
        classes = [(i * 37) % bundle.extra["model"].config.num_classes for i in range(n)]  # spread over classes
        steps = capture(bundle, classes=classes, seed=args.seed, cache_dir=args.calib_cache, progress=progress,
                        resample=resample, device=resolve_device(args.device), batch=args.calib_batch)
        source = f"{n} self-generated images (classes {classes[:8]}{'...' if n > 8 else ''}, seed {args.seed}, CFG)"
        extra: dict = {"classes": classes}
        if resample:
            scales = steps.resample_summary
            moved, tokens = sum(s["reassigned"] for s in scales), sum(s["tokens"] for s in scales)
            say(f"resampling: {moved} of {tokens} tokens redrawn so every scale's code counts equal their targets")
            extra["resample"] = {"reassigned": moved, "tokens": tokens, "per_scale": scales}
            source += ", codebook-resampled"
        if dgc == "none":
            return steps, source, extra
        from calib.capture import select_dgc

        steps, selection = select_dgc(bundle, steps, dgc)
        summary = selection.summary()
        # which generations the observers see: sample i is classes[i]; its uncond twin is the null class
        summary["kept_cond_samples"] = [{"sample": int(i), "class": classes[int(i)], "distance": float(selection.rho_cond[i])}
                                        for i in selection.cond]
        summary["kept_uncond_samples"] = [{"sample": int(i), "class": classes[int(i)],
                                           "distance": float(selection.rho_uncond[i])} for i in selection.uncond]
        say(f"DGC ({dgc}): kept {summary['kept_cond']} conditional + {summary['kept_uncond']} unconditional "
            f"of {2 * n} sequences; {summary['reason']}")
        return steps, f"{source}, DGC {dgc}", {**extra, "dgc": summary, "rows": steps.rows}
    if dgc != "none":
        say(f"--dgc {dgc} applies to self-generated calibration only; this model has none")
    return [bundle.example_inputs], "example inputs", {}


def observer_memory_bound(bundle: ModelBundle) -> tuple[int, int]:
    """(bytes, observed tensors): an upper bound of the observers' state, whatever the sample count.

    Shapes come from one run of the canonicalized trace on the example inputs; every linear
    input is counted with all the model's token groups (group maps only merge them).
    """
    from torch.fx.passes.shape_prop import ShapeProp

    from calib.observers import TensorObserver
    from passes.canonicalize import Canonicalize, is_linear

    ctx = PassContext()
    gm = Canonicalize()(trace(bundle), ctx).gm
    with torch.no_grad():
        ShapeProp(gm).propagate(*bundle.example_inputs)
    names = bundle.input_names or []
    groups = (int(bundle.example_inputs[names.index("token_groups")].max()) + 1) if "token_groups" in names else 0
    total = count = 0
    for n in gm.graph.nodes:
        if n.meta.get("site") is None or n.op != "call_function":
            continue
        operands = n.args[:1] if is_linear(n) else n.args[:2]
        for a in operands:
            meta = getattr(a, "meta", {}).get("tensor_meta")
            if meta is not None:
                total += TensorObserver.memory_bound(meta.shape[-1], groups if is_linear(n) else 0)
                count += 1
    return total, count


def build_trt(bundle: ModelBundle, onnx_path: Path, out: Path, input_names: list[str], reason: str | None) -> dict:
    """--target trt: build model.engine (+ sidecar, inspector summary), or record why none was built."""
    if reason is not None:
        return {"built": False, "reason": reason}
    from backends.tensorrt.builder import build_engine, profiles_from_bundle
    from backends.tensorrt.inspect import inspect_engine

    say("[3/4] building the TensorRT engine")
    profiles = profiles_from_bundle(input_names, bundle.example_inputs, bundle.extra.get("dynamic_shapes"))
    meta = build_engine(onnx_path, out / "model.engine", profiles=profiles, timing_cache=out / "timing.cache",
                        progress=lambda phase, done, total: say(f"  TensorRT: {phase}") if done == 0 else None)
    return {"built": True, "engine": "model.engine", "sidecar": meta,
            "inspector": inspect_engine(out / "model.engine", onnx_path)}


def user_exclusions(args: argparse.Namespace) -> list[str]:
    return [*args.exclude, *(p for f in args.exclude_file for p in read_exclude_file(f))]


def default_exclusions(args: argparse.Namespace, bundle: ModelBundle) -> list[str]:
    return [] if args.no_default_exclude else list(bundle.extra.get("default_exclude", []))


def prepare(args: argparse.Namespace) -> tuple:
    """Load the model and resolve recipe, bits, exclusions and calibration from ``add_model_arguments``' options.

    Returns (bundle, recipe, pipeline, bits, {pattern: sites}, (calib, source, extra report fields)).
    """
    user_exclude = user_exclusions(args)
    bundle: ModelBundle = load_model(args.model, allow_pickle=args.allow_pickle, family=args.family,
                                     tokenizer=args.tokenizer)
    recipe = load_recipe(args.recipe or ("minmax" if bundle.family == "generic" else "ptq4arvg"))
    pipeline = args.pipeline or recipe.pipeline
    bits = args.bits or recipe.bits
    exclusions = resolve_exclusions(bundle, pipeline, [*user_exclude, *recipe.exclude], default_exclusions(args, bundle))
    return bundle, recipe, pipeline, bits, exclusions, calibration_inputs(bundle, args)


def check_recipe_options(args: argparse.Namespace) -> None:
    """A recipe or pipeline typo fails before loading the model."""
    if args.recipe:
        load_recipe(args.recipe)
    if args.pipeline:
        parse_pipeline(args.pipeline)


def image_quality(args, bundle: ModelBundle, fp_gm, gm, calib, recipe, bits: str, reduce_range: bool, out: Path) -> dict:
    """FP, the compiled model on its target and the ``--compare`` recipes draw the same images;
    returns the report's ``quality`` section and writes one grid per model under ``out/images``."""
    from tools import quality

    rows = [quality.Row("FP", None, None, "torch fp32", None)]
    if args.target == "ort":
        from backends.ort_runner import OrtStep

        weights = " (7-bit weights: no VNNI)" if reduce_range else ""
        rows.append(quality.Row(f"{recipe.name} {bits}, compiled", recipe.name, bits, f"onnxruntime int8{weights}",
                                OrtStep(out / "model.ort.onnx", "fast")))
    elif args.target in ("onnx", "trt"):
        from backends.ort_runner import OrtStep

        rows.append(quality.Row(f"{recipe.name} {bits}, compiled", recipe.name, bits, "onnxruntime (Q/DQ reference)",
                                OrtStep(out / "model.onnx", "reference")))
    else:
        rows.append(quality.Row(f"{recipe.name} {bits}, compiled", recipe.name, bits, "torch fake-quant", gm))
    for name, cmp_bits in quality.parse_compare(args.compare or ""):
        cmp_recipe = load_recipe(name)
        exclusions = resolve_exclusions(bundle, cmp_recipe.pipeline, [*user_exclusions(args), *cmp_recipe.exclude],
                                        default_exclusions(args, bundle))
        say(f"quantizing {name} {cmp_bits} for the comparison")
        _, cmp_gm, _, _ = quantize(bundle, cmp_recipe.pipeline, cmp_bits, calib, exclude=list(exclusions))
        rows.append(quality.Row(f"{name} {cmp_bits}", name, cmp_bits, "torch fake-quant", cmp_gm))
    table, samples = quality.evaluate_rows(bundle, rows, args.evaluate, args.seed, progress)
    section = {"images": args.evaluate, "seed": args.seed, "rows": table,
               "grids": quality.write_grids(out, samples, columns=bundle.extra["model"].config.num_classes)}
    if args.target == "ort":
        import tempfile

        say("timing onnxruntime int8 against FP32 (interleaved)")
        with tempfile.TemporaryDirectory() as tmp:
            section["speed"] = quality.ort_speed(bundle, fp_gm, out / "model.ort.onnx", Path(tmp))
    return section


def _compile(args: argparse.Namespace, out: Path) -> dict:
    check_recipe_options(args)
    trt_reason = None
    if args.target == "trt":  # checked before loading and calibrating, so the user knows at once
        from backends.tensorrt import availability

        trt_reason = availability()
        if trt_reason:
            say(f"no TensorRT engine can be built here ({trt_reason}); the ONNX model will still be written")
    device = resolve_device(args.device)  # before loading: a machine without CUDA says so at once
    say(f"[1/4] loading {args.model}")
    bundle, recipe, pipeline, bits, exclusions, (calib, calib_source, calib_extra) = prepare(args)
    if args.evaluate and (bundle.family == "generic" or "generate" not in bundle.extra):
        raise UserError("--evaluate needs a family model that generates images (VAR, LlamaGen, RAR, PAR)")
    if "observe" in [p.name for p in parse_pipeline(pipeline)]:
        try:
            bound, n_obs = observer_memory_bound(bundle)
            say(f"observers: at most {bound / 1e6:.1f} MB ({n_obs} tensors, {len(calib)} calibration batches)")
        except (RuntimeError, ValueError, IndexError, TypeError, UserError) as e:  # an estimate: never fatal
            say(f"observers: memory bound not estimated ({type(e).__name__}: {e})")

    from backends.ort_runner import cpu_has_vnni

    # onnxruntime's u8 x s8 kernels saturate with full-range weights on x86 without VNNI
    reduce_range = args.target == "ort" and not cpu_has_vnni()
    if reduce_range:
        say("this CPU has no VNNI: weights use 7 bits ([-64, 63]) so onnxruntime's int8 kernels cannot saturate")
    say(f"[2/4] tracing, then passes: {with_exclude_pass(pipeline) if exclusions else pipeline}")
    history, pre_qdq = StatsHistory(), PreQDQSnapshot()
    fp_gm, gm, ctx, pm = quantize(bundle, pipeline, bits, calib, stop_after=args.stop_after,
                                  disabled=args.disable_pass,
                                  instruments=[DumpInstrument(out / "dumps"), history, pre_qdq],
                                  exclude=list(exclusions), reduce_range=reduce_range, device=device)
    per_site = {}
    with default_device(device):  # the analyses run where calibration ran, then everything comes back
        if pre_qdq.gm is not None and not args.no_site_sqnr:
            per_site = site_sqnr(fp_gm, pre_qdq.gm, ctx, [inputs_to(bundle.example_inputs, device)],
                                 all_but_one=False, progress=progress)
        model_fidelity = fidelity(fp_gm, gm, ctx.calib_inputs)  # the calibration steps, on the device
    to_cpu(ctx, fp_gm, gm, pre_qdq.gm)

    report: dict = {
        "model": args.model,
        "family": bundle.family,
        "target": args.target,
        "recipe": recipe.name,
        "pipeline": str(pm),
        "bits": bits,
        "calibration": {"source": calib_source, "batches": len(calib), "device": str(device), **calib_extra},
        "passes": pm.records,
        "sites": {name: {"kind": s.kind, "in": s.in_features, "out": s.out_features,
                         "quantized": sorted(k.rsplit(".", 1)[1] for k in ctx.qparams if k.rsplit(".", 1)[0] == name),
                         "excluded_by": s.excluded_by}
                  for name, s in ctx.sites.items()},
        "qparams": {k: v.describe() for k, v in sorted(ctx.qparams.items())},
        "exclude": exclusions,
        "quantized_counts": quantized_counts(ctx),
        "site_sqnr_db": {k: v["only"] for k, v in per_site.items()},
        "notes": ctx.notes,
        "fidelity": model_fidelity,
        "size_bytes": {"fp": model_bytes(fp_gm), "quantized": model_bytes(gm)},
    }

    if args.target in ("onnx", "ort", "trt"):
        from backends.onnx_export import export_onnx, qdq_census
        from backends.ort_runner import make_session, run

        say("[3/4] exporting ONNX")
        onnx_path = export_onnx(gm, bundle.extra.get("export_inputs", bundle.example_inputs), out / "model.onnx",
                                input_names=bundle.input_names,
                                output_names=bundle.output_names, dynamic_shapes=bundle.extra.get("dynamic_shapes"))
        import onnx

        from backends.qdq_lint import lint

        model_proto = onnx.load(str(onnx_path), load_external_data=False)
        census = qdq_census(model_proto)
        lint_report = lint(model_proto)
        sess = make_session(onnx_path, "reference")
        with torch.no_grad():
            ref = [t for t in torch.utils._pytree.tree_leaves(gm(*bundle.example_inputs)) if isinstance(t, torch.Tensor)]
        got = run(sess, bundle.example_inputs)
        diff = max(float((torch.as_tensor(g) - r).abs().max()) for g, r in zip(got, ref, strict=True))
        # On trained models a value that lands on a rounding boundary can take the neighbouring
        # code in one runtime and not the other (their LayerNorm/softmax differ in the last bit);
        # the SQNR says how small that is next to the quantization error itself.
        parity_sqnr = min(sqnr_db(r.float(), torch.as_tensor(g).float()) for g, r in zip(got, ref, strict=True))

        def rel_diff(outputs) -> float:  # error relative to each output's largest magnitude
            return max(float((torch.as_tensor(f) - torch.as_tensor(g)).abs().max() / max(float(abs(r).max()), 1e-12))
                       for f, g, r in zip(outputs, got, ref, strict=True))

        fast_diff = rel_diff(run(make_session(onnx_path, "fast"), bundle.example_inputs))
        ort_fast = {"max_rel_diff_vs_reference": fast_diff, "cpu_vnni": cpu_has_vnni(), "reduce_range": reduce_range}
        if args.target == "ort":  # the onnxruntime int8 variant: u8 activations, MatMulIntegerToFloat
            from backends.ort_int8 import write_ort_int8

            gemms = write_ort_int8(onnx_path, out / "model.ort.onnx")
            ort_fast["int8_model"] = {"path": "model.ort.onnx", **gemms, "max_rel_diff_vs_reference":
                                      rel_diff(run(make_session(out / "model.ort.onnx", "fast"), bundle.example_inputs))}
        report["onnx"] = {
            "path": "model.onnx",
            "file_bytes": onnx_path.stat().st_size,
            "QuantizeLinear": census.get("QuantizeLinear", 0),
            "DequantizeLinear": census.get("DequantizeLinear", 0),
            "inputs": [i.name for i in sess.get_inputs()],
            "outputs": [o.name for o in sess.get_outputs()],
            "ort_reference_max_abs_diff": diff,
            "ort_reference_sqnr_db": parity_sqnr,
            # fused int8 kernels: error relative to each output's largest magnitude, and the CPU kind
            "ort_fast": ort_fast,
            "tensorrt_lint": {"ok": lint_report.ok, "int8_gemms": lint_report.quantized_gemms,
                              "float_gemms": len(lint_report.float_gemms),
                              "violations": [str(v) for v in lint_report.violations]},
        }
        if args.target == "trt":
            report["tensorrt"] = build_trt(bundle, onnx_path, out, report["onnx"]["inputs"], trt_reason)
    else:
        say("[3/4] target torch: keeping the fake-quant graph (real INT8 GEMMs need CUDA)")
        from backends.fx_graph import save_graph

        # graph.json + tensors: what tools.generate --quantized rebuilds (data, never executed); graph.py to read
        save_graph(gm, out / "graph.json", out / "quantized_state_dict.pt")
        (out / "graph.py").write_text(gm.code)

    with torch.no_grad():  # a sanity figure for the report; tools.bench measures speed properly
        report["speed"] = {"FP torch graph": median_ms(lambda: fp_gm(*bundle.example_inputs))}
    if "onnx" in report:
        from backends.ort_runner import make_session, run

        fast_session = make_session(out / "model.onnx", "fast")
        report["speed"]["onnxruntime fast mode (int8)"] = median_ms(lambda: run(fast_session, bundle.example_inputs))
    if args.evaluate:
        report["quality"] = image_quality(args, bundle, fp_gm, gm, calib, recipe, bits, reduce_range, out)
    say("[4/4] writing report and plots")
    report["plots"] = write_plots(out, history, report["site_sqnr_db"], {n: s.kind for n, s in ctx.sites.items()})
    write_reports(out, report)
    return report


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
    if args.compare:
        from tools.quality import parse_compare

        parse_compare(args.compare)  # a typo fails before any work
    out = Path(args.out)
    with atomic_output_dir(out, force=args.force) as tmp:
        report = _compile(args, tmp)
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
                     f"{len(lint_['violations'])} violations" + ("" if lint_["ok"] else " (python -m tools.inspect out/model.onnx --lint)"))
    excluded = [n for n, site in report["sites"].items() if site["excluded_by"]]
    if excluded:
        lines.append(f"  kept in full precision: {len(excluded)} sites ({', '.join(excluded[:4])}{', ...' if len(excluded) > 4 else ''})")
    s = report["size_bytes"]
    lines.append(f"  size: {s['fp'] / 1e6:.2f} MB FP -> {s['quantized'] / 1e6:.2f} MB")
    if report.get("tensorrt", {}).get("built"):
        lines.append(f"  TensorRT: {out}/model.engine ({report['tensorrt']['sidecar']['tensorrt_version']}, "
                     f"{report['tensorrt']['sidecar']['gpu']['name']})")
    if "quality" in report:
        from tools.quality import table_rows

        headers, rows = table_rows(report["quality"])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines += ["", f"image quality, {report['quality']['images']} images with the same seeds ({out}/report.md):"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [headers, *rows]]
        if "speed" in report["quality"]:
            sp = report["quality"]["speed"]
            lines.append(f"  onnxruntime int8 vs FP32 on one step: {sp['int8_speedup']:.2f}x")
    print("\n".join(lines))
    if report.get("tensorrt", {}).get("built") is False:  # after the rename: the ONNX stays for another machine
        raise UserError(f"no TensorRT engine built: {report['tensorrt']['reason']}; "
                        f"the ONNX model was kept at {out}/model.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
