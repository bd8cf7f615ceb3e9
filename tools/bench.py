"""``python -m tools.bench --model NAME --backends ort-int8,ort-fp32,torch-fp32 --batch B``

Runs every backend on the same inputs in one process, interleaved round by round after a
warm-up, and prints median / min / max latency, the ratio against the first floating-point
backend, the memory one call needs beyond the resident weights and inputs ("run MB", CUDA
only) and the model size. Timings on shared machines are noisy: compare ratios
from one run, never absolute numbers across runs. The last line is machine-readable:
``speedup_vs_fp32=<first int8 backend / first fp backend>``.

Backends: torch-fp32, torch-fp16, torch-fp16-compiled, torch-int8 (real int8 GEMMs via
torch._int_mm + torch.compile, CUDA), ort-fp32, ort-int8 (our graph lowered for onnxruntime:
u8 activations, MatMulIntegerToFloat; backends.ort_int8), ort-int8-qdq (the TensorRT-shaped
Q/DQ export with onnxruntime's own QDQ fusion), ort-int8-ref (QDQ fusion disabled), and
onnxruntime's own quantizers as peers, from the FP32 export: ort-quant-static (QDQ, u8
activations, per-channel weights, calibrated on the workload's calibration inputs) and
ort-quant-dynamic (per-tensor dynamic activations). On a CPU without VNNI the int8 weights are
quantized to 7 bits (reduce-range), so that onnxruntime's u8 x s8 kernels cannot saturate.
Every torch backend runs floating-point attention as one ``scaled_dot_product_attention``
call (``backends.torch_int8.fuse_attention``), as the official models do; the traced step
spells it out as matmuls only so that passes can see them.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._pytree import tree_map

from core.errors import UserError
from core.progress import say
from frontends.generic import ModelBundle
from passes.pipeline import BITS, load_recipe
from tools._cli import main_wrapper
from tools.report import model_bytes

BACKENDS = ("torch-fp32", "torch-fp16", "torch-fp16-compiled", "torch-fp16-autotune", "torch-int8", "torch-int8-autotune",
            "ort-fp32", "ort-int8", "ort-int8-qdq", "ort-int8-ref", "ort-quant-static", "ort-quant-dynamic")


def is_quantized(backend: str) -> bool:
    return "int8" in backend or "quant" in backend


def _block(dim: int, tokens: int, heads: int):
    def build(batch: int) -> ModelBundle:
        from frontends import examples

        b = examples.tiny_block(dim=dim, tokens=tokens, batch=batch)
        b.module.attn.heads = heads
        b.extra["inputs_for_batch"] = lambda n, device="cpu", dtype=torch.float32: (
            torch.randn(n, tokens, dim, generator=torch.Generator().manual_seed(n)).to(device, dtype),)
        return b
    return build


def _var_step_inputs(var, si: int, rows: int, seed: int, device="cpu", dtype=torch.float32) -> tuple:
    """Step inputs of scale ``si`` for ``rows`` sequences (CFG: 2 x images), random but well scaled.

    Speed does not depend on the values; the KV cache is filled with unit-norm keys like VAR's
    L2-normalised attention. Built on ``device`` in ``dtype``: at d16 and batch 100 the caches
    are 14 GB each in float32.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    c = var.config
    begin, end = var.begin_ends[si]
    f = {"device": device, "dtype": dtype}
    x = torch.randn(rows, end - begin, c.width, generator=g, **f)
    labels = torch.randint(0, c.num_classes + 1, (rows,), generator=torch.Generator().manual_seed(seed))
    cond = var.class_emb(labels).detach().to(**f)
    shape = (c.depth, rows, c.heads, c.seq_len, c.head_dim)
    k = torch.nn.functional.normalize(torch.randn(shape, generator=g, **f), dim=-1)
    v = torch.randn(shape, generator=g, **f)
    _, _, positions, attn_bias, _, _, token_groups = var.step_inputs(si, x, cond, k, v)
    return x, cond, positions.to(device), attn_bias.to(**f), k, v, token_groups.to(device)


