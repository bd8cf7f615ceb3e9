"""Token groups from token positions, for ``stwq`` on a model without a ``token_groups`` input.

STWQ's premise (PTQ4ARVG §4) is a fixed token length whose per-position statistics do not
change from sample to sample. That holds for any fixed-length sequence model, not only for the
families whose frontends hand over their groups (VAR's scales, the class token of LlamaGen...).
For such a generic model the groups are derived from the token position:

1. **Which linears have a token axis.** The graph runs once on an example batch and once with
   its first sample changed. A linear input ``[..., T, C]`` is position-grouped when the
   changes stay in one slice of an axis other than -2 (the batch axis), so a ``[T, B, C]``
   input of a sequence-first attention is never mistaken for one, even when ``B == T``, nor
   is a flattened ``[B*T, C]`` one. ``T`` is the most common such length; linears without
   that axis keep a per-tensor grid.
2. **Per-position ranges.** One calibration run records, per site and position, the smallest
   and largest value over samples and channels (two ``[T]`` vectors per site).
3. **Octave buckets, per site.** A position's span is the range its own grid would cover
   (``max(hi, 0) - min(lo, 0)``, or ``max(|lo|, |hi|)`` for symmetric grids). Positions whose
   span lies in the same octave below the site's widest position, ``floor(log2(widest /
   span))``, share one grid: a position then gives up less than one bit of resolution to the
   others in its group, and an outlier position (a sink or class token) gets its own grid.
   ``max_groups`` caps the octaves (the narrower positions share the last group);
   ``max_groups=0`` gives every position its own grid.
4. **Observers per bucket.** A second run fills one grouped observer per site with the bucket
   of each position, so STWQ's min-max and percentile-MSE searches run unchanged.

Why octave buckets rather than one grid per position: a calibration set holds few samples per
position, so a per-position range is a noisy estimate that clips on unseen data; pooling the
positions of similar range is what the families' groups do by construction, and the bound on
the lost resolution keeps the choice explainable. The run-time cost is the same either way:
the graph gathers each site's ``[T]`` table with the constant positions ``0..T-1``
(``POSITIONS``), which the exporter folds into a per-token scale vector.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from calib.observers import TensorObserver
from core.errors import UserError
from passes.canonicalize import is_linear
from passes.infra import PassContext, set_buffer

POSITIONS = "token_positions"  # buffer holding 0..T-1: the group input of position-grouped sites


class _SiteInputs(fx.Interpreter):
    """Runs the graph and hands each linear site's input to ``visit(site, tensor)``."""

    def __init__(self, gm: fx.GraphModule, sites: set[str], visit):
        super().__init__(gm)
        self.sites, self.visit = sites, visit

    def run_node(self, n):
        site = n.meta.get("site")
        if site in self.sites and is_linear(n):
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.visit(site, args[0])
        return super().run_node(n)


def _site_inputs(gm, sites: set[str], inputs: tuple) -> dict[str, torch.Tensor]:
    values: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        _SiteInputs(gm, sites, lambda s, x: values.setdefault(s, x.detach().clone())).run(*inputs)
    return values


def _changed_first_sample(inputs: tuple) -> tuple:
    """``inputs`` with every element of sample 0 changed (axis 0 of the inputs sized like the first)."""
    batch = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() >= 1), 0)
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch and t.dtype != torch.bool:
            t = t.clone()
            if t.is_floating_point():
                t[0] = t[0] * 1.5 + 0.25
            else:  # token ids: the next id, within the ids the example uses
                t[0] = (t[0] + 1) % (int(t.max()) + 1)
        out.append(t)
    return tuple(out)


def token_axis_sites(gm: fx.GraphModule, inputs: tuple, sites: set[str]) -> tuple[int, list[str]]:
    """``(T, sites whose input is [..., T, C] with T on the token axis)``; ``(0, [])`` if none (step 1).

    The graph runs on ``inputs`` and again with sample 0 changed: in a site's input the changes
    stay in one slice of the batch axis. A site counts when that axis is not -2 (a
    sequence-first ``[T, B, C]`` never does, even when ``B == T``) and axis -2 has ``T >= 2``
    positions; ``T`` is the most common such length. A static ``torch.export`` program cannot
    run another batch size, so the batch axis is found this way rather than by growing it.
    """
    first = _site_inputs(gm, sites, inputs)
    second = _site_inputs(gm, sites, _changed_first_sample(inputs))
    candidates = {}
    for site, a in first.items():
        b = second.get(site)
        if a.dim() < 3 or a.shape[-2] < 2 or b is None or b.shape != a.shape:
            continue
        diff = a != b
        if not bool(diff.any()):
            continue  # does not depend on the samples
        batch_axis = next((axis for axis in range(a.dim() - 1) if not bool(diff.movedim(axis, 0)[1:].any())), None)
        if batch_axis is not None and batch_axis != a.dim() - 2:
            candidates[site] = a.shape[-2]
    if not candidates:
        return 0, []
    tokens = Counter(candidates.values()).most_common(1)[0][0]
    return tokens, [s for s in sites if candidates.get(s) == tokens]


