"""``quarot``: QuaRot's Hadamard rotations (Ashkboos et al., 2024), a PTQ4ARVG baseline (issue 19).

A rotation by an orthogonal ``Q`` (a Hadamard matrix with random signs, ``Q Q^T = I``) spreads an
activation's outlier channels over all channels, so a per-tensor grid fits it better, and changes
nothing in FP because ``x W^T = (x Q)(W Q)^T``. Where QuaRot puts it, and what this pass does:

* *Offline, between two linears* (``A -> B`` with nothing else reading A's output): ``W_A <- Q^T W_A``,
  ``b_A <- Q^T b_A``, ``W_B <- W_B Q``. No run-time cost. (The regions of ``passes/regions.py``
  whose source is a linear.)
* *The residual stream* (QuaRot's main offline rotation) needs RMSNorm-style norms: ``RMSNorm(x Q) =
  RMSNorm(x) Q`` once the norm's gain is folded into the next linears. It cannot fold here:
  - **AdaLN** (VAR, RAR): the norm's output is multiplied per sample and per channel by
    ``1 + scale(cond)``; ``Q diag(a) Q^T`` is not diagonal, so the rotation does not pass through the
    modulation (and the LayerNorm under it subtracts a mean). Every qkv / fc1 / head input of an
    AdaLN model is blocked: the stats list them under ``blocked_by_adaln`` and ``ctx.notes`` says so.
  - **LayerNorm** with a per-channel affine: same reason without the per-sample part (QuaRot first
    rewrites LayerNorm into RMSNorm by folding the mean subtraction into the previous linears).
  - **RMSNorm** (LlamaGen, PAR): folded offline (``residual=true``), as QuaRot does for LLaMA. Each
    RMSNorm's gain ``g`` first moves into the linears reading its output (``W <- W diag(g)``, ``g <- 1``),
    so the norm is ``x / rms(x)``, and ``rms(x Q) = rms(x)`` for an orthogonal ``Q``. Then the whole
    residual stream becomes ``h Q``: every embedding table ``E <- E Q`` (token, class and PAR's special
    rows), every linear writing the stream ``W <- Q^T W`` (attention ``wo``, SwiGLU ``w2``), every linear
    reading a norm ``W <- W diag(g) Q`` (``wqkv``, ``w1``/``w3``, the head ``output``). No run-time op.
    The stream is found from the norms' inputs backwards through adds, ``where`` (the embedding
    lookups), casts and moves to linears and embeddings; anything else on it (or reading it other than
    an add or a norm) leaves the residual unrotated and those inputs rotated online, with the reason in
    the stats (``residual``).
* *v -> proj* (QuaRot rotates V per head offline): V is written into the KV cache, a step input and
  output in every family here, so rotating it would change the cache the driver keeps: online.
* *fc2 / down_proj* (after GELU or SwiGLU, non-linear): online in QuaRot too.

*Online* (``online=true``): ``x -> x @ Q`` before the linear (a MatMul with a constant in ONNX, a
float GEMM; QuaRot uses a fast Walsh-Hadamard kernel) and ``W <- W Q`` offline, for every quantized
linear whose input could not be rotated offline. Linears reading the same tensor (qkv, SwiGLU's w1/w3)
share one rotation. Stats: ``offline`` regions, ``online`` sites with the reason, ``blocked_by_adaln``.

Hadamard orders: ``2^k · m`` with ``m`` 1 or ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (Sylvester and
Paley I: 96 = 8·12, 1024, 1920 = 32·60, 4096...); another width is an error naming it.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from core.errors import UserError
from passes.canonicalize import is_linear
from passes.fold_sources import assign, ensure_linear_bias
from passes.graph_match import CAST_METHODS, describe, is_add, is_metadata_use, is_move, keeps_last_axis, module_scopes
from passes.infra import Pass, PassContext, PassResult, get_attr, register, set_buffer
from passes.regions import _shared_tensors, find_regions


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley I Hadamard matrix of order ``q + 1`` (``q`` prime, ``q ≡ 3 mod 4``), entries ±1."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    jac = torch.stack([chi[(torch.arange(q) - i) % q] for i in range(q)])  # Jacobsthal: chi(j - i)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return torch.eye(q + 1, dtype=torch.float64) + s


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (entries ±1, ``H H^T = n I``), float64."""
    k = 0
    while n % (2 ** (k + 1)) == 0:
        k += 1
    for p in range(k, -1, -1):  # the largest power of two whose cofactor has a Paley matrix
        m = n // 2 ** p
        if m == 1:
            base = torch.ones(1, 1, dtype=torch.float64)
        elif m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            base = _paley(m - 1)
        else:
            continue
        h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        for _ in range(p):
            base = torch.kron(h2, base)
        return base
    raise UserError(f"quarot: no Hadamard matrix of order {n} is built here (orders 2^k·m with m = 1 or q + 1, "
                    f"q a prime ≡ 3 mod 4)")


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """QuaRot's randomised Hadamard ``diag(±1) H / sqrt(n)``: orthogonal, float64."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return signs[:, None] * hadamard(n) / n ** 0.5


_NORM_REASONS = {
    "adaln": "AdaLN: the per-sample modulation (1 + scale) after the LayerNorm does not commute with a rotation, "
             "so the residual stream cannot be rotated",
    "layernorm": "LayerNorm: its mean subtraction and per-channel affine do not commute with a rotation "
                 "(QuaRot rewrites it as RMSNorm and rotates the residual stream; not done here)",
    "rmsnorm": "RMSNorm: the residual stream is not rotated",
}
_WHERE_FNS = {torch.where}


def _embedding_weight(gm, node: fx.Node) -> str | None:
    """The table's target when ``node`` is an embedding lookup (``nn.Embedding`` or ``F.embedding``)."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Embedding):
        return f"{node.target}.weight"
    if node.op == "call_function" and node.target is torch.nn.functional.embedding:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        return w.target if isinstance(w, fx.Node) and w.op == "get_attr" else None
    return None