def _var(config: str):
    """VAR at ``config`` with random weights: the last-scale step (256 tokens at d16), calibrated on every scale
    of ``samples`` images (batch 1: one image and its CFG twin). ``builtin:NAME``: a shipped model's weights."""
    def build(batch: int, samples: int = 1) -> ModelBundle:
        from frontends import var as V

        torch.manual_seed(0)
        if config.startswith("builtin:"):
            from frontends import load_model

            model = load_model(config).extra["model"].eval()
        else:
            model = V.VAR(V.CONFIGS[config]).eval()
        last = model.num_scales - 1
        calib = [_var_step_inputs(model, si, 2, seed=100 * (i + 1) + si) for i in range(samples)
                 for si in range(model.num_scales)]
        # example (= the pass manager's probe) at one image: timed inputs come from inputs_for_batch
        return ModelBundle(f"var-{config.removeprefix('builtin:')}", V.VARStep(model).eval(), _var_step_inputs(model, last, 2, 0),
                           family="var", input_names=list(V.STEP_INPUT_NAMES), output_names=list(V.STEP_OUTPUT_NAMES),
                           calib_inputs=calib, extra={"model": model, "group_maps": V.group_maps(model.num_scales),
                                                      "dynamic_shapes": V.dynamic_shapes(model.config),
                                                      "inputs_for_batch": lambda b, **f: _var_step_inputs(model, last, 2 * b, 0, **f)})
    return build