def _check_tokens(site: str, x: torch.Tensor, tokens: int, step: int) -> None:
    if x.dim() < 3 or x.shape[-2] != tokens:
        raise UserError(f"stwq: token groups derived from positions need a fixed token count: {site} saw "
                        f"{list(x.shape)} in calibration batch {step}, {tokens} tokens in the example")


def position_ranges(gm, ctx: PassContext, sites: list[str], tokens: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per site, the per-position min and max over samples and channels, ``[T]`` each (step 2)."""
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def visit(site, x, step):
        _check_tokens(site, x, tokens, step)
        flat = x.detach().float().movedim(-2, 0).reshape(tokens, -1)
        a, b = flat.amin(1), flat.amax(1)
        lo[site] = torch.minimum(lo[site], a) if site in lo else a
        hi[site] = torch.maximum(hi[site], b) if site in hi else b

    with torch.no_grad():
        for step, inputs in enumerate(ctx.progress(ctx.calib_inputs, desc="stwq positions", unit="batch")):
            _SiteInputs(gm, set(sites), lambda s, x, step=step: visit(s, x, step)).run(*inputs)
    return {s: (lo[s], hi[s]) for s in sites if s in lo}


def octave_buckets(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, max_groups: int) -> torch.Tensor:
    """Group id of each position: the octave of its span below the widest one, compacted to
    ``0..G-1`` (0: the widest); ``max_groups=0``: one group per position (step 3)."""
    if max_groups == 0:
        return torch.arange(lo.numel())
    lo, hi = lo.double().clamp(max=0), hi.double().clamp(min=0)
    span = torch.maximum(-lo, hi) if symmetric else hi - lo
    widest = float(span.max())
    if widest <= 0:
        return torch.zeros(lo.numel(), dtype=torch.long)
    octave = torch.floor(torch.log2(widest / span.clamp(min=widest * 2.0 ** -64)))
    octave = octave.clamp(0, max_groups - 1).long()
    return torch.unique(octave, return_inverse=True)[1]


def bucket_observers(gm, ctx: PassContext, buckets: dict[str, torch.Tensor], tokens: int,
                     histograms: bool) -> dict[str, TensorObserver]:
    """One observer per site, grouped by the site's buckets of the positions (step 4)."""
    observers = {s: TensorObserver(f"{s}.input", histograms=histograms) for s in buckets}

    def visit(site, x, step):
        _check_tokens(site, x, tokens, step)
        observers[site].update(x, buckets[site].to(x.device), step=step)

    with torch.no_grad():
        for step, inputs in enumerate(ctx.progress(ctx.calib_inputs, desc="stwq groups", unit="batch")):
            _SiteInputs(gm, set(buckets), lambda s, x, step=step: visit(s, x, step)).run(*inputs)
    return observers


def register_positions(gm: fx.GraphModule, tokens: int) -> None:
    """The constant group input of position-grouped sites: ``POSITIONS = 0..T-1``."""
    device = next((t.device for t in [*gm.parameters(), *gm.buffers()]), torch.device("cpu"))
    set_buffer(gm, POSITIONS, torch.arange(tokens, device=device))


def positions_node(gm: fx.GraphModule) -> fx.Node | None:
    """A ``get_attr`` of ``POSITIONS`` (created before the first node that needs it), if registered."""
    if not isinstance(getattr(gm, POSITIONS, None), torch.Tensor):
        return None
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == POSITIONS:
            return n
    return gm.graph.get_attr(POSITIONS)


def describe_buckets(buckets: torch.Tensor) -> str:
    """``{0}, {1-7, 9}, {8}``: the positions of each group, as runs."""
    parts = []
    for g in range(int(buckets.max()) + 1):
        pos = (buckets == g).nonzero().flatten().tolist()
        runs, start = [], pos[0]
        for a, b in zip(pos, pos[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append("{" + ", ".join(runs) + "}")
    return ", ".join(parts)
