"""KV caches on the GPU: updated in place instead of rebuilt by every step, and attended over their visible
prefix instead of through a mask.

The traced step is functional, as ONNX needs it: block ``i`` writes its new keys with
``k_cache[i].index_copy(2, positions, k)`` and the step returns ``torch.stack`` of the updated
caches. On a GPU that costs two full copies of the cache per step (the stack, and a CUDA graph's copy
of its inputs into static buffers): 11.5 of 51 ms of a VAR-d16 step at batch 64 on an H100.

``in_place_caches(gm)`` rewrites those writes as ``kv_write`` (an operator that mutates its input, which
torch.compile keeps in place on the graph input) and returns the input itself as the output. It
returns ``{input index: output index}`` of the caches it rewrote, so that ``CudaStep`` keeps each cache
in one buffer that the caller passes back: a step then writes only its own tokens' rows.

The caches are fixed-size (the whole sequence), and an additive mask hides the rows not yet written. A
VAR/Infinity step's mask is the same for every query row: the first ``n`` keys visible, the rest ``-inf``
(all keys at the last scale). SDPA with that mask took 0.44 ms a block at VAR-d16 batch 64 on an H100
against 0.29 ms for the same shape without one. ``visible_prefix_attention(gm)`` makes every SDPA over
the caches a ``cached_attention`` call, which attends to the first ``n`` keys without a mask when
``CudaStep`` captures the graph of a signature whose mask ``visible_prefix`` finds to be such a prefix
(``n`` is read at capture: a CUDA graph replays the kernels it recorded), and with the mask otherwise.
"""
from __future__ import annotations

import contextlib
import contextvars
import operator

import torch
import torch.nn.functional as F
from torch import fx

from backends.cuda import ops, reference
from backends.cuda.lower import _is, _only_user, gemm_input, qlinear
from passes.infra import get_attr

Tensor = torch.Tensor


@torch.library.custom_op("arvgq_cuda::kv_write", mutates_args=("cache",))
def kv_write(cache: Tensor, dim: int, index: Tensor, value: Tensor) -> None:
    """``cache.index_copy_(dim, index, value)``; the usual ``[B, H, L, D]`` cache written along L by a kernel
    (``aten.index_copy_`` reached 1 TB/s on a VAR-d16 step's strided keys on an H100)."""
    if dim == 2 and cache.dim() == 4 and cache.stride(3) == 1:
        ops.kv_write(cache, index, value)
    else:
        cache.index_copy_(dim, index, value.to(cache.dtype))


@kv_write.register_fake
def _(cache, dim, index, value):
    return None


kv_write = torch.ops.arvgq_cuda.kv_write.default


def _index_copy_of(node, placeholder: fx.Node, i: int) -> bool:
    """``placeholder[i].index_copy(dim, index, value)`` (as a method or ``torch.index_copy``)."""
    if not (isinstance(node, fx.Node) and len(node.args) == 4 and not node.kwargs and (
            (node.op == "call_method" and node.target == "index_copy")
            or (node.op == "call_function" and node.target is torch.index_copy))):
        return False
    src = node.args[0]
    return (isinstance(src, fx.Node) and src.op == "call_function" and src.target is operator.getitem
            and src.args == (placeholder, i))


def _stacked_cache(out) -> fx.Node | None:
    """The placeholder whose per-layer updates ``out`` stacks, if ``out`` is ``torch.stack([P[0].index_copy(...),
    P[1].index_copy(...), ...])`` over every layer of ``P`` in order."""
    if not (isinstance(out, fx.Node) and out.op == "call_function" and out.target is torch.stack
            and out.kwargs.get("dim", out.args[1] if len(out.args) > 1 else 0) == 0):
        return None
    parts = out.args[0]
    if not parts or not isinstance(parts[0], fx.Node) or not parts[0].args:
        return None
    src = parts[0].args[0]
    p = src.args[0] if isinstance(src, fx.Node) and src.target is operator.getitem else None
    if not (isinstance(p, fx.Node) and p.op == "placeholder"):
        return None
    if not all(_index_copy_of(n, p, i) for i, n in enumerate(parts)):
        return None
    shape = p.meta.get("tensor_meta").shape if p.meta.get("tensor_meta") is not None else None
    if shape is not None and shape[0] != len(parts):
        return None  # a partial stack would drop layers
    return p


