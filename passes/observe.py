"""``observe``: run the calibration inputs through the graph and stream statistics per site.

The graph is executed node by node (fx.Interpreter), so observers see exactly the tensors
the current graph produces: after folding passes they see the folded activations, after
insert-qdq the quantized ones (calibration with quantization upstream, as RepQ-ViT does).
"""
from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx

from calib.observers import TensorObserver
from core.errors import UserError
from passes.canonicalize import is_linear
from passes.infra import Pass, PassContext, PassResult, register


def token_groups_input(gm: fx.GraphModule, ctx: PassContext) -> fx.Node | None:
    """The graph input carrying each token's STWQ group id, if the model has one."""
    name = ctx.config.token_groups_input
    for n in gm.graph.nodes:
        if n.op == "placeholder" and (n.name == name or (name is None and "token_groups" in n.name)):
            return n
    if name is not None:
        raise UserError(f"the graph has no input named {name!r} for token groups")
    return None


def site_group_map(ctx: PassContext, site: str) -> list[int] | None:
    """How a site merges the model's token groups (e.g. VAR's proj/fc2: token 0 vs the rest).

    ``ctx.config.group_maps`` maps module-path globs to a list giving, for each model
    group id, the site's group id; sites matching no glob keep the model's groups.
    """
    for pattern, mapping in ctx.config.group_maps.items():
        if fnmatch.fnmatchcase(site, pattern):
            return list(mapping)
    return None


class _Observing(fx.Interpreter):
    def __init__(self, gm, ctx: PassContext, observers: dict[str, TensorObserver], step: int, groups_node,
                 histograms: bool):
        super().__init__(gm)
        self.histograms = histograms
        self.ctx = ctx
        self.observers = observers
        self.step = step
        self.groups_node = groups_node
        self.groups: torch.Tensor | None = None

    def run_node(self, n):
        site = n.meta.get("site")
        if site is not None and n.op == "call_function":
            args, _ = self.fetch_args_kwargs_from_env(n)
            roles = ("input",) if is_linear(n) else ("a", "b")
            for role, value in zip(roles, args):
                key = f"{site}.{role}"
                obs = self.observers.get(key)
                if obs is None:
                    obs = self.observers[key] = TensorObserver(key, histograms=self.histograms)
                groups = self._groups_for(site, value) if role == "input" else None  # matmul operands: per tensor
                obs.update(value, groups, step=self.step)
        result = super().run_node(n)
        if n is self.groups_node:
            self.groups = result.long()
        return result

    def _groups_for(self, site: str, value: torch.Tensor) -> torch.Tensor | None:
        # Only linear inputs with a token axis (``[..., T, C]``) are grouped; a condition vector is
        # not, nor an attention operand whose axis -2 may equal T by coincidence (k^T at T = head_dim).
        if self.groups is None or value.dim() < 3 or value.shape[-2] != self.groups.numel():
            return None
        mapping = site_group_map(self.ctx, site)
        return self.groups if mapping is None else torch.tensor(mapping, dtype=torch.long)[self.groups]


@register
class Observe(Pass):
    """Collect per-channel activation statistics of every site over ``ctx.calib_inputs``.

    ``histograms=false`` keeps min/max/sum of squares only: enough for min-max recipes and
    about three times cheaper; percentile-MSE search (``stwq{method=mse}``) needs them.
    """

    name = "observe"
    preserves_numerics = True
    histograms: bool = True

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        if not ctx.calib_inputs:
            raise UserError("no calibration inputs: pass --calib-data FILE (a .pt list of input tuples)")
        observers: dict[str, TensorObserver] = {}
        groups_node = token_groups_input(gm, ctx)
        with torch.no_grad():
            for step, inputs in enumerate(ctx.progress(ctx.calib_inputs, desc="calibrating", unit="batch")):
                _Observing(gm, ctx, observers, step, groups_node, self.histograms).run(*inputs)
        for key, obs in observers.items():
            site, role = key.rsplit(".", 1)
            ctx.stats.setdefault(site, {})[role] = obs
        return PassResult(gm, False, {"observed_tensors": len(observers), "batches": len(ctx.calib_inputs)})
