"""Hopper's int8 MMAs kept in flight across the K loop, which Triton does not do by itself.

Triton's pipeliner makes a ``warp_group_dot`` "properly async" (the next one is issued while this one runs,
``wgmma.wait_group 1``) only when its accumulator is fp32; an int32 accumulator gets ``wait_group 0`` after
every K step, so each step drains the tensor cores before the next is issued (Triton 3.6 to 3.9 alike). The
hardware has no such rule: int8 ``wgmma`` chains on its accumulator as fp16 does. This module rewrites the
TritonGPU IR of loops that ask for it, the same way the pipeliner rewrites fp32 ones: the wait in the loop
becomes ``pendings = 1``, and a ``pendings = 0`` wait is put right after the loop, before anything reads the
accumulator (or reuses its shared-memory operands).

A loop asks with ``tl.range(..., disallow_acc_multi_buffer=True)``: the attribute survives to the TritonGPU IR
and means nothing for a register accumulator on Hopper. Only loops of exactly the shape the pipeliner gives
its own async dots are rewritten (one dot, its wait right after it, the accumulator used only by the dot and
the loop's yield, the operand loads after the wait); any other loop is left as Triton wrote it, which is
correct, only slower. ``install()`` adds the rewrite to Triton's compile stages for sm90.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile

MARK = "tt.disallow_acc_multi_buffer"

_FOR = re.compile(r"^(\s*)(%[\w$.-]+)(?::(\d+))? = scf\.for .*iter_args\((.*?)\) -> ")
# operands a, b, c and, after the accumulator-init pass, the "use C" flag
_DOT = re.compile(r"^\s*(%[\w$.-]+) = ttng\.warp_group_dot (\S+), (\S+), (%[\w$.-]+(?:#\d+)?)(?:, %[\w$.-]+)? "
                  r".*-> (tensor<[^>]*xi32, #[\w]+>)")
_WAIT = re.compile(r"^\s*(%[\w$.-]+):\d+ = ttng\.warp_group_dot_wait (%[\w$.-]+), .*\{pendings = 0 : i32\}")
_LOADS = ("async_copy_global_to_local", "async_tma_copy_global_to_local", "local_store")


def _uses(name: str, line: str) -> int:
    return len(re.findall(re.escape(name) + r"(?![\w$.#-])", line))


def _regions(lines: list[str], body: list[int], after: int, inner: str) -> list[tuple[int, int]]:
    """The regions (first line, closing line) of the ``scf.if`` ops at the loop body's level after line ``after``:
    then and else each."""
    regions = []
    for i in body:
        if i > after and " scf.if " in f" {lines[i].strip()}" and lines[i].endswith("{"):
            first = i
            for j in range(i + 1, len(lines)):
                if lines[j].startswith(inner + "}"):
                    regions.append((first, j))
                    if not lines[j].rstrip().endswith("else {"):
                        break
                    first = j
    return regions


def _rewrite_loop(lines: list[str], start: int, end: int, serial: int) -> int:
    """Rewrites the loop ``lines[start]`` .. ``lines[end]`` (its closing line) in place and returns how many
    lines it inserted; 0 (the loop untouched) where its shape is not the one this rewrite is proven for."""
    head = _FOR.match(lines[start])
    if head is None:
        return 0
    indent, result, count, iter_args = head.groups()
    inner = indent + "  "
    body = [i for i in range(start + 1, end) if lines[i].startswith(inner) and not lines[i].startswith(inner + " ")]
    dots = [i for i in body if " ttng.warp_group_dot " in lines[i]]
    if len(dots) != 1 or dots[0] + 1 not in body:
        return 0
    dot, wait = dots[0], dots[0] + 1
    d, w = _DOT.match(lines[dot]), _WAIT.match(lines[wait])
    if d is None or w is None or w.group(2) != d.group(1):
        return 0
    acc_type, waited = d.group(5), w.group(1) + "#0"
    yields = [i for i in body if lines[i].lstrip().startswith("scf.yield ")]
    if len(yields) != 1:
        return 0
    operands = [o.strip() for o in lines[yields[0]].split("scf.yield ", 1)[1].split(" : ", 1)[0].split(",")]
    if operands.count(waited) != 1:
        return 0
    p = operands.index(waited)
    args = re.findall(r"(%[\w$.-]+) = ", iter_args)
    if len(args) != len(operands) or d.group(4) != args[p] or (not count and p != 0):
        return 0
    span = range(start + 1, end)
    # Nothing reads the accumulator while its MMA may run: the next dot takes it as C, the yield passes it on;
    # any other reader sits in an ``scf.if`` (a flattened loop's epilogue) that first waits for it.
    if sum(_uses(args[p], lines[i]) for i in span) != 1:
        return 0
    regions = [r for r in _regions(lines, body, wait, inner)
               if any(_uses(waited, lines[i]) for i in range(r[0] + 1, r[1]))]
    readers = {i for i in span if _uses(waited, lines[i])} - {yields[0]}
    if _uses(waited, lines[yields[0]]) != 1 or any(not any(a < i < b for a, b in regions) for i in readers):
        return 0
    # the dot of step i - 1 reads its stage's buffers until the wait: no load may refill them before it
    if any(op in lines[i] for i in range(start + 1, wait) for op in _LOADS):
        return 0
    final = f"{result}#{p}" if count else result
    done = f"%arvgq_mma{serial}"
    for i in range(end + 1, len(lines)):
        lines[i] = re.sub(re.escape(final) + r"(?![\w$.#-])", done, lines[i])
    lines.insert(end + 1, f"{indent}{done} = ttng.warp_group_dot_wait {final} {{pendings = 0 : i32}} : {acc_type}")
    for k, (a, b) in sorted(enumerate(regions), key=lambda r: -r[1][0]):
        name = f"{done}_{k}"
        for i in range(a + 1, b):
            lines[i] = re.sub(re.escape(waited) + r"(?![\w$.#-])", name, lines[i])
        lines.insert(a + 1, f"{inner}  {name} = ttng.warp_group_dot_wait {waited} {{pendings = 0 : i32}} : {acc_type}")
    lines[wait] = lines[wait].replace("{pendings = 0 : i32}", "{pendings = 1 : i32}")
    return 1 + len(regions)


def make_async(ttgir: str) -> tuple[str, int]:
    """The module's text with its marked int8 K loops' dots kept in flight, and how many loops were rewritten."""
    lines = ttgir.split("\n")
    done = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        if MARK in line and line.lstrip().startswith("}"):
            indent = line[:len(line) - len(line.lstrip())]
            start = next((j for j in range(i - 1, -1, -1) if lines[j].startswith(indent + "%")
                          and " = scf.for " in lines[j]), None)
            inserted = _rewrite_loop(lines, start, i, done) if start is not None else 0
            done += inserted > 0
            i += inserted
        i += 1
    return "\n".join(lines), done


def _key():
    with open(__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return f"arvgq-async-int8-wgmma-{digest}", digest


def _with_accumulator_flags(make, src, metadata):
    """``make`` with Triton's accumulator-init pass ahead of its software pipelining (Triton runs it for
    Blackwell only): a flattened tile loop's accumulator reset, a select the in-flight MMA would race, becomes the
    MMA's own "use C" flag."""
    from triton._C.libtriton import passes
    latencies = passes.ttgpuir.add_assign_latencies

    def flags_then_latencies(pm, *args):
        passes.ttgpuir.add_optimize_accumulator_init(pm)
        latencies(pm, *args)

    passes.ttgpuir.add_assign_latencies = flags_then_latencies
    try:
        return make(src, metadata)
    finally:
        passes.ttgpuir.add_assign_latencies = latencies


