"""``observe``: run the calibration inputs through the graph and stream statistics per site.

The graph is executed node by node (fx.Interpreter), so observers see exactly the tensors
the current graph produces: after folding passes they see the folded activations, after
insert-qdq the quantized ones (calibration with quantization upstream, as RepQ-ViT does).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from calib.observers import TensorObserver
from passes.canonicalize import is_linear
from passes.diagnostics import UserError
from passes.infra import Pass, PassContext, PassResult, register


class _Observing(fx.Interpreter):
    def __init__(self, gm, observers: dict[str, TensorObserver], step: int):
        super().__init__(gm)
        self.observers = observers
        self.step = step

    def run_node(self, n):
        site = n.meta.get("site")
        if site is not None and n.op == "call_function":
            args, _ = self.fetch_args_kwargs_from_env(n)
            roles = ("input",) if is_linear(n) else ("a", "b")
            for role, value in zip(roles, args):
                key = f"{site}.{role}"
                obs = self.observers.get(key)
                if obs is None:
                    obs = self.observers[key] = TensorObserver(key)
                obs.update(value, step=self.step)
        return super().run_node(n)


@register
class Observe(Pass):
    """Collect per-channel activation statistics of every site over ``ctx.calib_inputs``."""

    name = "observe"
    preserves_numerics = True

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        if not ctx.calib_inputs:
            raise UserError("no calibration inputs: pass --calib-data FILE (a .pt list of input tuples)")
        observers: dict[str, TensorObserver] = {}
        with torch.no_grad():
            for step, inputs in enumerate(ctx.progress(ctx.calib_inputs, desc="calibrating", unit="batch")):
                _Observing(gm, observers, step).run(*inputs)
        for key, obs in observers.items():
            site, role = key.rsplit(".", 1)
            ctx.stats.setdefault(site, {})[role] = obs
        return PassResult(gm, False, {"observed_tensors": len(observers), "batches": len(ctx.calib_inputs)})
