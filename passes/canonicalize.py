"""``canonicalize``: one form for every linear, and the table of quantizable sites.

Linears arrive as ``call_module`` (fx.symbolic_trace), ``aten.linear`` (torch.export) or
``F.linear``. They all become ``F.linear(x, get_attr(<path>.weight), get_attr(<path>.bias))``
so later passes handle one pattern, and each is registered as a site named by its module
path. Attention matmuls (``torch.matmul``/``@`` between two activations) become sites named
``<module>.matmul1``, ``<module>.matmul2``... in graph order, as in the reference code.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.nn.functional as F

from passes.infra import Pass, PassContext, PassResult, Site, get_attr, register

LINEAR_TARGETS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


def is_linear(node) -> bool:
    return node.op == "call_function" and node.target is F.linear


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


@register
class Canonicalize(Pass):
    name = "canonicalize"
    preserves_numerics = True

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        g = gm.graph
        lifted = 0
        matmul_count: dict[str, int] = defaultdict(int)
        for node in list(g.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Linear):
                path = node.target
                mod = gm.get_submodule(path)
                with g.inserting_before(node):
                    w = g.get_attr(f"{path}.weight")
                    b = g.get_attr(f"{path}.bias") if mod.bias is not None else None
                    new = g.call_function(F.linear, (node.args[0], w, b))
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                g.erase_node(node)
                lifted += 1
                node = new
            elif node.op == "call_function" and node.target in LINEAR_TARGETS:
                if node.target is not F.linear:
                    node.target = F.linear
                    lifted += 1
            elif node.op == "call_function" and node.target in MATMUL_TARGETS:
                a, b = node.args[:2]
                if all(isinstance(x, torch.fx.Node) and x.op != "get_attr" for x in (a, b)):
                    owner = _module_path(node)
                    matmul_count[owner] += 1
                    site = f"{owner}.matmul{matmul_count[owner]}" if owner else f"matmul{matmul_count[owner]}"
                    node.meta["site"] = site
                    ctx.sites[site] = Site(site, "matmul", node.name)
                continue
            if is_linear(node):
                w = node.args[1]
                if not (isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target.endswith("weight")):
                    ctx.notes.append(f"linear {node.name}: weight is not a parameter ({w}); not a quantization site")
                    continue
                site = w.target[: -len(".weight")] if "." in w.target else w.target
                weight = get_attr(gm, w.target)
                node.meta["site"] = site
                ctx.sites[site] = Site(site, "linear", node.name, int(weight.shape[1]), int(weight.shape[0]))
        g.eliminate_dead_code()
        gm.recompile()
        kinds = defaultdict(int)
        for s in ctx.sites.values():
            kinds[s.kind] += 1
        return PassResult(gm, lifted > 0, {"lifted_linears": lifted, "linear_sites": kinds["linear"], "matmul_sites": kinds["matmul"]})