def in_place_caches(gm: fx.GraphModule) -> dict[int, int]:
    """Rewrite the stacked caches of ``gm`` (its output a tuple) to update their input in place; returns
    ``{input index: output index}`` of the rewritten ones (empty when the graph has none)."""
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    output = next(n for n in g.nodes if n.op == "output")
    outs = output.args[0]
    if not isinstance(outs, (tuple, list)):
        return {}
    state, new_outs = {}, list(outs)
    for j, out in enumerate(outs):
        p = _stacked_cache(out)
        if p is None or placeholders.index(p) in state:
            continue
        for n in list(out.args[0]):
            view, dim, index, value = n.args
            with g.inserting_before(n):
                g.call_function(kv_write, (view, dim, index, value))
            n.replace_all_uses_with(view)  # readers (attention) see the view, updated in place
            g.erase_node(n)
        new_outs[j] = p
        state[placeholders.index(p)] = j
    if state:
        output.args = (type(outs)(new_outs),)
        g.eliminate_dead_code()
        gm.recompile()
    return state


# The visible key count of the signature being captured, or None: attend with the mask.
_VISIBLE: contextvars.ContextVar[int | None] = contextvars.ContextVar("visible_keys", default=None)


@contextlib.contextmanager
def visible_keys(n: int | None):
    """Within: ``cached_attention`` attends to the first ``n`` keys without its mask (``None``: with it)."""
    token = _VISIBLE.set(n)
    try:
        yield
    finally:
        _VISIBLE.reset(token)