def _gpt_step_inputs(model, pos: int, rows: int, seed: int, device="cpu", dtype=torch.float32) -> tuple:
    """LlamaGen decode-step inputs at sequence position ``pos`` for ``rows`` sequences (CFG: 2 x images).

    One token per sequence (position 0 feeds the class token, the CFG half the null class); the
    KV cache holds random keys / values before ``pos`` and zeros after, built on ``device`` in ``dtype``.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    c = model.config
    f = {"device": device, "dtype": dtype}
    cpu = torch.Generator().manual_seed(seed)
    if pos == 0:
        labels = torch.randint(0, c.num_classes, (rows,), generator=cpu)
        labels[rows // 2:] = c.num_classes  # the unconditional half of CFG
        tokens = model.class_ids(labels)
    else:
        tokens = torch.randint(0, c.vocab_size, (rows, 1), generator=cpu)
    input_pos = torch.tensor([pos])
    shape = (c.n_layer, rows, c.n_head, model.seq_len, c.head_dim)
    k, v = torch.randn(shape, generator=g, **f), torch.randn(shape, generator=g, **f)
    k[..., pos:, :] = 0
    v[..., pos:, :] = 0
    mask = model.attention_mask()[input_pos]
    return (tokens.to(device), input_pos.to(device), mask.to(**f), k, v, model.token_groups(input_pos).to(device))


def _gpt_decode(config: str):
    """LlamaGen at ``config`` with random weights: one decode step (one token per sequence) half-way through
    the image (position 128 of 256 at GPT-B) with a filled KV cache; calibrated on a few steps (class token,
    a quarter, half-way, last) of ``samples`` images at batch 1."""
    def build(batch: int, samples: int = 1) -> ModelBundle:
        from frontends import llamagen as L

        torch.manual_seed(0)
        model = L.Transformer(L.CONFIGS[config]).eval().requires_grad_(False)
        n = model.config.num_tokens
        pos = n // 2
        calib = [_gpt_step_inputs(model, p, 2, seed=100 * (i + 1) + p) for i in range(samples)
                 for p in (0, n // 4, pos, n)]
        rows = torch.export.Dim("batch", min=1, max=4096)  # CFG rows; the token count of a decode step is 1
        dims = ({0: rows}, None, None, {1: rows}, {1: rows}, None)
        return ModelBundle(f"gpt-{config}-decode", model, _gpt_step_inputs(model, pos, 2, 0), family="llamagen",
                           input_names=list(L.INPUT_NAMES), output_names=list(L.OUTPUT_NAMES), calib_inputs=calib,
                           extra={"model": model, "group_maps": {}, "dynamic_shapes": dims,
                                  "inputs_for_batch": lambda b, **f: _gpt_step_inputs(model, pos, 2 * b, 0, **f)})
    return build


def workloads() -> dict[str, Callable[[int], ModelBundle]]:
    return {
        "tiny-block": _block(64, 16, 4),
        # one transformer block at VAR-d16 width (1024, 16 heads) on the last scale (256 tokens)
        "block-d16": _block(1024, 256, 16),
        "var-tiny": _var("tiny"),
        "var-d16": _var("d16"),
        "mnist-var": _var("builtin:mnist-var"),  # the shipped MNIST VAR (trained weights)
        # LlamaGen decode step: one token per sequence at position 128 of 256, KV cache filled
        "gpt-tiny-decode": _gpt_decode("tiny"),
        "gpt-b-decode": _gpt_decode("GPT-B"),
    }


@dataclass
class Runner:
    """One backend ready to run: ``fn(convert(inputs))`` runs the step on its device and dtype."""

    name: str
    fn: Callable[[tuple], object]
    convert: Callable[[tuple], tuple]
    size_bytes: int
    device: str
    dtype: torch.dtype
    inputs: tuple = ()
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    note: str = ""
    onnx: tuple[Path, str] | None = None  # onnxruntime backends: (model file, session mode), for --profile


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _converter(device: str, dtype: torch.dtype) -> Callable[[tuple], tuple]:
    def convert(inputs: tuple) -> tuple:
        return tuple(tree_map(lambda t: (t.to(dtype) if t.is_floating_point() else t).to(device)
                              if isinstance(t, torch.Tensor) else t, list(inputs)))
    return convert


def _compile(module, mode: str | None = None):
    import torch._dynamo

    # VAR's 10 scales are 10 shapes: let dynamo keep them all instead of falling back to eager
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    return torch.compile(module, mode=mode)


def prepare_backend(name: str, fp_gm, q_gm, workdir: Path, bundle: ModelBundle) -> Runner:
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    from backends import torch_int8

    if name == "torch-fp32":
        m = torch_int8.fuse_attention(copy.deepcopy(fp_gm))[0].to(dev).float()
        return Runner(name, lambda x: m(*x), _converter(dev, torch.float32), model_bytes(m), dev, torch.float32)
    # -autotune: inductor's max-autotune picks among cuBLAS, CUTLASS and Triton GEMMs per shape
    mode = "max-autotune-no-cudagraphs" if name.endswith("-autotune") else None
    if name in ("torch-fp16", "torch-fp16-compiled", "torch-fp16-autotune"):
        if not cuda:
            raise UserError(f"backend {name} needs CUDA")
        m = torch_int8.fuse_attention(copy.deepcopy(fp_gm))[0].to(dev).half()
        f = m if name == "torch-fp16" else _compile(m, mode)
        return Runner(name, lambda x: f(*x), _converter(dev, torch.float16), model_bytes(m), dev, torch.float16)
    if name in ("torch-int8", "torch-int8-autotune"):
        dtype = torch.float16 if cuda else torch.float32
        low, counts = torch_int8.lower_to_int8(torch_int8.fuse_attention(copy.deepcopy(q_gm))[0], dtype=dtype)
        low = torch_int8.to_device(low, dev, dtype)
        f = _compile(low, mode) if cuda else low
        note = f"{counts['int8_linears']} int8 linears" + ("" if cuda else " (CPU: dequantized float fallback)")
        return Runner(name, lambda x: f(*x), _converter(dev, dtype), model_bytes(low), dev, dtype, note=note)
    if name.startswith("ort-"):
        from backends.ort_runner import cpu_has_vnni, make_session, run

        path = _ort_model(name, fp_gm, q_gm, workdir, bundle)
        mode = "reference" if name.endswith("-ref") else "fast"
        sess = make_session(path, mode, spin=False)  # spinning workers would steal the next backend's cores
        note = {"ort-int8": f"u8s8 MatMulIntegerToFloat{'' if cpu_has_vnni() else ', 7-bit weights (no VNNI)'}",
                "ort-int8-qdq": "Q/DQ export, onnxruntime QDQ fusion", "ort-int8-ref": "Q/DQ, fusion disabled",
                "ort-quant-static": "onnxruntime quantize_static", "ort-quant-dynamic": "onnxruntime quantize_dynamic",
                }.get(name, "")
        return Runner(name, lambda x: tuple(torch.from_numpy(o) for o in run(sess, x)),
                      _converter("cpu", torch.float32), _file_bytes(path), "cpu", torch.float32, note=note,
                      onnx=(path, mode))
    raise UserError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def _file_bytes(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _ort_model(name: str, fp_gm, q_gm, workdir: Path, bundle: ModelBundle) -> Path:
    """The ONNX file backend ``name`` runs, exported once per graph into ``workdir``."""
    from backends.onnx_export import export_onnx
    from backends.ort_runner import cpu_has_vnni

    def export(gm, stem: str) -> Path:
        path = workdir / f"{stem}.onnx"
        if not path.exists():
            say(f"exporting {stem}.onnx")
            export_onnx(copy.deepcopy(gm), bundle.extra.get("export_inputs", bundle.example_inputs), path,
                        input_names=bundle.input_names, output_names=bundle.output_names,
                        dynamic_shapes=bundle.extra.get("dynamic_shapes"))
        return path

    if name == "ort-fp32":
        return export(fp_gm, "fp32")
    if name in ("ort-int8-qdq", "ort-int8-ref"):
        return export(q_gm, "qdq")
    if name == "ort-int8":
        from backends.ort_int8 import write_ort_int8

        path = workdir / "ort_int8.onnx"
        counts = write_ort_int8(export(q_gm, "qdq"), path)
        say(f"ort-int8: {counts['int8_gemms']} u8s8 + {counts['u8u8_gemms']} u8u8 int8 GEMMs, "
            f"{counts['float_matmuls']} MatMuls in float")
        return path
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src, path = export(fp_gm, "fp32"), workdir / f"{name}.onnx"
    if name == "ort-quant-dynamic":
        say("onnxruntime quantize_dynamic")
        quantize_dynamic(src, path, weight_type=QuantType.QInt8, reduce_range=not cpu_has_vnni())
        return path
    if name != "ort-quant-static":
        raise UserError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    names = bundle.input_names or [f"input_{i}" for i in range(len(bundle.example_inputs))]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(bundle.calib_inputs or [bundle.example_inputs])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {n: t.numpy() for n, t in zip(names, batch)}

    say("onnxruntime quantize_static (MatMul sites, min-max calibration)")
    # MatMuls only, like our linears: calibrating every tensor of a d16 model takes many GB
    quantize_static(src, path, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, reduce_range=not cpu_has_vnni(), activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return path


def generation(runner: Runner, bundle: ModelBundle, images: int) -> Callable[[tuple], object]:
    """A full generation (every step, sampling included) driven through the runner's step."""
    from frontends import var as V

    if bundle.family != "var":
        raise UserError("--steps all is implemented for VAR workloads")
    model = copy.deepcopy(bundle.extra["model"]).to(runner.device, runner.dtype)
    labels = torch.arange(images) % model.config.num_classes

    run_step, convert = runner.fn, runner.convert  # bound now: the caller replaces runner.fn by this generation

    def step(*inputs):
        return run_step(convert(inputs))

    return lambda _: V.sample_tokens(model, labels, step=step, seed=0)


