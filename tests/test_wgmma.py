"""backends/cuda/wgmma.py: int8 MMAs kept in flight across K steps, by rewriting Triton's GPU IR.

The rewrite is text to text, so its rules are tested on hand-written loops; that it takes effect on the real
kernel is tested by compiling ``qgemm`` for sm90 without a GPU (Triton ships ptxas) and reading the PTX. That the
kernels it builds compute the same numbers is a GPU test (tests/test_cuda_kernels.py, every in-flight tile).
"""
import pytest

pytest.importorskip("triton", reason="triton is not installed")
from backends.cuda import wgmma

ACC = "tensor<128x128xi32, #mma>"
SMEM = "!ttg.memdesc<128x128xi8, #shared, #smem, mutable>"


def _loop(*, use_in_loop="", load_before="", region=(), mark=True, acc=ACC,
          after="%y = arith.sitofp %acc_53#0 : " + ACC):
    """A K loop as Triton's pipeliner leaves an int8 one: load wait, dot, wait 0, next loads, yield."""
    return "\n".join([
        "module {",
        "  tt.func public @k() {",
        (f"    %acc_53:3 = scf.for %i = %c0_i32 to %n step %c1_i32 iter_args(%arg7 = %cst, %arg8 = %p0, %arg9 = %q0)"
         f" -> ({acc}, i32, !ttg.async.token)  : i32 {{"),
        "      %t = ttg.async_wait %arg9 {num = 2 : i32} loc(#loc3)",
        *([load_before] if load_before else []),
        (f"      %acc_72 = ttng.warp_group_dot %a_70, %b_71, %arg7 {{inputPrecision = 0 : i32, isAsync = true}} : "
         f"{SMEM} * {SMEM} -> {acc} loc(#loc4)"),
        (f"      %acc_73:3 = ttng.warp_group_dot_wait %acc_72, %a_70, %b_71 {{pendings = 0 : i32}} : {acc}, {SMEM}, "
         f"{SMEM} loc(#loc4)"),
        *([use_in_loop] if use_in_loop else []),
        "      %l = ttg.async_copy_global_to_local %ptrs, %buf : tensor<128x128x!tt.ptr<i8>> -> " + SMEM,
        *region,
        f"      scf.yield %acc_73#0, %arg8, %l : {acc}, i32, !ttg.async.token loc(#loc5)",
        "    } {tt.disallow_acc_multi_buffer} loc(#loc6)" if mark else "    } loc(#loc6)",
        f"    {after}",
        "    %z = arith.addi %acc_53#1, %acc_53#10 : i32",
        "    tt.return",
        "  }",
        "}"])


def test_rewrites_the_marked_int8_loop():
    text, n = wgmma.make_async(_loop())
    assert n == 1
    lines = text.splitlines()
    wait = next(i for i, line in enumerate(lines) if "%acc_73:3 = ttng.warp_group_dot_wait" in line)
    assert "{pendings = 1 : i32}" in lines[wait]
    close = next(i for i, line in enumerate(lines) if "tt.disallow_acc_multi_buffer" in line)
    assert lines[close + 1] == f"    %arvgq_mma0 = ttng.warp_group_dot_wait %acc_53#0 {{pendings = 0 : i32}} : {ACC}"
    # the loop's result is read through the wait only; other results (and %acc_53#10) keep their names
    assert lines[close + 2] == f"    %y = arith.sitofp %arvgq_mma0 : {ACC}"
    assert "%z = arith.addi %acc_53#1, %acc_53#10 : i32" in text
    assert text.count("pendings = 0") == 1


@pytest.mark.parametrize("case", ["unmarked", "fp32 accumulator", "accumulator read in the loop",
                                  "a load before the wait", "read in an epilogue in the loop"])
