"""``CudaStep``: a lowered step graph (``lower-cuda``) as the drivers' ``step`` callable, on CUDA graphs.

``step = CudaStep(lowered_gm)`` takes and returns what the traced step module does
(``frontends/var.py``'s ``sample_tokens(model, labels, step=step)``, the LlamaGen/PAR/RAR
``generate(..., step=step)``, ``tools.generate``): floating inputs arrive in float32 on any device
and run in fp16 on the GPU; floating outputs come back as float32 on the step's device, as fresh
tensors, except the KV caches on CUDA (below).

With ``cuda_graphs=True`` (the default on CUDA) each distinct input signature (shapes and
dtypes: one per VAR scale; LlamaGen's prefill and its decode step) is captured once, after a
warm-up on a side stream (which also compiles and autotunes the Triton kernels), into a CUDA
graph with static input buffers; a call copies its inputs into them and replays. All graphs share
one memory pool: they never run concurrently and each replay's outputs are copied out before the
next. The KV caches are updated in place (``kv_cache.in_place_caches``): each cache lives in one
buffer, in the run dtype, shared by every graph, and is returned as the cache output; passing it
back (as the samplers do) costs no copy, and the next call overwrites it. Attention over the caches
reads only their visible prefix when a signature's mask hides the same trailing keys from every query
(VAR, Infinity: ``kv_cache.visible_prefix_attention``); a later call of that signature with another mask
(a LlamaGen decode position) recaptures it with the mask. ``kv_cache="int8"`` keeps the caches as int8 codes
with a scale per cached row (``kv_cache.int8_caches``): half the bytes attention reads; the returned cache is
then those codes, to pass back as is (a float cache passed in, such as a sampler's first, is quantized into the
buffer). With ``fuse_attention_out`` an attention over the caches whose output the next linear quantizes runs our
Triton kernel, which writes that linear's input codes (``kv_cache.attention_into_codes``); else cuDNN's SDPA (float
caches) and a quantize kernel. Off CUDA the graph runs eagerly (in float32 unless ``dtype`` says otherwise), stays
functional, and keeps float caches.
``compile=True`` (CUDA) runs the graph through torch.compile first, so the float ops between the kernels
fuse as they do in a compiled FP16 model; the kernels stay opaque operators.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_map

from backends.cuda.kv_cache import (attention_into_codes, in_place_caches, int8_caches, qkv_into_caches, visible_keys,
                                    visible_prefix, visible_prefix_attention)
from backends.cuda.lower import to_device
from backends.cuda.reference import kv_quantize
from core.errors import UserError

WARMUP_RUNS = 3


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list
    outputs: object
    visible: int | None = None  # keys attended without the mask, read at capture
    mask: torch.Tensor | None = None  # the mask it was captured with (when ``visible``)
    mask_id: tuple | None = None  # the caller's mask tensor last seen equal to it


def _identity(t: torch.Tensor) -> tuple:
    """Same storage, view and version: the same values, without reading them."""
    return t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t._version


class CudaStep:
    """``CudaStep(gm, device=None, dtype=None, cuda_graphs=True)``: ``gm`` is a lowered graph, which it moves
    and casts in place (``lower.to_device``); ``device`` defaults to CUDA when there is one, ``dtype`` to fp16
    on CUDA and float32 elsewhere. With CUDA graphs the KV caches are updated in place (``kv_cache``: their
    format) and, with ``fuse_qkv``, written by the qkv projections' epilogues (``kv_cache.qkv_into_caches``);
    ``fuse_attention_out``: attention writes the output projection's input codes."""

    def __init__(self, gm: fx.GraphModule, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, cuda_graphs: bool = True, compile: bool = False,
                 float_outputs: bool = True, kv_cache: str = "float", fuse_qkv: bool = True,
                 fuse_attention_out: bool = True):
        if kv_cache not in ("float", "int8"):
            raise UserError(f"kv_cache must be 'float' or 'int8', got {kv_cache!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.gm = to_device(gm, self.device, self.dtype).eval()
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # {input index: output index} of the KV caches, updated in place and kept in self._state
        self.state = in_place_caches(self.gm) if self.cuda_graphs else {}
        self._state: dict[tuple, torch.Tensor] = {}  # (input index, shape) -> the cache's buffer
        self.mask = visible_prefix_attention(self.gm) if self.state else None  # the mask input's index
        # the qkv projections' epilogues write k and v into the (float) caches
        self.qkv_fused = qkv_into_caches(self.gm) if fuse_qkv and self.state and kv_cache == "float" else 0
        # the cache input behind each appended scales input, when the caches are int8
        self.kv_scales = int8_caches(self.gm, self.state) if kv_cache == "int8" and self.state else []
        if kv_cache == "int8" and self.cuda_graphs and not self.kv_scales:
            raise UserError("this step's KV caches cannot be kept in int8 (no in-place caches read only by the "
                            "attention over their visible prefix)")
        self._scales: dict[tuple, torch.Tensor] = {}  # (cache input index, shape) -> its scales' buffer
        self.attention_fused = attention_into_codes(self.gm) if fuse_attention_out and self.state else 0
        self.float_outputs = float_outputs  # False: outputs stay in the run dtype (a bench times the step alone)
        # compile: inductor fuses the float ops between the kernels (they are opaque operators to it)
        self.run = self.gm
        if compile and self.device.type == "cuda":
            from backends.torch_target import compiled

            self.run = compiled(self.gm)
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    def _convert(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def _returned(self, outputs):
        """Float32 copies of floating outputs (with ``float_outputs``), clones of the others; the caches as
        they are."""
        state = {id(t) for t in self._state.values()}
        return tree_map(lambda t: t if id(t) in state else t.float() if self.float_outputs and t.is_floating_point()
                        and t.dtype != torch.float32 else t.clone(), outputs)

    @torch.no_grad()
    def __call__(self, *inputs):
        if not self.cuda_graphs:
            outputs = self.run(*map(self._convert, inputs))
            return tree_map(lambda t: t.float() if self.float_outputs and t.is_floating_point() else t, outputs)
        # a cache is keyed by its shape alone: the sampler's first (float) and the returned buffer share a graph
        key = tuple(((tuple(t.shape), "cache") if i in self.state else (tuple(t.shape), t.dtype))
                    if isinstance(t, torch.Tensor) else t for i, t in enumerate(inputs))
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(inputs)
        elif captured.visible is not None and not self._same_mask(captured, inputs[self.mask]):
            captured = self._graphs[key] = self._capture(inputs, prefix=False)
        for i, (static, t) in enumerate(zip(captured.inputs, inputs)):
            if isinstance(t, torch.Tensor) and t is not static:
                if i in self.state:
                    self._load_cache(i, t, static)
                else:
                    static.copy_(t)  # converts to the static buffer's device and dtype
        captured.graph.replay()
        return self._returned(captured.outputs)

    def _static(self, i: int, t):
        """The static buffer of input ``i``: a copy, or for a cache the one buffer all graphs share."""
        if not isinstance(t, torch.Tensor):
            return t
        if i not in self.state:
            return self._convert(t).clone()
        key = (i, tuple(t.shape))
        buf = self._state.get(key)
        if buf is None:
            dtype = torch.int8 if i in self.kv_scales else self.dtype
            buf = self._state[key] = torch.empty(t.shape, dtype=dtype, device=self.device)
            if i in self.kv_scales:
                self._scales[key] = torch.empty(t.shape[:-1], dtype=torch.float32, device=self.device)
        if t is not buf:
            self._load_cache(i, t, buf)
        return buf

    def _load_cache(self, i: int, t: torch.Tensor, buf: torch.Tensor) -> None:
        """A cache the caller passes that is not the buffer: copied in, or quantized in for an int8 cache."""
        if i not in self.kv_scales:
            buf.copy_(t)
            return
        if not t.is_floating_point():
            raise UserError(f"input {i}: an int8 KV cache that is not this step's own buffer (its scales are "
                            f"unknown); pass back the cache the step returned, or a float cache")
        scale_buf = self._scales[i, tuple(t.shape)]
        # a layer at a time: the float32 temporaries of a whole VAR-d16 cache at batch 64 (2.9 GB in fp16) took
        # 16 GB at a generation's first step (H100, BENCHMARKS.md)
        for layer in range(t.shape[0]):
            codes, scales = kv_quantize(t[layer].to(self.device))
            buf[layer].copy_(codes)
            scale_buf[layer].copy_(scales)

    def _same_mask(self, captured: _Captured, t: torch.Tensor) -> bool:
        if _identity(t) == captured.mask_id:
            return True
        if not torch.equal(t.to(captured.mask.device, captured.mask.dtype), captured.mask):  # reads it: a sync
            return False
        captured.mask_id = _identity(t)
        return True

    def _capture(self, inputs, prefix: bool = True) -> _Captured:
        static = [self._static(i, t) for i, t in enumerate(inputs)]
        static += [self._scales[i, tuple(inputs[i].shape)] for i in self.kv_scales]
        mask = inputs[self.mask] if prefix and self.mask is not None else None
        visible = None if mask is None else visible_prefix(mask)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with visible_keys(visible):
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.run(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self.run(*static)
        if visible is None:
            return _Captured(graph, static, outputs)
        return _Captured(graph, static, outputs, visible, mask.clone(), _identity(mask))


def chained(step: CudaStep):
    """``step`` called as a sampler calls it, for a benchmark that repeats one input: a cache input that is
    the same tensor as last call's is replaced by the cache that call returned (no copy, as in a
    generation); any other input goes in as given."""
    last: dict[int, tuple] = {}  # input index -> (the tensor given last call, the cache it returned)

    def run(inputs):
        args = [last[i][1] if i in last and last[i][0] is t else t for i, t in enumerate(inputs)]
        outputs = step(*args)
        last.update({i: (inputs[i], outputs[j]) for i, j in step.state.items()})
        return outputs

    return run