def measure(runners: list[Runner], *, warmup: int, repeats: int) -> None:
    for r in runners:
        for _ in range(warmup):
            r.fn(r.inputs)
        _sync(r.device)
        if r.device == "cuda":
            torch.cuda.empty_cache()
    for _ in range(repeats):  # interleaved: drift in machine load hits every backend alike
        for r in runners:
            _sync(r.device)
            t0 = time.perf_counter()
            r.fn(r.inputs)
            _sync(r.device)
            r.times.append(time.perf_counter() - t0)
    for r in runners:
        if r.device == "cuda":  # memory one call needs beyond what is resident (weights, inputs)
            torch.cuda.empty_cache()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            r.fn(r.inputs)
            _sync("cuda")
            r.peak_bytes = torch.cuda.max_memory_allocated() - resident


def profile_table(r: Runner, rows: int = 15) -> str:
    """Where the time of one call goes: top kernels / ops of three calls by self device time (CPU time on
    CPU); onnxruntime backends by op type, from onnxruntime's own node-level profile."""
    if r.onnx is not None:
        from backends.ort_runner import profile_by_op

        with tempfile.TemporaryDirectory() as tmp:
            ops = profile_by_op(*r.onnx, r.inputs, calls=3, workdir=tmp)
        total = sum(ms for _, ms, _ in ops) or 1.0
        lines = [f"{'op type (as run)':28s} {'ms/call':>9s} {'share':>6s} {'nodes':>6s}"]
        lines += [f"{op:28s} {ms:9.2f} {100 * ms / total:5.1f}% {n:6d}" for op, ms, n in ops[:rows]]
        lines.append(f"{'all nodes':28s} {total:9.2f}")
        return "\n".join(lines)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if r.device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            r.fn(r.inputs)
        _sync(r.device)
    key = "self_cuda_time_total" if r.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def render(runners: list[Runner]) -> tuple[str, float | None]:
    """The table, with a ratio column against every floating-point backend; and first int8 / first FP."""
    fps = [r for r in runners if not is_quantized(r.name)]
    q = next((r for r in runners if is_quantized(r.name)), None)
    bases = [(f.name, statistics.median(f.times)) for f in fps]
    lines = [f"{'backend':20s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} "
             + "".join(f"{'vs ' + n:>17s}" for n, _ in bases) + f" {'run MB':>7s} {'size MB':>8s}  note"]
    for r in runners:
        med = statistics.median(r.times)
        peak = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes else "n/a"
        lines.append(f"{r.name:20s} {med * 1e3:10.2f} {min(r.times) * 1e3:8.2f} {max(r.times) * 1e3:8.2f} "
                     + "".join(f"{f'{b / med:.2f}x':>17s}" for _, b in bases)
                     + f" {peak:>7s} {r.size_bytes / 2**20:8.2f}  {r.note}")
    speedup = bases[0][1] / statistics.median(q.times) if (bases and q) else None
    return "\n".join(lines), speedup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-block", help="a named workload (see --list)")
    p.add_argument("--list", action="store_true", help="list the named workloads")
    p.add_argument("--backends", default="ort-fp32,ort-int8,torch-fp32", help=f"comma-separated, from {', '.join(BACKENDS)}")
    p.add_argument("--batch", default="2", help="images per batch, or a comma-separated list measured in turn "
                                                 "(CFG doubles the rows of family workloads)")
    p.add_argument("--steps", choices=("last", "all"), default="last",
                   help="last: one step at the last scale; all: a whole generation, sampling included")
    p.add_argument("--recipe", default="minmax", help="recipe used for the int8 backends")
    p.add_argument("--pipeline", help="pass pipeline for the int8 backends (overrides the recipe's)")
    p.add_argument("--bits", choices=sorted(BITS), default="W8A8")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch / onnxruntime CPU threads")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    p.add_argument("--profile", action="store_true",
                   help="after timing, print each backend's top kernels by device time (where the time goes)")
    return p


