"""Calibration data from the model's own generations (PTQ4ARVG §5.1, reference/method.md).

The FP driver samples images with the family's official settings (CFG included, so every
step runs on the conditional and the unconditional half); every step's inputs are recorded
so the traced step graph can be replayed on them. Steps are written to a ``CalibCache`` one
generation batch at a time, so an interrupted capture resumes where it stopped, and they
are read back lazily (``CachedSteps``), so the observers never hold more than one batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from calib.cache import CalibCache, calib_key
from calib.device import default_device
from core.errors import UserError
from core.progress import no_progress


def trim_caches(inputs: tuple, names: Sequence[str]) -> tuple[tuple, list[list[int]]]:
    """``inputs`` with each KV-cache input (``[depth, B, heads, L, head_dim]``) cut after its last
    non-zero position, and ``[[input index, L], ...]`` to restore them (`pad_caches`).

    The caches have a fixed length and fill from the front, so at step t only the positions
    written before t are non-zero: VAR-d16's ten steps hold 1030 of 6800 positions, a 6.6x
    smaller calibration cache on disk. Lossless: only exact zeros are dropped.
    """
    out, lengths = list(inputs), []
    for j, name in enumerate(names):
        t = inputs[j]
        if name in CACHE_INPUTS and isinstance(t, torch.Tensor) and t.dim() == 5:
            filled = t.abs().amax(dim=(0, 1, 2, 4)).nonzero()
            n = int(filled.max()) + 1 if filled.numel() else 0
            out[j] = t[..., :n, :].clone()  # a copy: saving a view would write the whole storage
            lengths.append([j, t.shape[-2]])
    return tuple(out), lengths


def pad_caches(inputs: tuple, lengths: list[list[int]]) -> tuple:
    """Undo `trim_caches`: zeros back after each trimmed cache, to its full length."""
    out = list(inputs)
    for j, length in lengths:
        out[j] = torch.nn.functional.pad(out[j], (0, 0, 0, length - out[j].shape[-2]))
    return tuple(out)


class CachedSteps(Sequence):
    """The recorded step-input tuples of every chunk of a cache, loaded one chunk at a time."""

    def __init__(self, cache: CalibCache, counts: list[int]):
        self.cache, self.counts = cache, counts
        self.resample_summary: list[dict] | None = None  # per scale, when the token maps were resampled
        self._loaded: tuple[int, list] | None = None

    def __len__(self) -> int:
        return sum(self.counts)

    def __getitem__(self, i: int) -> tuple:
        if not 0 <= i < len(self):
            raise IndexError(i)
        chunk = 0
        while i >= self.counts[chunk]:
            i -= self.counts[chunk]
            chunk += 1
        if self._loaded is None or self._loaded[0] != chunk:
            saved = self.cache.load(chunk)
            self._loaded = (chunk, saved["steps"], saved.get("lengths"))
        _, steps, lengths = self._loaded
        return pad_caches(tuple(steps[i]), lengths[i]) if lengths else tuple(steps[i])


def capture(bundle, *, classes: list[int], seed: int, cache_dir: str | Path, batch: int = 4,
            progress: Callable = no_progress, resample: bool = False,
            device: torch.device | str = "cpu") -> CachedSteps:
    """Generate one image per class in ``classes`` (batches of ``batch``) and record every step's inputs.

    ``resample``: the token maps are first resampled to the model's codebook frequencies
    (``calib.resample.resample_generations``, method.md §12.3), then the driver is replayed
    teacher-forced on them, so every recorded input (the next scale's embedded f_hat and the
    KV cache) follows from the resampled tokens. The maps and their summaries are cached with
    the steps (``resample_summary``).

    ``device``: the generations run there (the step module is moved there and back); the
    recorded inputs are stored as CPU tensors. A GPU's random streams differ from the CPU's, so
    the device type is part of the cache key.
    """
    generate = bundle.extra.get("generate")
    if generate is None:
        raise UserError(f"{bundle.name}: this model has no generation driver; pass --calib-data FILE")
    step = bundle.module.eval()
    batches = [classes[i:i + batch] for i in range(0, len(classes), batch)]
    sampler = {k: v for k, v in (bundle.extra.get("sampling") or {}).items()}
    last_only = bundle.extra.get("calib_steps") == "last"  # MAR: PTQ4ARVG records the last iteration only
    key = calib_key(bundle.module.state_dict(), {"family": bundle.family, "classes": classes, "batch": batch, **sampler,
                                                 **({"steps": "last"} if last_only else {})},
                    seed, len(classes))
    device = torch.device(device)
    if device.type != "cpu":  # CPU caches keep the key they had before devices existed
        key = {**key, "device": device.type}
    fixed = None
    if resample:
        fixed = _resampled_maps(bundle, classes, seed, batch, cache_dir, key, progress)
        key = {**key, "resampled": True}
    cache = CalibCache(cache_dir, key, len(batches))
    counts = []
    names = bundle.input_names or []
    movable = [m for m in (step, bundle.extra.get("model"), bundle.extra.get("tokenizer")) if isinstance(m, torch.nn.Module)]
    try:
        for i, labels in enumerate(progress(batches, desc="capturing calibration steps", unit="batch")):
            if not cache.has(i):
                recorded: list[tuple] = []

                def recording_step(*inputs, recorded=recorded):
                    trimmed, lengths = trim_caches(inputs, names)  # where they are: a full cache never crosses
                    recorded.append((tuple(t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t
                                           for t in trimmed), lengths))
                    return step(*inputs)

                forcing = {} if fixed is None else {"fixed_tokens": [m[i * batch:i * batch + len(labels)] for m in fixed[0]]}
                for m in movable:
                    m.to(device)
                with torch.no_grad(), default_device(device):
                    generate(torch.tensor(labels), seed + i, step=recording_step, **forcing)
                if last_only:
                    del recorded[:-1]
                cache.save(i, {"steps": [t for t, _ in recorded], "lengths": [n for _, n in recorded]})
            counts.append(len(cache.load(i)["steps"]))
    finally:
        for m in movable:
            m.to("cpu")
    steps = CachedSteps(cache, counts)
    steps.resample_summary = None if fixed is None else fixed[1]
    return steps


def capture_head(bundle, *, classes: list[int], seed: int, batch: int = 4, every: int = 1,
                 progress: Callable = no_progress) -> list[tuple]:
    """The inputs of a family's second graph, ``bundle.extra["head"]`` (MAR's diffusion head), along the
    denoising chains of self-generated images (FP step and head, CFG): every ``every``-th call, as
    CPU tensors in memory. A head call sees every to-be-predicted token of one denoising step, so the
    calls cover all timesteps of the respaced chain; ``every`` thins them (MAR-B: 100 calls per iteration).
    """
    head_bundle, generate = bundle.extra.get("head"), bundle.extra.get("generate")
    if head_bundle is None or generate is None:
        raise UserError(f"{bundle.name}: the {bundle.family} family has no second graph to calibrate")
    if every < 1:
        raise UserError(f"every must be at least 1, got {every}")
    head, recorded, calls = head_bundle.module.eval(), [], [0]

    def recording_head(*inputs):
        if calls[0] % every == 0:
            recorded.append(tuple(t.detach().to("cpu", copy=True) for t in inputs))
        calls[0] += 1
        return head(*inputs)

    batches = [classes[i:i + batch] for i in range(0, len(classes), batch)]
    for i, labels in enumerate(progress(batches, desc="capturing head inputs", unit="batch")):
        with torch.no_grad():
            generate(torch.tensor(labels), seed + i, head=recording_head)
    return recorded


def _resampled_maps(bundle, classes, seed, batch, cache_dir, key, progress) -> tuple[list[torch.Tensor], list[dict]]:
    """The resampled token maps and per-scale summaries, cached as one chunk (a resumed run skips the sampling)."""
    from calib.resample import resample_generations

    cache = CalibCache(cache_dir, {**key, "stage": "resampled token maps"}, 1)
    if not cache.has(0):
        maps, summaries = resample_generations(bundle, classes, seed, batch=batch, progress=progress)
        cache.save(0, {"maps": maps, "summaries": summaries})
    saved = cache.load(0)
    return saved["maps"], saved["summaries"]


# -- DGC selection over captured steps (method.md §5.2) --

CACHE_INPUTS = ("k_cache", "v_cache")  # [depth, B, ...]: batch at dim 1 in every family
UNBATCHED_INPUTS = ("positions", "input_pos", "attn_bias", "attn_mask", "token_groups", "rope")  # no batch axis
BLOCK_LISTS = ("blocks", "layers", "encoder_blocks")  # VAR/RAR ``blocks``, LlamaGen/PAR ``layers``, MAR's encoder (as PTQ4ARVG's reference)


def batch_dims(input_names: list[str]) -> list[int | None]:
    """The batch axis of each step input (None: the input has none)."""
    return [1 if n in CACHE_INPUTS else None if n in UNBATCHED_INPUTS else 0 for n in input_names]


def slice_rows(inputs: tuple, dims: list[int | None], rows: torch.Tensor) -> tuple:
    """The step inputs restricted to the batch rows ``rows`` (every batched tensor, along its batch axis)."""
    return tuple(t.index_select(d, rows) if d is not None and isinstance(t, torch.Tensor) else t
                 for t, d in zip(inputs, dims, strict=True))


def last_block(module: torch.nn.Module) -> torch.nn.Module:
    chunks = getattr(module, "block_chunks", None)  # Infinity: block_chunks.c.module.j
    if isinstance(chunks, torch.nn.ModuleList) and len(chunks):
        return chunks[-1].module[-1]
    for attr in BLOCK_LISTS:
        blocks = getattr(module, attr, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks[-1]
    raise UserError(f"DGC: the step module {type(module).__name__} has no block list ({', '.join(BLOCK_LISTS)})")


def last_block_output(module: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    """``[rows, T, D]``: the last transformer block's output for one step's inputs (every token of the step)."""
    seen: list[torch.Tensor] = []

    def hook(_mod, _args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        seen.append(out.detach().float().clone())

    handle = last_block(module).register_forward_hook(hook)
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise UserError(f"DGC: the last block ran {len(seen)} times in one step; expected once")
    if seen[0].dim() != 3:
        raise UserError(f"DGC: the last block's output is {tuple(seen[0].shape)}; expected [batch, tokens, width]")
    return seen[0]


def last_block_token0(module: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    """``[rows, D]``: the last block's output at token position 0 (the reference's feature, §5.2)."""
    return last_block_output(module, inputs)[:, 0, :]


def _chunks(steps) -> list[tuple[int, int]]:
    """(first step index, step count) of each generation batch; a plain list is one batch."""
    counts = steps.counts if isinstance(steps, CachedSteps) else [len(steps)]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [(s, c) for s, c in zip(starts, counts) if c]


DGC_FEATURE = "the last block's output on the last step of each generation, mean over that step's tokens"


def dgc_features(bundle, steps) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(cond features [N, D], uncond features [N, D], B of each generation batch).

    The feature of a generated sequence (`DGC_FEATURE`) is the last block's output on the LAST
    recorded step of its generation batch, averaged over that step's tokens; the step's rows
    are [0:B] cond and [B:2B] uncond (every family's CFG driver). The reference (method.md
    §5.2) takes token 0 of a teacher-forced forward over the finished sequence. For VAR that
    forward has no mask, so token 0 has seen every token of the image; here a step sees only
    what was generated before it, so token 0 of the first step has seen the class token alone:
    every unconditional sequence had the same feature, the uncond distances were all 0 and the
    ranking degenerated. The last step's tokens (VAR: the last scale; LlamaGen/RAR/PAR: the
    last token) attend to the whole sequence, so conditional and unconditional samples differ
    there as the reference's intent requires; the mean keeps one D-dim row per sample. (RAR
    and PAR's reference hooks token 0 under a causal mask and shares the degenerate case; the
    same feature is used for every family.)
    """
    module = bundle.module.eval()
    dims = batch_dims(bundle.input_names)
    cond, uncond, sizes = [], [], []
    for start, count in _chunks(steps):
        inputs = steps[start + count - 1]
        rows = inputs[dims.index(0)].shape[0]
        if rows % 2:
            raise UserError(f"DGC: a CFG step has an even batch (cond + uncond), got {rows} rows")
        feats = last_block_output(module, inputs).mean(dim=1)
        b = rows // 2
        cond.append(feats[:b])
        uncond.append(feats[b:])
        sizes.append(b)
    return torch.cat(cond), torch.cat(uncond), sizes


