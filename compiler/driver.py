"""The compile driver: one object that loads, calibrates, quantizes, exports, checks and reports.

``Compiler(config)`` resolves everything a run needs once: the target (from ``backends.registry``),
the recipe and its pipeline (parsed once, the target's lowering passes appended), the precision,
the model (traced once; every later graph is a copy of that trace) and the exclusions (matched
on one canonicalized copy). ``compile(out)`` then runs calibrate -> quantize -> export -> check ->
report into ``out``. Every tool and test that needs a quantized model asks this module
(``Compiler`` or the lower-level ``quantize``); none imports another tool.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from backends import registry
from calib.device import default_device, inputs_to, resolve_device, stream_to, to_cpu
from compiler.config import CompileConfig
from core.errors import PassError, UserError
from core.numerics import module_bytes
from core.progress import progress as default_progress
from core.progress import say as default_say
from core.qmath import Precision, precision
from frontends import load_model, trace
from frontends.generic import ModelBundle, load_checkpoint
from passes.exclude import describe_matches, match_patterns, with_exclude_pass
from passes.infra import PassContext, PassManager, QuantConfig, parse_pipeline
from passes.recipes import DGC_METHODS, Recipe, load_recipe


class Quantized(NamedTuple):
    fp_gm: torch.fx.GraphModule
    gm: torch.fx.GraphModule
    ctx: PassContext
    pm: PassManager


def quantize(bundle: ModelBundle, pipeline: str, bits: str | Precision, calib, *, stop_after=None, disabled=(),
             instruments=(), exclude=(), reduce_range: bool = False, attention_sites: str = "", weight_format: str = "int8",
             device: torch.device | str = "cpu", progress: Callable = default_progress) -> Quantized:
    """Trace the bundle (a copy of ``bundle.graph`` when set) and run the pipeline on it.

    ``exclude`` patterns keep sites in full precision; an ``exclude`` pass is inserted right
    after ``canonicalize`` when the pipeline has none. ``reduce_range``: 7-bit weights; ``attention_sites``:
    attention matmuls the target runs in int8; ``weight_format``: ``int8`` or ``fp8`` (``QuantConfig``).
    ``device``: both graphs and the context's tensors are left there (``calib.device.to_cpu``
    brings them back).
    """
    registry.targets()  # registers the backends' lowering passes, which pipelines may name
    if exclude:
        pipeline = with_exclude_pass(pipeline)
    device = torch.device(device)
    gm = trace(bundle).to(device)
    fp_gm = copy.deepcopy(gm)
    config = QuantConfig(precision=bits if isinstance(bits, Precision) else precision(bits),
                         weight_reduce_range=reduce_range, group_maps=bundle.extra.get("group_maps", {}),
                         exclude=tuple(exclude), attention_sites=attention_sites, weight_format=weight_format)
    ctx = PassContext(config=config, calib_inputs=stream_to(calib, device),
                      probe_inputs=inputs_to(bundle.example_inputs, device), progress=progress)
    pm = PassManager(pipeline, stop_after=stop_after, disabled=disabled, instruments=instruments)
    with default_device(device):
        return Quantized(fp_gm, pm.run(gm, ctx), ctx, pm)


@dataclass
class Calibration:
    """The calibration inputs (a list of input tuples, or captured generation steps), where they
    came from, and what the report says about them (classes, DGC's kept samples, resampling)."""

    inputs: object
    source: str
    extra: dict = field(default_factory=dict)


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


def check_dgc(c) -> None:
    """A ``CalibrationConfig``'s DGC overrides, checked as the recipe's ``[calibration]`` table is."""
    if c.dgc is not None and c.dgc not in DGC_METHODS:
        raise UserError(f"--dgc must be one of {', '.join(DGC_METHODS)}, got {c.dgc!r}")
    if c.dgc_candidates is not None and not 2 <= c.dgc_candidates <= 64:
        raise UserError(f"DGC candidates must be from 2 to 64 sequences per kept one, got {c.dgc_candidates}")


MAX_CALIB_SAMPLES = 100_000  # --calib-samples above this is a typo (each sample is a whole generation)


class Compiler:
    """One compilation of ``config``: ``load()``, ``calibrate()``, ``quantize()``, or ``compile(out)`` for all."""

    def __init__(self, config: CompileConfig, *, say: Callable[[str], None] = default_say,
                 progress: Callable = default_progress, bundle: ModelBundle | None = None):
        self.config, self.say, self.progress = config, say, progress
        self.target = registry.target(config.target)
        reason = self.target.unavailable()
        if reason:
            raise UserError(f"--target {self.target.name} cannot build here: {reason}")
        # a recipe, pipeline or bits typo fails before the model loads
        self._recipe = load_recipe(config.recipe) if config.recipe else None
        if config.pipeline:
            parse_pipeline(config.pipeline)
        if config.bits and (blocked := self.target.precision_blocker(precision(config.bits))):
            raise UserError(blocked)
        if config.calibration.batch < 1:
            raise UserError(f"--calib-batch must be at least 1, got {config.calibration.batch}")
        if config.stop_after is not None and config.stop_after in config.disabled:
            raise UserError(f"--stop-after {config.stop_after} names a pass that --disable-pass skips; give one of the two")
        if "canonicalize" in config.disabled:
            raise UserError("--disable-pass canonicalize: every later pass works on the sites that 'canonicalize' "
                            "names, so nothing could be quantized")
        if config.calibration.samples is not None and not 1 <= config.calibration.samples <= MAX_CALIB_SAMPLES:
            raise UserError(f"--calib-samples must be between 1 and {MAX_CALIB_SAMPLES} (images to generate, or "
                            f"batches of --calib-data to use), got {config.calibration.samples}")
        check_dgc(config.calibration)
        self.device = resolve_device(config.device)  # a machine without CUDA says so at once
        self.bundle: ModelBundle | None = None
        if bundle is not None:  # built by the caller (tools.bench's workloads): resolved like a loaded one
            self.bundle = dataclasses.replace(bundle, graph=bundle.graph or trace(bundle))
            self._default_recipe(bundle)
        self._sites: dict | None = None
        self._calibration: Calibration | None = None
        self._head_inputs: tuple[list[tuple], int] | None = None
        self._edit = None  # compiler.quality.EditRun of an edit task, made once the model is loaded

    # -- what the run resolves once ---------------------------------------------------------

    def load(self) -> ModelBundle:
        """Load and trace the model (once); the recipe default depends on its family."""
        if self.bundle is None:
            c = self.config
            bundle = load_model(c.model, allow_pickle=c.allow_pickle, family=c.family, tokenizer=c.tokenizer,
                                text_encoder=c.text_encoder, prompts=c.prompts)
            self.bundle = dataclasses.replace(bundle, graph=trace(bundle))
            self._default_recipe(bundle)
        return self.bundle

    def _default_recipe(self, bundle: ModelBundle) -> None:
        if self._recipe is None:
            self._recipe = load_recipe("minmax" if bundle.family == "generic" else "ptq4arvg")

    @property
    def recipe(self) -> Recipe:
        self.load()
        return self._recipe

    @property
    def pipeline(self) -> str:
        """The recipe's pipeline (or ``--pipeline``) with the target's lowering passes appended."""
        base = self.config.pipeline or self.recipe.pipeline
        return f"{base},{self.target.lowering}" if self.target.lowering else base

    @property
    def bits(self) -> str:
        return self.config.bits or self.recipe.bits

    def sites(self):
        """The sites ``canonicalize`` names on this model, from one canonicalized copy of the trace."""
        if self._sites is None:
            from passes.canonicalize import Canonicalize

            ctx = PassContext()
            gm = Canonicalize()(trace(self.load()), ctx).gm
            self._sites = (gm, ctx.sites)
        return self._sites

    def exclusions(self, recipe: Recipe | None = None, *, announce: bool = True) -> dict[str, list[str]]:
        """Match the exclusion patterns (user, recipe, family defaults) on the model's sites, before any
        calibration; returns {pattern: sites}. User and recipe patterns must match a site; a family
        default that matches nothing (a variant without that layer) is skipped with a message."""
        recipe = recipe or self.recipe
        bundle = self.load()
        user = [*self.config.exclude, *recipe.exclude]
        defaults = list(bundle.extra.get("default_exclude", [])) if self.config.default_exclude else []
        pipeline = self.config.pipeline or recipe.pipeline
        if not user and not defaults:
            return {}
        if "canonicalize" not in [p.name for p in parse_pipeline(pipeline)]:
            if user:
                raise UserError(f"exclusions need the 'canonicalize' pass, which names the sites; the pipeline is {pipeline!r}")
            return {}
        sites = self.sites()[1]
        matches = match_patterns(user, sites)
        say = self.say if announce else (lambda msg: None)
        say("exclusions (kept in full precision):")
        for line in describe_matches(matches):
            say(f"  {line}")
        for pattern, matched in match_patterns([d for d in defaults if d not in matches], sites, strict=False).items():
            if matched:
                matches[pattern] = matched
                say(f"  {describe_matches({pattern: matched})[0]} (family default; --no-default-exclude to quantize)")
            else:
                say(f"  family default {pattern!r} matches no site of this model; skipped")
        return matches

    def calibrate(self) -> Calibration:
        """``--calib-data``, else the bundle's own inputs, else the model's own generations (families),
        else its example; DGC selects among self-generated sequences. Computed once."""
        if self._calibration is None:
            self._calibration = self._calibrate()
        return self._calibration

    def _calibrate(self) -> Calibration:
        bundle, c = self.load(), self.config.calibration
        if c.resample and (c.data or bundle.calib_inputs or "generate" not in bundle.extra):
            raise UserError("--resample applies to self-generated calibration of a family model (it redraws sampled tokens)")
        if c.iterations is not None:
            if "calib_steps" not in bundle.extra:
                raise UserError(f"--calib-iterations applies to MAR (iterative generation), not to {bundle.family}")
            bundle.extra["calib_steps"] = c.iterations  # read by calib.capture
        method, candidates, origin = self.dgc_setting()
        if c.data:
            calib = load_calib_data(c.data, len(bundle.example_inputs))
            if method != "none":
                self.say(f"DGC {method} (set by {origin}) applies to self-generated calibration only; "
                         "--calib-data is used as is")
            return Calibration(calib[: c.samples] if c.samples else calib, c.data)
        if bundle.calib_inputs:
            calib = list(bundle.calib_inputs)
            return Calibration(calib[: c.samples] if c.samples else calib, "built-in")
        if "generate" not in bundle.extra:
            if method != "none":
                self.say(f"DGC {method} (set by {origin}) applies to self-generated calibration only; "
                         "this model has none")
            return Calibration([bundle.example_inputs], "example inputs")
        from calib.capture import capture

        n_keep = c.samples or 8
        # DGC keeps n_keep of the 2·n sequences (CFG: one conditional, one unconditional per image)
        n = n_keep if method == "none" else math.ceil(candidates * n_keep / 2)
        if method != "none" and n < 2:
            if c.dgc is not None:
                raise UserError(f"--dgc {c.dgc} needs at least 2 generated images (one set of each kind to compare); "
                                f"--calib-samples {n_keep} gives {n}")
            self.say(f"DGC {method} (set by {origin}) skipped: it needs at least 2 generated images, "
                     f"--calib-samples {n_keep} gives {n}")
            method, origin = "none", f"{origin}, skipped: {n} generated image, DGC needs 2"
        # spread over classes; text-to-image families: indices into their prompt list
        n_conditions = len(bundle.extra["prompts"]) if "prompts" in bundle.extra else bundle.extra["model"].config.num_classes
        classes = [(i * 37) % n_conditions for i in range(n)]
        steps = capture(bundle, classes=classes, seed=c.seed, cache_dir=c.cache, progress=self.progress,
                        resample=c.resample, device=self.device, batch=c.batch)
        source = f"{n} self-generated images (classes {classes[:8]}{'...' if n > 8 else ''}, seed {c.seed}, CFG)"
        extra: dict = {"classes": classes}
        if "calib_steps" in bundle.extra:  # MAR: which iterations were recorded
            extra["iterations"] = bundle.extra["calib_steps"]
        if c.resample:
            scales = steps.resample_summary
            moved, tokens = sum(s["reassigned"] for s in scales), sum(s["tokens"] for s in scales)
            self.say(f"resampling: {moved} of {tokens} tokens redrawn so every scale's code counts equal their targets")
            extra["resample"] = {"reassigned": moved, "tokens": tokens, "per_scale": scales}
            source += ", codebook-resampled"
        if method == "none":
            return Calibration(steps, source, {**extra, "dgc": {"method": "none", "origin": origin}})
        from calib.capture import DGC_FEATURE, select_dgc

        steps, selection = select_dgc(bundle, steps, method, n_keep)
        summary = {**selection.summary(), "origin": origin, "candidates": 2 * n, "feature": DGC_FEATURE}
        # which generations the observers see: sample i is classes[i]; its uncond twin is the null class
        summary["kept_cond_samples"] = [{"sample": int(i), "class": classes[int(i)], "distance": float(selection.rho_cond[i])}
                                        for i in selection.cond]
        summary["kept_uncond_samples"] = [{"sample": int(i), "class": classes[int(i)],
                                           "distance": float(selection.rho_uncond[i])} for i in selection.uncond]
        self.say(f"DGC {method} (set by {origin}): kept {summary['kept_cond']} conditional + "
                 f"{summary['kept_uncond']} unconditional of {2 * n} sequences; {summary['reason']}")
        return Calibration(steps, f"{source}, DGC {method}", {**extra, "dgc": summary, "rows": steps.rows})

    def dgc_setting(self) -> tuple[str, float, str]:
        """(DGC method, candidate sequences per kept one, where the method came from): ``--dgc`` (the
        config's ``dgc``) over the recipe's ``[calibration]`` table."""
        c, recipe = self.config.calibration, self.recipe
        method = c.dgc if c.dgc is not None else recipe.calibration.dgc
        candidates = c.dgc_candidates if c.dgc_candidates is not None else recipe.calibration.candidates
        origin = f"--dgc {c.dgc}" if c.dgc is not None else f"recipe {recipe.name}"
        return method, candidates, origin

    def observer_memory_bound(self) -> tuple[int, int]:
        """(bytes, observed tensors): an upper bound of the observers' state, whatever the sample count.

        Shapes come from one run of the canonicalized trace on the example inputs; every linear
        input is counted with all the model's token groups (group maps only merge them).
        """
        from torch.fx.passes.shape_prop import ShapeProp

        from calib.observers import TensorObserver
        from passes.canonicalize import is_linear

        bundle = self.load()
        gm = copy.deepcopy(self.sites()[0])
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

    def quantize(self, *, recipe: Recipe | None = None, bits: str | None = None, instruments=(), lowering: bool = True,
                 reduce_range: bool | None = None, device=None) -> Quantized:
        """Run ``recipe`` (default: the run's) at ``bits`` on the calibration set; ``lowering`` appends the
        target's lowering passes and applies the run's --stop-after / --disable-pass."""
        mine = recipe is None
        recipe = recipe or self.recipe
        pipeline = (self.pipeline if lowering else (self.config.pipeline or recipe.pipeline)) if mine else recipe.pipeline
        exclusions = self.exclusions(recipe, announce=False)
        return quantize(self.load(), pipeline, bits or (self.bits if mine else recipe.bits), self.calibrate().inputs,
                        stop_after=self.config.stop_after if mine else None,
                        disabled=self.config.disabled if mine else (), instruments=instruments,
                        exclude=list(exclusions),
                        reduce_range=self.target.weight_reduce_range() if reduce_range is None else reduce_range,
                        attention_sites=self.target.attention_sites() if mine else "",
                        weight_format=self.target.weight_format() if mine else "int8",
                        device=self.device if device is None else device, progress=self.progress)

    # -- the whole job ----------------------------------------------------------------------

    def compile(self, out: Path) -> dict:
        """calibrate -> quantize -> export -> check -> report, into ``out``; returns the report."""
        from compiler.plots import write_plots
        from compiler.report import fidelity, quantized_counts, write_reports
        from passes.analysis import PreQDQSnapshot, StatsHistory, site_sqnr
        from passes.dump import DumpInstrument

        c, say = self.config, self.say
        missing = self.target.missing()
        if missing:  # said before loading and calibrating, so the user knows at once
            say(missing)
        say(f"[1/4] loading {c.model}")
        bundle = self.load()
        if blocked := self.target.precision_blocker(precision(self.bits)):  # the recipe's bits
            raise UserError(blocked)
        if c.evaluate and (bundle.family == "generic" or "generate" not in bundle.extra):
            raise UserError("--evaluate needs a family model that generates images (VAR, LlamaGen, RAR, PAR, MAR)")
        if c.evaluate and "prompts" in bundle.extra:  # the quality rows draw class labels in turn
            raise UserError(f"--evaluate scores class-conditional families; {bundle.family} is text-to-image: "
                            f"compare images with tools.generate --prompt and tools.evaluate")
        if c.task is not None:  # the edit inputs, box and classes fail now, before calibration
            from compiler.quality import edit_run

            self._edit = edit_run(bundle, c.task, c.evaluate)
        if self.recipe.head_pipeline and "head" not in bundle.extra:
            raise UserError(f"recipe {self.recipe.name} quantizes a second graph (its [head] table), which the "
                            f"{bundle.family} family does not have (MAR's diffusion head)")
        exclusions = self.exclusions()
        names = [p.name for p in parse_pipeline(self.pipeline)]
        # a pipeline cut before its quantization on purpose (--stop-after, --disable-pass): warn, do not refuse
        explicit = bool(set(c.disabled) & {"insert-qdq", "act-quant", "weight-quant", "stwq"}) or (
            c.stop_after in names and names.index(c.stop_after) < names.index("insert-qdq")
            if "insert-qdq" in names else c.stop_after is not None)
        if "insert-qdq" not in names and not explicit:
            raise UserError(f"the pipeline {self.pipeline!r} has no 'insert-qdq', so it would quantize nothing; "
                            f"add it at the end (after act-quant / weight-quant)")
        calibration = self.calibrate()
        if "observe" in [p.name for p in parse_pipeline(self.pipeline)]:
            try:
                bound, n_obs = self.observer_memory_bound()
                say(f"observers: at most {bound / 1e6:.1f} MB ({n_obs} tensors, {len(calibration.inputs)} calibration batches)")
            except (RuntimeError, ValueError, IndexError, TypeError, UserError) as e:  # an estimate: never fatal
                say(f"observers: memory bound not estimated ({type(e).__name__}: {e})")
        reduce_range = self.target.weight_reduce_range()
        if reduce_range:
            say("this CPU has no VNNI: weights use 7 bits ([-64, 63]) so onnxruntime's int8 kernels cannot saturate")
        if attention := self.target.attention_sites():
            say(f"attention matmuls {attention!r} in int8 for this target (--exclude '{attention}' keeps them float)")
        say(f"[2/4] tracing, then passes: {with_exclude_pass(self.pipeline) if exclusions else self.pipeline}")
        history, pre_qdq = StatsHistory(), PreQDQSnapshot()
        fp_gm, gm, ctx, pm = self.quantize(instruments=[DumpInstrument(out / "dumps"), history, pre_qdq])
        per_site = {}
        with default_device(self.device):  # the analyses run where calibration ran, then everything comes back
            if pre_qdq.gm is not None and c.site_sqnr:
                per_site = site_sqnr(fp_gm, pre_qdq.gm, ctx, [inputs_to(bundle.example_inputs, self.device)],
                                     all_but_one=False, progress=self.progress)
            model_fidelity = fidelity(fp_gm, gm, ctx.calib_inputs)  # the calibration steps, on the device
        to_cpu(ctx, fp_gm, gm, pre_qdq.gm)
        ran = {r["name"] for r in pm.records if not r.get("skipped") and not r.get("failed")}
        if not ctx.qparams or "insert-qdq" not in ran:
            why = ("no pass decided a quantization scale (act-quant, weight-quant or stwq must run before insert-qdq"
                   + (", and the exclusions must leave a site" if exclusions else "") + ")"
                   if not ctx.qparams else "'insert-qdq' did not run, so the graph has no Q/DQ")
            if not explicit:
                raise UserError(f"nothing was quantized: {why}; pipeline {str(pm)!r}")
            warning = f"WARNING: nothing is quantized ({why}, as --stop-after / --disable-pass asked): the artefact is the FP model"
            say(warning)
            ctx.notes.append(warning)

        report: dict = {
            "model": c.model,
            "family": bundle.family,
            "target": self.target.name,
            "recipe": self.recipe.name,
            "pipeline": str(pm),
            "bits": self.bits,
            "calibration": {"source": calibration.source, "batches": len(calibration.inputs), "device": str(self.device),
                            **calibration.extra},
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
            "size_bytes": {"fp": module_bytes(fp_gm), "quantized": module_bytes(gm)},
        }
        try:
            sections = self.target.export(registry.ExportJob(gm, fp_gm, bundle, out, reduce_range, say))
        except (UserError, PassError):
            raise
        except Exception as e:  # a bug (ours or a converter's): one line naming the stage and the module
            from backends.failures import export_error

            raise export_error(self.target.name, e, gm, out) from e
        speed = sections.pop("speed", {})
        report.update(sections)
        with torch.no_grad():  # a sanity figure for the report; tools.bench measures speed properly
            report["speed"] = {"FP torch graph": registry.median_ms(lambda: fp_gm(*bundle.example_inputs)), **speed}
        if self.recipe.head_pipeline:
            report["head"] = self.compile_head(out)
        if c.evaluate:
            report["quality"] = self.image_quality(fp_gm, gm, out, reduce_range)
        say("[4/4] writing report and plots")
        report["plots"] = write_plots(out, history, report["site_sqnr_db"], {n: s.kind for n, s in ctx.sites.items()})
        write_reports(out, report)
        return report

    def head_inputs(self) -> tuple[list[tuple], int]:
        """(the head's recorded input tuples, the denoising stride): MAR's diffusion head run along the
        denoising chains of the calibration images, one denoising step in ``stride``. Computed once."""
        from calib.capture import capture_head

        if self._head_inputs is None:
            c, bundle = self.config, self.load()
            classes = self.calibrate().extra.get("classes")
            if not classes:
                raise UserError("quantizing the diffusion head needs self-generated calibration (no --calib-data)")
            # about 10 denoising steps per iteration: all of MAR-B's 100 would hold some 160 MB per image
            every = max(1, bundle.extra["head"].extra.get("calls_per_iteration", 1) // 10)
            self.say(f"capturing the diffusion head's inputs (one denoising step in {every})")
            self._head_inputs = (capture_head(bundle, classes=classes, seed=c.calibration.seed,
                                              batch=c.calibration.batch, every=every, progress=self.progress), every)
        return self._head_inputs

    def quantized_head(self, pipeline: str, bits: str):
        """The diffusion head fake-quantized by ``pipeline`` at ``bits`` on ``head_inputs``' even calls."""
        if "head" not in self.load().extra:
            raise UserError(f"a recipe's [head] quantizes MAR's diffusion head; the {self.load().family} family has none")
        return quantize(self.load().extra["head"], pipeline, bits, self.head_inputs()[0][::2], progress=self.progress).gm

    def compile_head(self, out: Path) -> dict:
        """The recipe's ``[head]`` pipeline on the family's second graph (MAR's diffusion head), calibrated on
        its inputs along the denoising chains of the calibration images (even calls; odd calls score it),
        exported as ``head.onnx``, linted and run on onnxruntime. Returns the report's ``head`` section."""
        import onnx

        from backends.onnx_export import export_onnx, qdq_census
        from backends.ort_runner import make_session, run
        from backends.qdq_lint import lint
        from compiler.report import fidelity
        from core.numerics import max_abs_diff, min_sqnr_db, run_outputs
        from passes.analysis import PreQDQSnapshot, site_sqnr

        c, bundle = self.config, self.load()
        head = bundle.extra["head"]
        inputs, every = self.head_inputs()
        self.say(f"quantizing the diffusion head: {self.recipe.head_pipeline}")
        calib, held_out = inputs[::2], inputs[1::2] or inputs[:1]
        pre_qdq = PreQDQSnapshot()
        fp_gm, gm, ctx, pm = quantize(head, self.recipe.head_pipeline, self.bits, calib, instruments=[pre_qdq],
                                      progress=self.progress)
        # which of the head's linears hurts: its output with only that site quantized, on held-out steps
        per_site = site_sqnr(fp_gm, pre_qdq.gm, ctx, held_out[:4], all_but_one=False, progress=self.progress) \
            if pre_qdq.gm is not None and c.site_sqnr else {}
        path = export_onnx(gm, head.example_inputs, out / "head.onnx", input_names=head.input_names,
                           output_names=head.output_names, dynamic_shapes=head.extra.get("dynamic_shapes"))
        proto = onnx.load(str(path), load_external_data=False)
        census, lint_report = qdq_census(proto), lint(proto)
        sess = make_session(path, "reference")
        ref, got = run_outputs(gm, held_out[0]), [torch.as_tensor(g) for g in run(sess, held_out[0])]
        section = {
            "pipeline": str(pm), "bits": self.bits, "fp_steps": self.recipe.head_fp_steps,  # tools.generate reads it
            "calibration_calls": len(calib), "held_out_calls": len(held_out),
            "denoising_stride": every, "fidelity": fidelity(fp_gm, gm, held_out),
            "site_sqnr_db": {k: v["only"] for k, v in per_site.items()},
            "qparams": {k: v.describe() for k, v in sorted(ctx.qparams.items())},
            "onnx": {"path": "head.onnx", "QuantizeLinear": census.get("QuantizeLinear", 0),
                     "DequantizeLinear": census.get("DequantizeLinear", 0),
                     "ort_reference_max_abs_diff": max_abs_diff(got, ref),
                     "ort_reference_sqnr_db": min_sqnr_db([r.float() for r in ref], [g.float() for g in got]),
                     "tensorrt_lint": {"ok": lint_report.ok, "int8_gemms": lint_report.quantized_gemms,
                                       "violations": [str(v) for v in lint_report.violations]}},
        }
        self.say(f"  head: output SQNR vs FP {section['fidelity']['min_sqnr_db']:.1f} dB on held-out denoising steps, "
                 f"{sum(lint_report.quantized_gemms.values())} int8 GEMMs in head.onnx, "
                 f"onnxruntime vs torch max |diff| {section['onnx']['ort_reference_max_abs_diff']:.2e}")
        return section

    def image_quality(self, fp_gm, gm, out: Path, reduce_range: bool) -> dict:
        """FP, the compiled model on its target and the ``compare`` recipes draw the same images;
        returns the report's ``quality`` section and writes one grid per model under ``out/images``."""
        import tempfile

        from compiler import quality

        c, bundle = self.config, self.load()
        recipe, bits = self.recipe, self.bits
        step, runs_on = self.target.compiled_step(out, gm, bundle, reduce_range)
        head = None
        if recipe.head_pipeline:  # the compiled head.onnx, on onnxruntime beside the compiled step
            from backends.ort_runner import OrtStep
            from frontends.mar import head_with_fp_steps

            head = head_with_fp_steps(bundle, OrtStep(out / "head.onnx", "reference"), recipe.head_fp_steps)
        rows = [quality.Row("FP", None, None, "torch fp32", None),
                quality.Row(f"{recipe.name} {bits}, compiled", recipe.name, bits, runs_on, step, head)]
        for name, cmp_bits in c.compare:
            cmp_recipe = load_recipe(name)
            try:  # a baseline that cannot apply to this model or bit width is a row saying why, not the run's end
                self.exclusions(cmp_recipe)  # says what the comparison keeps in full precision
                self.say(f"quantizing {name} {cmp_bits} for the comparison")
                cmp_gm = self.quantize(recipe=cmp_recipe, bits=cmp_bits, reduce_range=False, device="cpu").gm
                cmp_head = None
                if cmp_recipe.head_pipeline:
                    from frontends.mar import head_with_fp_steps

                    cmp_head = head_with_fp_steps(bundle, self.quantized_head(cmp_recipe.head_pipeline, cmp_bits),
                                                  cmp_recipe.head_fp_steps)
            except (UserError, PassError) as e:
                self.say(f"  {name} {cmp_bits} not compared: error: {e}")
                rows.append(quality.Row(f"{name} {cmp_bits}", name, cmp_bits, "torch fake-quant", None, error=str(e)))
                continue
            rows.append(quality.Row(f"{name} {cmp_bits}", name, cmp_bits, "torch fake-quant", cmp_gm, cmp_head))
        edit = self._edit if c.task is not None else None
        table, samples = quality.evaluate_rows(bundle, rows, c.evaluate, c.calibration.seed, self.progress, edit)
        section = {"images": len(edit.labels) if edit else c.evaluate, "seed": c.calibration.seed, "rows": table,
                   "grids": quality.write_grids(out, samples, columns=bundle.extra["model"].config.num_classes,
                                                inputs=edit.job.inputs if edit else None)}
        if edit is not None:
            section["task"] = {"task": edit.job.task, "box": list(edit.job.box), "images": c.task.images,
                               "classes": c.task.classes}
        with tempfile.TemporaryDirectory() as tmp:
            speed = self.target.quality_speed(bundle, fp_gm, out, Path(tmp))
        if speed is not None:
            section["speed"] = speed
        return section