def _residual_plan(gm, norm_regions: list) -> tuple[dict | None, str]:
    """The residual stream behind ``norm_regions`` (RMSNorm regions): ``({"writers": [linear nodes],
    "tables": [embedding weight targets]}, "")``, or ``(None, reason)`` when it cannot be rotated offline."""
    if not norm_regions:
        return None, "no RMSNorm region"
    scope = {}  # node -> the norm path it belongs to
    paths = {r.source.path for r in norm_regions}
    for n in gm.graph.nodes:
        for path in module_scopes(n):
            if path in paths:
                scope[n] = path
    frontier = list(dict.fromkeys(a for n in scope for a in n.all_input_nodes if a not in scope and a.op != "get_attr"))
    stream, writers, tables = set(), [], []
    while frontier:
        v = frontier.pop()
        if v in stream:
            continue
        stream.add(v)
        table = _embedding_weight(gm, v)
        if table is not None:
            tables.append(table)
        elif is_linear(v) and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in _weight_and_bias(v)):
            writers.append(v)
        elif is_add(v) and all(isinstance(a, fx.Node) for a in v.args):
            frontier += list(v.args)
        elif v.op == "call_function" and v.target in _WHERE_FNS and len(v.args) == 3 and all(
                isinstance(a, fx.Node) for a in v.args[1:]):
            frontier += list(v.args[1:])  # the condition picks rows; both branches are stream values
        elif is_move(v) and _keeps_channels(v):
            frontier.append(v.args[0])
        elif v.op == "placeholder":
            return None, f"the residual stream is the step input {v.name}, which the caller would have to rotate"
        else:
            return None, f"the residual stream comes from {describe(v)}, which a rotation does not pass through"
    for v in stream:
        for u in v.users:
            if u in stream or is_metadata_use(u) or u in scope:  # a norm's input: x / rms(x) commutes with Q
                continue
            if u.op == "call_method" and u.target == "type_as" and u.args[0] is not v:
                continue  # type_as(y, stream) reads only the stream's dtype
            if u.op == "call_function" and u.target in _WHERE_FNS and u.args[0] is v:
                return None, f"the residual stream is a condition of {describe(u)}"
            return None, f"the residual stream is read by {describe(u)}, which a rotation would change"
    edited = tables + [w.args[1].target for w in writers] + [s.args[1].target for r in norm_regions for s in r.sinks]
    shared = _shared_tensors(gm)
    if tied := [t for t in edited if t in shared]:
        return None, f"{tied[0]} is shared with another part of the model (tied weights)"
    if len({r.channels for r in norm_regions}) > 1:
        return None, f"the RMSNorms have different widths ({sorted({r.channels for r in norm_regions})})"
    if any(r.source.output is not r.source.core for r in norm_regions):
        return None, "an RMSNorm has a bias (a folded shift), which a rotation does not pass through"
    return {"writers": writers, "tables": list(dict.fromkeys(tables))}, ""


def _weight_and_bias(linear: fx.Node) -> list:
    b = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return [linear.args[1]] + ([b] if b is not None else [])


def _keeps_channels(node: fx.Node) -> bool:
    """A cast (``float``, ``to``, ``type_as``) or a move that keeps channel ``c`` at channel ``c``."""
    return (node.op == "call_method" and node.target in CAST_METHODS) or keeps_last_axis(node, node.args[0])


def _producer(x: fx.Node) -> fx.Node:
    while is_move(x) and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    return x


def _is_step_output(v: fx.Node) -> bool:
    """True when ``v`` (attention's V, up to moves) is also returned by the step: a KV cache."""
    while is_move(v) and isinstance(v.args[0], fx.Node):
        v = v.args[0]
    frontier = [v]
    for node in frontier:
        for u in node.users:
            if u.op == "output":
                return True
            if (is_move(u) or u.target in (torch.stack, torch.cat)) and u not in frontier:
                frontier.append(u)
    return False


