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
correct, only slower. A flattened tile loop is one such: its accumulator reset is a select inside the loop.
(Turning that reset into the MMA's own flag with Triton's accumulator-init pass, and waiting at the top of the
epilogue, made flattened int8 tiles slower on an H100: fc1 0.47 against 0.34 ms, BENCHMARKS.md.)
``install()`` adds the rewrite to Triton's compile stages for sm90.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile

MARK = "tt.disallow_acc_multi_buffer"

_FOR = re.compile(r"^(\s*)(%[\w$.-]+)(?::(\d+))? = scf\.for .*iter_args\((.*?)\) -> ")
# operands a, b, c and, where Triton set one, the "use C" flag
_DOT = re.compile(r"^\s*(%[\w$.-]+) = ttng\.warp_group_dot (\S+), (\S+), (%[\w$.-]+(?:#\d+)?)(?:, %[\w$.-]+)? "
                  r".*-> (tensor<[^>]*xi32, #[\w]+>)")
_WAIT = re.compile(r"^\s*(%[\w$.-]+):\d+ = ttng\.warp_group_dot_wait (%[\w$.-]+), .*\{pendings = 0 : i32\}")
_LOADS = ("async_copy_global_to_local", "async_tma_copy_global_to_local", "local_store")


def _uses(name: str, line: str) -> int:
    return len(re.findall(re.escape(name) + r"(?![\w$.#-])", line))


def _rewrite_loop(lines: list[str], start: int, end: int, serial: int) -> bool:
    """Rewrites the loop ``lines[start]`` .. ``lines[end]`` (its closing line) in place, inserting one line after
    it; False (the loop untouched) where its shape is not the one this rewrite is proven for."""
    head = _FOR.match(lines[start])
    if head is None:
        return False
    indent, result, count, iter_args = head.groups()
    inner = indent + "  "
    body = [i for i in range(start + 1, end) if lines[i].startswith(inner) and not lines[i].startswith(inner + " ")]
    dots = [i for i in body if " ttng.warp_group_dot " in lines[i]]
    if len(dots) != 1 or dots[0] + 1 not in body:
        return False
    dot, wait = dots[0], dots[0] + 1
    d, w = _DOT.match(lines[dot]), _WAIT.match(lines[wait])
    if d is None or w is None or w.group(2) != d.group(1):
        return False
    acc_type, waited = d.group(5), w.group(1) + "#0"
    yields = [i for i in body if lines[i].lstrip().startswith("scf.yield ")]
    if len(yields) != 1:
        return False
    operands = [o.strip() for o in lines[yields[0]].split("scf.yield ", 1)[1].split(" : ", 1)[0].split(",")]
    if operands.count(waited) != 1:
        return False
    p = operands.index(waited)
    args = re.findall(r"(%[\w$.-]+) = ", iter_args)
    if len(args) != len(operands) or d.group(4) != args[p] or (not count and p != 0):
        return False
    span = range(start + 1, end)
    # Nothing reads the accumulator while its MMA may run: the next dot takes it as C, the yield passes it on.
    # (A flattened tile loop fails this: its accumulator reset is a select in the loop.)
    if sum(_uses(args[p], lines[i]) for i in span) != 1 or sum(_uses(waited, lines[i]) for i in span) != 1:
        return False
    # the dot of step i - 1 reads its stage's buffers until the wait: no load may refill them before it
    if any(op in lines[i] for i in range(start + 1, wait) for op in _LOADS):
        return False
    final = f"{result}#{p}" if count else result
    done = f"%arvgq_mma{serial}"
    for i in range(end + 1, len(lines)):
        lines[i] = re.sub(re.escape(final) + r"(?![\w$.#-])", done, lines[i])
    lines.insert(end + 1, f"{indent}{done} = ttng.warp_group_dot_wait {final} {{pendings = 0 : i32}} : {acc_type}")
    lines[wait] = lines[wait].replace("{pendings = 0 : i32}", "{pendings = 1 : i32}")
    return True


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
            if start is not None and _rewrite_loop(lines, start, i, done):
                done += 1
                i += 1  # the inserted wait
        i += 1
    return "\n".join(lines), done


def _key():
    with open(__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return f"arvgq-async-int8-wgmma-{digest}", digest


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