@main_wrapper
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    named = workloads()
    if args.list:
        print("\n".join(sorted(named)))
        return 0
    if args.model not in named:
        raise UserError(f"unknown workload {args.model!r}; choose from {', '.join(sorted(named))}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            raise UserError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from tools.compile import quantize

    try:
        batches = [int(b) for b in str(args.batch).split(",")]
    except ValueError:
        raise UserError(f"--batch must be integers separated by commas, got {args.batch!r}") from None
    recipe = load_recipe(args.recipe)
    say(f"building {args.model}")
    bundle = named[args.model](batches[0])
    calib = bundle.calib_inputs or [bundle.example_inputs]
    t0 = time.perf_counter()
    from backends.ort_runner import cpu_has_vnni

    # onnxruntime's u8 x s8 kernels saturate with full-range weights on x86 without VNNI
    reduce_range = any(b.startswith("ort-int8") for b in backends) and not cpu_has_vnni()
    fp_gm, q_gm, _, _ = quantize(bundle, args.pipeline or recipe.pipeline, args.bits, calib, reduce_range=reduce_range)
    say(f"quantized with {args.pipeline or recipe.name} ({args.bits}{', 7-bit weights' if reduce_range else ''}) "
        f"in {time.perf_counter() - t0:.1f} s")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        prepared = [prepare_backend(b, fp_gm, q_gm, Path(tmp), bundle) for b in backends]
        step_fns = [(r.fn, r.convert) for r in prepared]
        for batch in batches:
            first = prepared[0]  # inputs are made once, on the first backend's device and dtype, and shared
            inputs = (bundle.extra["inputs_for_batch"](batch, device=first.device, dtype=first.dtype)
                      if "inputs_for_batch" in bundle.extra else bundle.example_inputs)
            runners = []
            for r, (fn, convert) in zip(prepared, step_fns):
                r = Runner(r.name, fn, convert, r.size_bytes, r.device, r.dtype, note=r.note, onnx=r.onnx)
                if args.steps == "all":
                    r.fn, r.inputs = generation(r, bundle, batch), ()
                else:
                    r.inputs = r.convert(inputs)
                runners.append(r)
            say(f"timing {', '.join(backends)} at batch {batch}")
            measure(runners, warmup=args.warmup, repeats=args.repeats)
            table, speedup = render(runners)
            if args.profile:
                for r in runners:
                    print(f"--- profile of {r.name} (3 calls)")
                    print(profile_table(r))
            what = ("full generation" if args.steps == "all" else
                    "one decode step" if bundle.family == "llamagen" else "one last-scale step")
            print(f"workload {args.model} ({what}), batch {batch}, {args.repeats} interleaved repeats after "
                  f"{args.warmup} warm-up; {device}")
            print(table)
            print(f"speedup_vs_fp32={speedup:.3f}" if speedup else "speedup_vs_fp32=n/a", flush=True)
            results.append({"batch": batch, "speedup_vs_fp32": speedup, "backends": {
                r.name: {"times_s": r.times, "peak_bytes": r.peak_bytes, "size_bytes": r.size_bytes, "note": r.note}
                for r in runners}})
            del runners
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": args.model, "steps": args.steps, "device": device,
                                               "pipeline": args.pipeline or recipe.pipeline, "bits": args.bits,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
