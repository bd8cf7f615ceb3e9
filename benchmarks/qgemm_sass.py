"""The large-M ``qgemm`` tiles as ``ptxas`` compiles them for Hopper, no GPU needed: registers, spills, SASS.

    python benchmarks/qgemm_sass.py [--json FILE] [--arch 90]

Compiles VAR-d16's fc1 (bias, GELU, int8 output) and fc2 (bias, fp16 output) epilogues, and the bare GEMM, for
each tile with the plain and the TMA store, with the installed Triton and its bundled ``ptxas``/``cuobjdump``.
Counts are static (instructions in the binary, not executed ones): what they show is which tiles spill
registers to local memory (``STL``/``LDL``) and how much per-element work the store costs.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backends.cuda import kernels

T = kernels.tile_config
TILES = {"128x128 w4 s3 o2": T(128, 128, 128, 4, 3, persistent=True, tma=True, occupancy=2),
         "128x128 w8 s3 o1": T(128, 128, 128, 8, 3, persistent=True, tma=True)}
FLAGS = {"HAS_BIAS": True, "HAS_GROUPS": True, "GELU": True, "QUANT_OUT": True, "EVEN_K": True, "OFFS64": False,
         "ONE_TOKEN": False, "QUANT_IN": False, "SWIGLU": False, "QKV": False, "NORM_QK": False, "HAS_GAIN": False, "HEAD_D": 1,
         "RESIDUAL": False, "HAS_RES_GAIN": False}
FP16_OUT = {**FLAGS, "GELU": False, "QUANT_OUT": False}
EPILOGUES = {"fc1 (bias, GELU, int8 out)": FLAGS, "fc2 (bias, fp16 out)": FP16_OUT,
             "proj/fc2 (bias, residual add with gain, fp16 out)": {**FP16_OUT, "RESIDUAL": True, "HAS_RES_GAIN": True},
             "bare (fp16 out)": {**FP16_OUT, "HAS_BIAS": False, "HAS_GROUPS": False}}
OPS = ["FFMA", "FMUL", "FADD", "IMAD", "IADD3", "LOP3", "SHF", "ISETP", "PRMT", "MUFU", "I2FP", "STG", "STS",
       "UTMASTG", "STL", "LDL"]
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def cubin(flags: dict, config: triton.Config, arch: int, aligned: bool = True) -> bytes:
    fn = kernels._qgemm_kernel
    const = {**flags, **config.kwargs}
    ptrs = {"a_ptr": "*i8", "w_ptr": "*i8", "out_ptr": "*i8" if flags["QUANT_OUT"] else "*fp16",
            "groups_ptr": "*i32", "q_ptr": "*fp16", "kc_ptr": "*fp16", "vc_ptr": "*fp16", "index_ptr": "*i64",
            "res_ptr": "*fp16", "res_gain_ptr": "*fp16"}
    floats = ("qmin", "qmax", "in_qmin", "in_qmax", "norm_eps")
    sig = {n: "constexpr" if n in const else ptrs.get(n, "*fp32") if n.endswith("_ptr")
           else "fp32" if n in floats else "i32" for n in fn.arg_names}
    # the launch's specialization: Triton marks every pointer, and every integer argument whose value is a
    # multiple of 16 (VAR-d16's M, N and K are), as divisible by 16 (but tokens: the kernel does not specialize
    # it); without it the compiler cannot vectorize the per-element addresses, and the binary spills where the
    # launched one does not
    divisible = ("M", "N", "K", "res_gain_stride") if aligned else ()
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr") or n in divisible}
    compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled.asm["cubin"]


def inspect(binary: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(binary)
        f.flush()
        sass, usage = (subprocess.run([os.path.join(BIN, "cuobjdump"), flag, f.name], capture_output=True,
                                      text=True, check=True).stdout for flag in ("-sass", "-res-usage"))
    ops = collections.Counter(re.findall(r"\s([A-Z][A-Z0-9]+)(?:\.[A-Z0-9_.]+)?\s", sass))
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"registers": int(regs.group(1)), "stack_bytes": int(stack.group(1)),
            "instructions": sum(ops.values()), **{op: ops.get(op, 0) for op in OPS}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--unaligned", action="store_true",
                   help="no divisibility for M, N, K, tokens (how this script compiled before 2026-12-07's third session)")
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    rows = []
    for epilogue, flags in EPILOGUES.items():
        for tile, config in TILES.items():
            for store in (False, True):
                c = triton.Config({**config.kwargs, "TMA_STORE": store}, num_warps=config.num_warps,
                                  num_stages=config.num_stages)
                r = {"epilogue": epilogue, "tile": tile, "store": "TMA" if store else "plain",
                     "aligned": not args.unaligned, **inspect(cubin(flags, c, args.arch, not args.unaligned))}
                rows.append(r)
                print(f"{epilogue:28s} {tile:18s} {r['store']:5s} regs {r['registers']:3d}"
                      f" stack {r['stack_bytes']:5d} B  instructions {r['instructions']:6d}  "
                      + " ".join(f"{op} {r[op]}" for op in OPS), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": f"sm{args.arch}", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