@torch.library.custom_op("arvgq_cuda::cached_attention", mutates_args=())
def cached_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)``; under ``visible_keys(n)``
    the same over the first ``n`` keys, without the mask (equal when the mask is that prefix)."""
    n = _VISIBLE.get()
    if n is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k[..., :n, :], v[..., :n, :], scale=scale)
    # [B, H, T, D] laid out as [B, T, H, D], as the GPU's fused kernels write it (the math kernel on the CPU
    # does not): one layout for the compiler, and the step's transpose(1, 2).flatten(2) after it is free
    return out if out.transpose(1, 2).is_contiguous() else out.transpose(1, 2).contiguous().transpose(1, 2)


@cached_attention.register_fake
def _(q, k, v, mask, scale):
    B, H, T, _ = q.shape
    return q.new_empty((B, T, H, v.shape[-1])).transpose(1, 2)


cached_attention = torch.ops.arvgq_cuda.cached_attention.default


def visible_prefix_attention(gm: fx.GraphModule) -> int | None:
    """Rewrite every SDPA over a cache input (``P[i]``) with one mask input into ``cached_attention``; returns
    that mask's input index, or None (and leaves ``gm`` as it was) unless every such SDPA reads the same
    mask input and takes no other options."""
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]

    def cache_view(n) -> bool:
        return (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem
                and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder")

    found = [n for n in g.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    masks = {n.kwargs.get("attn_mask") for n in found}
    if not found or len(masks) != 1 or not all(
            len(n.args) == 3 and set(n.kwargs) <= {"attn_mask", "scale"} and cache_view(n.args[1])
            and cache_view(n.args[2]) for n in found):
        return None
    mask = masks.pop()
    if not (isinstance(mask, fx.Node) and mask.op == "placeholder"):
        return None
    for n in found:
        scale = n.kwargs.get("scale")
        with g.inserting_before(n):
            new = g.call_function(cached_attention, (*n.args, mask, None if scale is None else float(scale)))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        g.erase_node(n)
    gm.recompile()
    return placeholders.index(mask)


def visible_prefix(mask: torch.Tensor) -> int | None:
    """``n`` when every row of ``mask [..., L]`` is ``0`` on its first ``n`` keys and ``-inf`` on the rest
    (``0 < n <= L``), else None."""
    rows = mask.reshape(-1, mask.shape[-1])
    row = rows[0]
    n = int((row == 0).sum())
    if n == 0 or not bool((rows == row).all()) or not bool((row[:n] == 0).all()):
        return None
    return n if bool((row[n:] == float("-inf")).all()) else None


# ------------------------------------------------------------------------------- qkv into the caches
# After ``in_place_caches``, an attention whose qkv projection is a lowered ``qlinear`` reads it back to split the
# heads, L2-normalize q and k (VAR's cosine attention), scale q per head, and copy k and v into the caches: two
# kernels and two cache writes that read the projection's [M, 3C] output again (3.1 of 28.8 ms of a VAR-d16
# step at batch 64 on an H100). ``qkv_into_caches(gm)`` gives that work to the GEMM's epilogue: ``qlinear_qkv``
# writes q, and k and v straight into the caches.

@torch.library.custom_op("arvgq_cuda::qlinear_qkv", mutates_args=("k_cache", "v_cache"))
def qlinear_qkv(a: Tensor, w: Tensor, w_scale: Tensor, colsum: Tensor, a_scale: Tensor, a_zero: Tensor,
                bias: Tensor | None, groups: Tensor | None, k_cache: Tensor, v_cache: Tensor, index: Tensor,
                gain: Tensor | None, normalize: bool, eps: float, min_rows: int = 0, a_inv_scale: Tensor | None = None,
                in_qmin: int = -128, in_qmax: int = 127) -> Tensor:
    """``qlinear`` of an attention's projection ``[B, T, K] -> [B, T, 3C]``, then ``reference.qkv_heads``: k and v
    written into the ``[B, H, L, D]`` caches at ``index``; returns q as ``[B, H, T, D]``."""
    B, T, k = a.shape
    _, H, _, D = k_cache.shape
    per_head = gain is None or (gain.numel() == H and gain.shape[-2:] in ((1, 1), (H, 1)))
    a2 = a.reshape(-1, k)
    kernel = ops.runs_kernels(a)  # the reference takes any shape; a kernel needs a tile (and, on CUDA, rows)
    if per_head and (not kernel or (not a.is_cuda or B * T > min_rows) and _qkv_tile(B * T, w.shape[0], D, a.device)):
        a2, a_inv_scale = gemm_input(a2, a_inv_scale, a_zero, groups, T, in_qmin, in_qmax, min_rows,
                                     w.dtype != torch.int8)
        q = ops.qgemm(a2, w, w_scale, colsum, a_scale, a_zero, bias, groups=groups, tokens=T, a_inv_scale=a_inv_scale,
                      in_qmin=in_qmin, in_qmax=in_qmax,
                      qkv=(k_cache, v_cache, index, None if gain is None else gain.reshape(-1), D, normalize, eps))
    else:  # few rows (a float GEMM), an odd head size or gain, or no GPU: the projection, then the torch ops
        y = qlinear(a, w, w_scale, colsum, a_scale, a_zero, bias, groups, min_rows=min_rows,
                    a_inv_scale=a_inv_scale, in_qmin=in_qmin, in_qmax=in_qmax).reshape(B * T, -1)
        q = reference.qkv_heads(y, T, k_cache, v_cache, index, None, D, normalize, eps)
        if gain is not None:  # as the traced step multiplies it: broadcast over [B, H, T, D]
            return (q.reshape(B, T, H, D).transpose(1, 2) * gain).to(k_cache.dtype)
    return q.reshape(B, T, H, D).transpose(1, 2)


def _qkv_tile(m: int, n: int, head_dim: int, device) -> bool:
    from backends.cuda import kernels  # noqa: PLC0415 (CPU-only runs never import triton)

    return kernels.qkv_config(m, n, head_dim, device) is not None


@qlinear_qkv.register_fake
def _(a, w, w_scale, colsum, a_scale, a_zero, bias, groups, k_cache, v_cache, index, gain, normalize, eps, min_rows=0,
      a_inv_scale=None, in_qmin=-128, in_qmax=127):
    B, T, _ = a.shape
    _, H, _, D = k_cache.shape
    return k_cache.new_empty((B, T, H, D)).transpose(1, 2)


qlinear_qkv = torch.ops.arvgq_cuda.qlinear_qkv.default


def _normalized(n: fx.Node) -> tuple[fx.Node, float | None]:
    """``(F.normalize(n, dim=-1) or n, its eps or None)``: the L2 normalization over the head when n has it."""
    u = _only_user(n)
    if _is(u, F.normalize) and u.args[0] is n and len(u.args) == 1 and u.kwargs.get("p", 2.0) == 2.0 and \
            u.kwargs.get("dim", 1) == -1:
        return u, float(u.kwargs.get("eps", 1e-12))
    return n, None


def _qkv_match(lin: fx.Node) -> dict | None:
    """``qlinear(...).unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)`` whose k and v (k optionally
    L2-normalized, then q too, q optionally times a gain) only go into ``kv_write(cache, 2, index, .)``."""
    kw = lin.kwargs
    if kw.get("gelu") or kw.get("swiglu") or kw.get("out_inv_scale") is not None:
        return None
    uf = _only_user(lin)
    if not (_is(uf, "unflatten") and len(uf.args) == 3 and uf.args[1] == -1
            and isinstance(uf.args[2], (tuple, list)) and len(uf.args[2]) == 3 and uf.args[2][0] == 3):
        return None
    perm = _only_user(uf)
    if not (_is(perm, "permute") and tuple(perm.args[1:]) == (2, 0, 3, 1, 4)):
        return None
    ub = _only_user(perm)
    if not (_is(ub, "unbind") and tuple(ub.args[1:]) in ((), (0,)) and not ub.kwargs):
        return None
    parts = {u.args[1]: u for u in ub.users if _is(u, operator.getitem)}
    if sorted(parts) != [0, 1, 2] or len(ub.users) != 3:
        return None
    q, q_eps = _normalized(parts[0])
    k, k_eps = _normalized(parts[1])
    if q_eps != k_eps:
        return None
    gain, mul = None, _only_user(q)
    if _is(mul, operator.mul) and len(mul.args) == 2 and mul.args[0] is q and isinstance(mul.args[1], fx.Node):
        q, gain = mul, mul.args[1]
    writes = [_only_user(k), _only_user(parts[2])]
    if not all(_is(wr, kv_write) and wr.args[1] == 2 and wr.args[3] is v for wr, v in zip(writes, (k, parts[2]))):
        return None
    if writes[0].args[2] is not writes[1].args[2]:  # one index: the kernel writes both at the same positions
        return None
    return {"q": q, "gain": gain, "writes": writes, "eps": q_eps}


def qkv_into_caches(gm: fx.GraphModule) -> int:
    """Rewrite each attention ``_qkv_match`` finds into one ``qlinear_qkv``; returns how many."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    done = 0
    for lin in [n for n in g.nodes if n.op == "call_function" and n.target is qlinear]:
        m = _qkv_match(lin)
        if m is None:
            continue
        (k_write, v_write), q = m["writes"], m["q"]
        first = min(k_write, v_write, *q.users, key=order.__getitem__)
        inputs = [*lin.all_input_nodes, k_write.args[0], v_write.args[0], k_write.args[2]] + \
            ([m["gain"]] if m["gain"] is not None else [])
        if any(order[i] >= order[first] for i in inputs):
            continue
        kw = {k: v for k, v in lin.kwargs.items() if k in ("min_rows", "a_inv_scale", "in_qmin", "in_qmax")}
        with g.inserting_before(first):
            new = g.call_function(qlinear_qkv, (*lin.args[:8], k_write.args[0], v_write.args[0], k_write.args[2],
                                                m["gain"], m["eps"] is not None, m["eps"] or 0.0), kw)
        q.replace_all_uses_with(new)
        g.erase_node(k_write)
        g.erase_node(v_write)
        done += 1
    if done:
        g.eliminate_dead_code()
        gm.recompile()
    return done