def test_leaves_other_loops_as_triton_wrote_them(case):
    loop = {"unmarked": lambda: _loop(mark=False),
            "fp32 accumulator": lambda: _loop(acc="tensor<128x128xf32, #mma>",
                                              after="%y = arith.negf %acc_53#0 : tensor<128x128xf32, #mma>"),
            # a flattened loop's accumulator reset: a select reading the result the MMA would still write
            "accumulator read in the loop": lambda: _loop(
                use_in_loop=f"      %47 = arith.select %46, %cst_5, %acc_73#0 : {ACC}"),
            # its buffer may be the one step i - 1's MMA is still reading
            "a load before the wait": lambda: _loop(
                load_before="      %l0 = ttg.async_copy_global_to_local %p, %buf0 : tensor<128x128x!tt.ptr<i8>> -> "
                            + SMEM),
            # a flattened tile loop's epilogue, nested in the loop
            "read in an epilogue in the loop": lambda: _loop(region=[
                "      scf.if %last {",
                f"        %e = arith.sitofp %acc_73#0 : {ACC}",
                "      }"])}[case]()
    text, n = wgmma.make_async(loop)
    assert (text, n) == (loop, 0)


def test_install_chains_the_hook_already_there(monkeypatch):
    from triton import knobs
    calls = []

    def previous(*args):
        if not args:
            return "prev-key", "prev-hash"
        calls.append(args)

    monkeypatch.setattr(knobs.runtime, "add_stages_inspection_hook", previous)
    assert wgmma.install()
    hook = knobs.runtime.add_stages_inspection_hook
    assert hook is not previous and wgmma.install() and knobs.runtime.add_stages_inspection_hook is hook
    key, digest = hook()  # Triton >= 3.7 keys its caches with this: both hooks' parts
    assert key.startswith("prev-key") and "arvgq-async-int8-wgmma" in key and len(digest) == 64
    def make(src, metadata):
        return src

    stages = {"ttgir": make}
    hook(object(), stages, None, None, 90)
    assert len(calls) == 1 and stages["ttgir"] is not make  # sm90: the rewrite wraps the stage
    stages = {"ttgir": make}
    hook(object(), stages, None, None, 80)
    assert len(calls) == 2 and stages["ttgir"] is make  # elsewhere the stage is left alone


# Compiled for sm90 without a GPU, in a fresh process (compiled, not interpreted, kernels).
_COMPILE = """
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from backends.cuda import kernels as k

flags = {"HAS_BIAS": True, "HAS_GROUPS": True, "GELU": True, "QUANT_OUT": True, "EVEN_K": True, "QUANT_IN": False,
         "SWIGLU": False, "QKV": False, "NORM_QK": False, "HAS_GAIN": False, "HEAD_D": 1,
         "RESIDUAL": False, "HAS_RES_GAIN": False, "OFFS64": False, "ONE_TOKEN": False}
fn = k._qgemm_kernel
for name, c in [("in flight", k.tile_config(128, 128, 128, 4, 3, persistent=True, tma=True, occupancy=2, flatten=False,
                                            async_mma=True)),
                ("flattened", k.tile_config(128, 128, 128, 4, 3, persistent=True, tma=True, occupancy=2, flatten=True,
                                            async_mma=True))]:
    const = {**flags, **c.kwargs}
    ptrs = {"a_ptr": "*i8", "w_ptr": "*i8", "out_ptr": "*i8", "groups_ptr": "*i32", "q_ptr": "*fp16", "kc_ptr": "*fp16",
            "vc_ptr": "*fp16", "index_ptr": "*i64"}
    sig = {n: "constexpr" if n in const else ptrs.get(n, "*fp32") if n.endswith("_ptr")
           else "fp32" if n in ("qmin", "qmax", "in_qmin", "in_qmax", "norm_eps") else "i32" for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n.endswith("_ptr") or n in ("M", "N", "K", "tokens")}
    ptx = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": c.num_warps, "num_stages": c.num_stages}).asm["ptx"]
    print(name, sorted(re.findall(r"wgmma.wait_group.sync.aligned (\\d+)", ptx)),
          len(re.findall(r"wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8", ptx)))
"""


def test_qgemm_keeps_its_int8_mmas_in_flight_on_sm90(compiled_script):
    lines = dict(line.split(" [", 1) for line in compiled_script(_COMPILE).splitlines())
    # one wait in the loop that leaves the step's MMAs running, one after it before the epilogue reads them
    assert lines["in flight"] == "'0', '1'] 8"
    # a flattened tile loop resets its accumulator with a select inside the loop: left synchronous
    assert lines["flattened"] == "'0'] 8"
