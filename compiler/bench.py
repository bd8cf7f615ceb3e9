"""Benchmark workloads and the bench loop's report: what ``tools.bench`` and ``tools.profile_compile`` measure.

A workload builds a ``ModelBundle`` at a batch size: one transformer block, a VAR step at the last
scale, a LlamaGen decode step, with random weights (or a shipped model's). Runners come from
``backends.registry``; ``measure`` there times them interleaved.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

from backends.registry import Runner, runners, sync
from core.errors import UserError
from frontends.generic import ModelBundle


def is_quantized(backend: str) -> bool:
    return runners()[backend].quantized


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
                                                      "default_exclude": list(V.DEFAULT_EXCLUDE),
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


def _infinity_step_inputs(model, si: int, rows: int, seed: int, device="cpu", dtype=torch.float32) -> tuple:
    """Infinity step inputs of scale ``si`` (1:1) for ``rows`` sequences, random but well scaled as VAR's:
    the stand-in text through the model's text path, unit-norm keys in the whole cache."""
    from frontends import infinity as I

    g = torch.Generator(device=device).manual_seed(seed)
    c = model.config
    h, w = c.schedule(1.0)[si]
    f = {"device": device, "dtype": dtype}
    with torch.no_grad():
        cond, text, text_bias = model.encode_text(*I.standin_text(c, rows), cfg=False)
    x = torch.randn(rows, h * w, c.width, generator=g, **f)
    shape = (c.depth, rows, c.heads, c.seq_len, c.head_dim)
    k = torch.nn.functional.normalize(torch.randn(shape, generator=g, **f), dim=-1)
    v = torch.randn(shape, generator=g, **f)
    inputs = model.step_inputs(si, 1.0, x, cond, text, text_bias, k, v)
    return tuple(t.to(device) if t.dtype == torch.long else t.to(**f) for t in inputs)


class _LazySteps(Sequence):
    """Calibration steps built on access: at Infinity-2B one step's KV caches take 6 GB."""

    def __init__(self, make: Callable[[int], tuple], n: int):
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.make(i)