@register
class QuaRot(Pass):
    """Options: ``online`` (rotate the inputs that cannot fold, with a run-time MatMul); ``seed`` of the
    random signs."""

    name = "quarot"
    preserves_numerics = True
    online: bool = True
    residual: bool = True
    seed: int = 0

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        g = gm.graph
        quantized = {s for s, site in ctx.sites.items() if site.kind == "linear" and not site.excluded_by}
        by_sink = {}
        offline = []
        regions = find_regions(gm, ctx)
        residual = self._rotate_residual(gm, [r for r in regions if r.source.kind == "rmsnorm"])
        for region in regions:
            if region.source.kind == "rmsnorm" and residual.get("rotated"):
                offline.append(region.name)
                continue
            sinks = [s for s in region.sink_sites if s in quantized]
            if not sinks:
                continue
            if region.source.kind == "linear":
                q = random_hadamard(region.channels, self.seed)
                src = region.source.node
                w_a = src.args[1].target
                b_a = ensure_linear_bias(gm, src)
                assign(gm, w_a, q.T @ get_attr(gm, w_a).double())
                assign(gm, b_a, q.T @ get_attr(gm, b_a).double())
                for sink in region.sinks:
                    assign(gm, sink.args[1].target, get_attr(gm, sink.args[1].target).double() @ q)
                offline.append(region.name)
                continue
            reason = _NORM_REASONS.get(region.source.kind, region.source.kind)
            if region.source.kind == "rmsnorm":
                reason += f" ({residual['reason']})"
            for s in sinks:
                by_sink[s] = reason
        rotated_offline = {s for name in offline for s in name.split(" -> ")[1].split("+")}
        groups: dict[fx.Node, list[fx.Node]] = {}
        for node in g.nodes:
            site = node.meta.get("site")
            if site in quantized and is_linear(node) and site not in rotated_offline:
                groups.setdefault(node.args[0], []).append(node)
        online, blocked_adaln = {}, []
        for x, linears in groups.items():
            sites = [n.meta["site"] for n in linears]
            reason = next((by_sink[s] for s in sites if s in by_sink), None)
            if reason is None:
                p = _producer(x)
                if p.meta.get("site") in ctx.sites and ctx.sites[p.meta["site"]].kind == "matmul":
                    reason = (f"input comes from the attention output ({p.meta['site']}): "
                              + ("V is stored in the KV cache (a step output), so v -> proj cannot be rotated offline"
                                 if _is_step_output(p.args[1]) else "the per-head v -> proj rotation is not folded offline here"))
                else:
                    reason = f"input comes from {describe(p)}, not a linear or a norm a rotation folds into"
            if reason.startswith("AdaLN"):
                blocked_adaln += sites
            for s in sites:
                online[s] = reason
            if not self.online:
                continue
            n = get_attr(gm, linears[0].args[1].target).shape[1]
            q = random_hadamard(n, self.seed)
            target = set_buffer(gm, f"{sites[0]}.input_rotation", q.float())
            with g.inserting_before(linears[0]):
                rot = g.call_function(torch.matmul, (x, g.get_attr(target)))
            rot.meta["nn_module_stack"] = dict(linears[0].meta.get("nn_module_stack") or {})
            for lin in linears:
                lin.replace_input_with(x, rot)
                assign(gm, lin.args[1].target, get_attr(gm, lin.args[1].target).double() @ q)
        if blocked_adaln:
            note = (f"quarot: AdaLN blocks the residual-stream rotation at {', '.join(blocked_adaln)}: "
                    + ("online Hadamard there" if self.online else "left unrotated (online=false)"))
            if note not in ctx.notes:
                ctx.notes.append(note)
        g.lint()
        gm.recompile()
        return PassResult(gm, bool(offline) or (self.online and bool(online)),
                          {"offline": offline, "online" if self.online else "unrotated": online,
                           "blocked_by_adaln": blocked_adaln, "residual": residual})

    def _rotate_residual(self, gm, norm_regions: list) -> dict:
        """The offline residual-stream rotation of an RMSNorm model (module docstring); its stats."""
        if not self.residual:
            return {"rotated": False, "reason": "residual=false"}
        plan, reason = _residual_plan(gm, norm_regions)
        if plan is None:
            return {"rotated": False, "reason": reason}
        q = random_hadamard(norm_regions[0].channels, self.seed)
        for region in norm_regions:  # the gain into the readers, then the readers take x Q
            gain = get_attr(gm, region.source.weight).double()
            for sink in region.sinks:
                w = sink.args[1].target
                assign(gm, w, get_attr(gm, w).double() * gain @ q)
            assign(gm, region.source.weight, torch.ones_like(gain))
        for lin in plan["writers"]:  # weight rows and bias: Q^T W, Q^T b
            for t in _weight_and_bias(lin):
                assign(gm, t.target, q.T @ get_attr(gm, t.target).double())
        for table in plan["tables"]:
            assign(gm, table, get_attr(gm, table).double() @ q)
        return {"rotated": True, "norms": [r.source.path for r in norm_regions],
                "writers": [lin.meta.get("site", lin.name) for lin in plan["writers"]], "embeddings": plan["tables"]}