# ------------------------------------------------------------------------------------- int8 caches
# ``int8_caches(gm, state)`` (after the two rewrites above) stores the caches as int8 codes with a float32 scale
# per cached row (``reference.kv_quantize``): half the bytes that attention reads, the cost that grows with the
# sequence (LlamaGen's decode reads every cached row at every token). Each rewritten cache gains a scales
# input ``[layers, B, H, L]``, appended after the graph's inputs, that ``CudaStep`` keeps beside the cache.


@torch.library.custom_op("arvgq_cuda::kv_write_int8", mutates_args=("cache", "scale"))
def kv_write_int8(cache: Tensor, scale: Tensor, dim: int, index: Tensor, value: Tensor) -> None:
    """``kv_write`` into an int8 cache and its per-row scales (``reference.kv_write_int8``)."""
    if dim != 2:
        raise ValueError(f"an int8 cache is written along its positions (dim 2), not dim {dim}")
    ops.kv_write_int8(cache, scale, index, value)


@kv_write_int8.register_fake
def _(cache, scale, dim, index, value):
    return None


kv_write_int8 = torch.ops.arvgq_cuda.kv_write_int8.default


@torch.library.custom_op("arvgq_cuda::cached_attention_int8", mutates_args=())
def cached_attention_int8(q: Tensor, k: Tensor, k_scale: Tensor, v: Tensor, v_scale: Tensor, mask: Tensor,
                          scale: float | None) -> Tensor:
    """``cached_attention`` over int8 caches (``reference.attention`` with their scales): the visible prefix under
    ``visible_keys(n)``, else every key with the mask; ``[B, T, H, D]``-laid-out as ``cached_attention``."""
    n = _VISIBLE.get()
    return ops.attention(q, k, v, mask if n is None else None, n or k.shape[2], scale, k_scale=k_scale,
                         v_scale=v_scale).transpose(1, 2)