def install() -> bool:
    """Adds the rewrite to Triton's sm90 compile stages (chained after any hook already there); False where this
    Triton has no stage hook (the marked loops then stay synchronous)."""
    try:
        from triton import knobs
        from triton._C.libtriton import ir
    except ImportError:
        return False
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "add_stages_inspection_hook"):
        return False
    previous = runtime.add_stages_inspection_hook
    if getattr(previous, "arvgq_async_mma", False):
        return True
    key = _key()

    def hook(*args):
        if not args:  # Triton >= 3.7 asks for a cache key: kernels built with the rewrite are cached apart
            if previous is None:
                return key
            k, h = previous()
            return k + key[0], hashlib.sha256((h + key[1]).encode()).hexdigest()
        if previous is not None:
            previous(*args)
        stages, capability = args[-4], args[-1]
        if capability is None or capability // 10 != 9 or "ttgir" not in stages:
            return
        make = stages["ttgir"]

        def ttgir(src, metadata):
            if MARK in str(src):
                mod = _with_accumulator_flags(make, src, metadata)
            else:
                mod = make(src, metadata)
            text = str(mod)
            if MARK not in text:
                return mod
            new, n = make_async(text)
            if n == 0:
                return mod
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "kernel.ttgir")
                with open(path, "w") as f:
                    f.write(new)
                out = ir.parse_mlir_module(path, mod.context)
            out.context = mod.context
            return out

        stages["ttgir"] = ttgir

    hook.arvgq_async_mma = True
    runtime.add_stages_inspection_hook = hook
    return True