def _infinity(config: str):
    """Infinity at ``config`` with random weights, 1:1: the last-scale step (64x64 = 4096 tokens at 2B,
    1024 px), calibrated on every scale of ``samples`` images (stand-in text, batch 1 + its CFG twin)."""
    def build(batch: int, samples: int = 1) -> ModelBundle:
        from frontends import infinity as I

        torch.manual_seed(0)
        model = I.Infinity(I.CONFIGS[config]).eval().requires_grad_(False)
        n = len(model.config.schedule(1.0))
        calib = _LazySteps(lambda j: _infinity_step_inputs(model, j % n, 2, seed=100 * (j // n + 1) + j % n), samples * n)
        return ModelBundle(f"infinity-{config}", I.InfinityStep(model).eval(), _infinity_step_inputs(model, n - 1, 2, 0),
                           family="infinity", input_names=list(I.STEP_INPUT_NAMES), output_names=list(I.STEP_OUTPUT_NAMES),
                           calib_inputs=calib, extra={"model": model, "group_maps": I.group_maps(n),
                                                      "dynamic_shapes": I.dynamic_shapes(model.config),
                                                      "inputs_for_batch": lambda b, **f: _infinity_step_inputs(model, n - 1, 2 * b, 0, **f)})
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
        # Infinity at 1:1: the last scale (2B: 4096 tokens, 1024 px) over an 11,269-position cache
        "infinity-tiny": _infinity("tiny"),
        "infinity-2b": _infinity("2b"),
    }


def generation(runner: Runner, bundle: ModelBundle, images: int) -> Callable[[tuple], object]:
    """A full generation (every step, sampling included) driven through the runner's step."""
    from frontends import infinity as I
    from frontends import llamagen as L
    from frontends import var as V

    if bundle.family not in ("var", "infinity", "llamagen", "par"):
        raise UserError("--steps all is implemented for VAR, Infinity, LlamaGen and PAR workloads")
    model = copy.deepcopy(bundle.extra["model"]).to(runner.device, runner.dtype)

    run_step, convert = runner.fn, runner.convert  # bound now: the caller replaces runner.fn by this generation

    def step(*inputs):
        return run_step(convert(inputs))

    if bundle.family == "infinity":  # 1:1 from the stand-in text: the sampler and BSQ code updates included
        features, mask = I.standin_text(model.config, images)
        return lambda _: I.sample_bits(model, features, mask, step=step, seed=0)
    labels = torch.arange(images) % model.config.num_classes
    if bundle.family in ("llamagen", "par"):  # the official FID sampling (top-k 0, top-p 1), the config's guidance
        return lambda _: L.generate(model, labels, cfg_scale=model.config.cfg_scale, step=step, seed=0)
    return lambda _: V.sample_tokens(model, labels, step=step, seed=0)


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
    sync(r.device)
    with profile(activities=acts) as prof:
        start = time.perf_counter()
        for _ in range(3):
            r.fn(r.inputs)
        sync(r.device)
        wall_ms = (time.perf_counter() - start) * 1e3
    key = "self_cuda_time_total" if r.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    if r.device != "cuda":
        return table
    kernels = [(e.time_range.start / 1e3, e.time_range.end / 1e3) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    busy, span = busy_and_span(kernels)
    return (f"{table}\nGPU timeline of the 3 calls: {wall_ms:.2f} ms on the host clock (profiled), first kernel to last "
            f"{span:.2f} ms, some kernel running {busy:.2f} ms: {span - busy:.2f} ms idle between kernels, "
            f"{wall_ms - span:.2f} ms before the first and after the last")


def busy_and_span(intervals: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(busy, span)`` of ``(start, end)`` intervals: the length of their union, and from the first start to the
    last end (0, 0 for none): a device timeline's busy time and what it spans."""
    busy, reach = 0.0, None
    for a, b in sorted(intervals):
        if reach is None or a > reach:
            busy += b - a
            reach = b
        elif b > reach:
            busy += b - reach
            reach = b
    if reach is None:
        return 0.0, 0.0
    return busy, max(b for _, b in intervals) - min(a for a, _ in intervals)


def output_sqnr(fp_gm, runners: list[Runner], inputs: tuple) -> None:
    """Each runner's ``sqnr_db``: its step's first output (the logits) against the FP graph's (torch, float32,
    on the CPU), on the timed inputs; one more call of each."""
    from backends.registry import converter
    from core.numerics import run_outputs, sqnr_db, tensor_outputs

    reference = run_outputs(fp_gm.cpu().float(), converter("cpu", torch.float32)(inputs))[0]
    for r in runners:
        with torch.no_grad():
            r.sqnr_db = sqnr_db(reference, tensor_outputs(r.fn(r.inputs))[0].float().cpu())


def render(runners: list[Runner]) -> tuple[str, float | None]:
    """The table, with a ratio column against every floating-point backend; and first int8 / first FP."""
    fps = [r for r in runners if not is_quantized(r.name)]
    q = next((r for r in runners if is_quantized(r.name)), None)
    bases = [(f.name, statistics.median(f.times)) for f in fps]
    sqnr = any(r.sqnr_db is not None for r in runners)
    gpu = any(r.clocks_mhz for r in runners)  # NVML's SM clock after each call, energy over a blocked run
    lines = [f"{'backend':20s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} "
             + "".join(f"{'vs ' + n:>17s}" for n, _ in bases) + (f" {'SQNR dB':>8s}" if sqnr else "")
             + (f" {'SM MHz':>7s} {'J/call':>7s}" if gpu else "") + f" {'run MB':>7s} {'size MB':>8s}  note"]
    for r in runners:
        med = statistics.median(r.times)
        peak = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes else "n/a"
        clock = f"{statistics.median(r.clocks_mhz):.0f}" if r.clocks_mhz else "n/a"
        joules = f"{r.power_w * med:.2f}" if r.power_w is not None else "n/a"
        lines.append(f"{r.name:20s} {med * 1e3:10.2f} {min(r.times) * 1e3:8.2f} {max(r.times) * 1e3:8.2f} "
                     + "".join(f"{f'{b / med:.2f}x':>17s}" for _, b in bases)
                     + (f" {r.sqnr_db:8.1f}" if sqnr and r.sqnr_db is not None else f" {'n/a':>8s}" if sqnr else "")
                     + (f" {clock:>7s} {joules:>7s}" if gpu else "")
                     + f" {peak:>7s} {r.size_bytes / 2**20:8.2f}  {r.note}")
    speedup = bases[0][1] / statistics.median(q.times) if (bases and q) else None
    return "\n".join(lines), speedup