@cached_attention_int8.register_fake
def _(q, k, k_scale, v, v_scale, mask, scale):
    B, H, T, _ = q.shape
    return q.new_empty((B, T, H, v.shape[-1])).transpose(1, 2)


cached_attention_int8 = torch.ops.arvgq_cuda.cached_attention_int8.default


def int8_caches(gm: fx.GraphModule, state: dict[int, int]) -> list[int]:
    """Make the in-place caches of ``state`` (``in_place_caches``'s result, after ``visible_prefix_attention``)
    int8: every ``kv_write`` / ``cached_attention`` on them becomes its int8 form, reading a new scales input
    per cache. Returns the cache input index of each scales input, in the order they were appended; ``[]``
    (``gm`` unchanged) unless every use of every cache is one of those two (an SDPA the prefix rewrite left
    alone, a read of the cache by other ops, reads a float cache)."""
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    caches = [placeholders[i] for i in sorted(state)]
    views = {}  # getitem node -> (cache placeholder, layer)
    for p in caches:
        for u in p.users:
            if u.op == "output":
                continue
            if not (u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)):
                return []
            views[u] = (p, u.args[1])
    for v in views:
        for u in v.users:
            if u.target is kv_write and u.args[0] is v and v not in u.args[1:]:
                continue
            if u.target is cached_attention and v in u.args[1:3] and v not in (u.args[0], *u.args[3:]):
                continue
            return []
    if not views:
        return []
    scales = {}
    with g.inserting_after(placeholders[-1]):
        for p in reversed(caches):  # inserted right after the last input: reversed keeps the caches' order
            scales[p] = g.placeholder(f"{p.name}_scale")
    scale_views = {}
    for v, (p, layer) in views.items():
        with g.inserting_after(v):
            scale_views[v] = g.call_function(operator.getitem, (scales[p], layer))
    for n in list(g.nodes):
        if n.target is kv_write:
            cache, dim, index, value = n.args
            with g.inserting_before(n):
                g.call_function(kv_write_int8, (cache, scale_views[cache], dim, index, value))
            g.erase_node(n)
        elif n.target is cached_attention:
            q, k, v, mask, scale = n.args
            with g.inserting_before(n):
                new = g.call_function(cached_attention_int8, (q, k, scale_views[k], v, scale_views[v], mask, scale))
            new.meta.update(n.meta)
            n.replace_all_uses_with(new)
            g.erase_node(n)
    gm.recompile()
    return [placeholders.index(p) for p in caches]


