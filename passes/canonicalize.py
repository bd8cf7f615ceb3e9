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

from passes.infra import Pass, PassContext, PassResult, Site, get_attr, register, set_buffer

LINEAR_TARGETS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm, torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


def is_linear(node) -> bool:
    return node.op == "call_function" and node.target is F.linear


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def weight_site(w) -> str | None:
    """The site name of a linear whose weight is the ``get_attr`` node ``w``, or None.

    ``blocks.0.fc1.weight`` -> ``blocks.0.fc1``; a packed weight named ``<stem>_weight`` gives
    ``<stem>``: ``nn.MultiheadAttention``'s ``attn.in_proj_weight`` -> ``attn.in_proj`` (its
    ``out_proj`` is a plain Linear). Passes reach the weight through ``Site.weight`` (the
    real target), never by appending ``.weight`` to the site name.
    """
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
        return None
    for suffix in (".weight", "_weight"):
        if w.target.endswith(suffix) and len(w.target) > len(suffix):
            return w.target[: -len(suffix)]
    return w.target if w.target.endswith("weight") and "." not in w.target else None  # a root-level ``weight``


def _constant_inputs(node) -> bool:
    """True when ``node`` is computed from parameters and buffers only."""
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    deps: list = []
    torch.fx.node.map_arg((node.args, node.kwargs), deps.append)
    return all(_constant_inputs(d) for d in deps)


def _materialize_constant_bias(gm, node) -> int:
    """Store a bias computed from parameters (VAR: ``cat(q_bias, zero_k_bias, v_bias)``) as ``<site>.bias``.

    Folding passes add to a linear's bias; a computed one has nowhere to go. The reference
    merges VAR's q/v biases into ``mat_qkv.bias`` at load time; this does it on the graph.
    """
    bias = node.args[2] if len(node.args) > 2 else None
    w = node.args[1]
    if not (isinstance(bias, torch.fx.Node) and bias.op != "get_attr" and _constant_inputs(bias)
            and isinstance(w, torch.fx.Node) and w.op == "get_attr" and w.target.endswith(".weight")):
        return 0
    value = _evaluate(gm, bias)
    target = set_buffer(gm, w.target[: -len("weight")] + "bias", value.detach().clone())
    with gm.graph.inserting_before(node):
        node.args = (node.args[0], w, gm.graph.get_attr(target))
    return 1


def _evaluate(gm, node) -> torch.Tensor:
    env = {}

    def load(n):
        if n.op == "get_attr":
            return get_attr(gm, n.target)
        if n not in env:
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), load)
            fn = getattr(args[0], n.target) if n.op == "call_method" else n.target
            env[n] = fn(*args[1:], **kwargs) if n.op == "call_method" else fn(*args, **kwargs)
        return env[n]

    with torch.no_grad():
        return load(node)


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
                lifted += _materialize_constant_bias(gm, node)
                w = node.args[1]
                site = weight_site(w)
                if site is None:
                    ctx.notes.append(f"linear {node.name}: weight is not a parameter ({w}); not a quantization site")
                    continue
                weight = get_attr(gm, w.target)
                node.meta["site"] = site
                ctx.sites[site] = Site(site, "linear", node.name, int(weight.shape[1]), int(weight.shape[0]),
                                       weight=w.target)
        g.eliminate_dead_code()
        gm.recompile()
        kinds = defaultdict(int)
        for s in ctx.sites.values():
            kinds[s.kind] += 1
        return PassResult(gm, lifted > 0, {"lifted_linears": lifted, "linear_sites": kinds["linear"], "matmul_sites": kinds["matmul"]})