class SelectedSteps(Sequence):
    """Captured steps restricted to the kept CFG rows of each generation batch, sliced lazily.

    Only the underlying `CachedSteps`' current chunk is in memory, plus one sliced step; the
    generation batches that keep no row are skipped.
    """

    def __init__(self, steps, dims: list[int | None], rows_per_chunk: list[torch.Tensor]):
        self.steps, self.dims = steps, dims
        self.index: list[tuple[int, torch.Tensor]] = []  # (step index, kept rows)
        for (start, count), rows in zip(_chunks(steps), rows_per_chunk, strict=True):
            if len(rows):
                self.index.extend((start + j, rows) for j in range(count))

    @property
    def rows(self) -> int:
        """Batch rows over all steps: what the observers see."""
        return sum(len(r) for _, r in self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple:
        if not 0 <= i < len(self):
            raise IndexError(i)
        j, rows = self.index[i]
        return slice_rows(self.steps[j], self.dims, rows)


def select_dgc(bundle, steps, method: str, n_keep: int | None = None):
    """DGC over captured CFG steps: ``(SelectedSteps, DGCSelection)``.

    ``method`` is ``reference`` (`dgc_reference`: sets the cond:uncond ratio, keeps the first
    sequences) or ``ranked`` (`dgc_ranked`: Ledoit-Wolf distances, keeps the farthest).
    ``n_keep`` defaults to N (half of the 2N sequences, as in the reference).

    Memory: features are computed one generation batch at a time (one chunk of steps loaded,
    one step run with a hook), so the extra memory is O(chunk + N·D); selected steps are
    sliced on access.
    """
    from calib.dgc import dgc_ranked, dgc_reference

    feats_cond, feats_uncond, sizes = dgc_features(bundle, steps)
    if method == "reference":
        selection = dgc_reference(feats_cond, feats_uncond, n_keep)
    elif method == "ranked":
        selection = dgc_ranked(feats_cond, feats_uncond, n_keep)
    else:
        raise UserError(f"unknown DGC method {method!r} (none, reference, ranked)")
    rows, offset = [], 0
    for b in sizes:
        keep_c = selection.cond[(selection.cond >= offset) & (selection.cond < offset + b)] - offset
        keep_u = selection.uncond[(selection.uncond >= offset) & (selection.uncond < offset + b)] - offset
        rows.append(torch.cat([keep_c, keep_u + b]).long())
        offset += b
    return SelectedSteps(steps, batch_dims(bundle.input_names), rows), selection