# ------------------------------------------------------------------------------ attention into codes
# The output projection's input grid has no producer for ``lower-cuda`` to fuse it into: SDPA wrote the attention
# in fp16 and a quantize kernel read it back (0.5 of 23.9 ms of a VAR-d16 step at batch 64 on an H100).
# ``attention_into_codes(gm)`` (after the rewrites above) makes each such attention our Triton kernel, which
# quantizes its output rows onto that grid in its epilogue: the projection reads codes.

@torch.library.custom_op("arvgq_cuda::cached_attention_codes", mutates_args=())
def cached_attention_codes(q: Tensor, k: Tensor, v: Tensor, k_scale: Tensor | None, v_scale: Tensor | None,
                           mask: Tensor, scale: float | None, inv_scale: Tensor, zero: Tensor | None,
                           groups: Tensor | None, qmin: int, qmax: int, fp8: bool) -> Tensor:
    """``cached_attention`` (``cached_attention_int8`` with scales), its ``[B, T, C]`` output quantized onto the
    projection's grid (``reference.attention`` with ``out_inv_scale``): codes, never a float output."""
    n = _VISIBLE.get()
    out = ops.attention(q, k, v, mask if n is None else None, n or k.shape[2], scale, k_scale=k_scale,
                        v_scale=v_scale, out_inv_scale=inv_scale, out_zero=zero, groups=groups, qmin=qmin, qmax=qmax,
                        fp8=fp8)
    return out.flatten(2)


@cached_attention_codes.register_fake
def _(q, k, v, k_scale, v_scale, mask, scale, inv_scale, zero, groups, qmin, qmax, fp8):
    B, H, T, _ = q.shape
    return q.new_empty((B, T, H * v.shape[-1]), dtype=torch.float8_e4m3fn if fp8 else torch.int8)


cached_attention_codes = torch.ops.arvgq_cuda.cached_attention_codes.default


def _attention_args(n: fx.Node) -> tuple | None:
    """``(q, k, v, k_scale, v_scale, mask, scale)`` of a cached attention node, or None."""
    if n.target is cached_attention:
        q, k, v, mask, scale = n.args
        return q, k, v, None, None, mask, scale
    if n.target is cached_attention_int8:
        q, k, ks, v, vs, mask, scale = n.args
        return q, k, v, ks, vs, mask, scale
    return None


def attention_into_codes(gm: fx.GraphModule) -> int:
    """Rewrite each ``cached_attention(...).transpose(1, 2).flatten(2)`` (either cache format) read only by a
    ``qlinear`` that quantizes it (``a_inv_scale``) into ``cached_attention_codes`` on that grid, the
    ``qlinear`` then reading codes; returns how many."""
    g = gm.graph
    done = 0
    for att in [n for n in g.nodes if n.op == "call_function" and _attention_args(n) is not None]:
        t = _only_user(att)
        if not (_is(t, "transpose") and tuple(t.args[1:]) == (1, 2)):
            continue
        f = _only_user(t)
        if not (_is(f, "flatten") and tuple(f.args[1:]) == (2,) and not f.kwargs):
            continue
        lin = _only_user(f)
        if not (_is(lin, qlinear) and lin.args[0] is f and f not in lin.args[1:]
                and lin.kwargs.get("a_inv_scale") is not None):
            continue
        fp8 = get_attr(gm, lin.args[1].target).dtype != torch.int8
        kw = lin.kwargs
        with g.inserting_before(lin):
            codes = g.call_function(cached_attention_codes, (*_attention_args(att), kw["a_inv_scale"], lin.args[5],
                                                             lin.args[7], kw.get("in_qmin", -128),
                                                             kw.get("in_qmax", 127), fp8))
        lin.args = (codes, *lin.args[1:])
        lin.kwargs = {k: v for k, v in kw.items() if k not in ("a_inv_scale", "in_qmin", "in_qmax")}
        g.erase_node(f)
        g.erase_node(t)
        g.erase_node(att)
        done += 1
    if done:
        gm.recompile()
    return done
