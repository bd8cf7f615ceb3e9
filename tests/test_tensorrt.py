"""The TensorRT backend: pure helpers for real, TensorRT itself only where it exists (reference/tensorrt.md §0).

On this machine there is neither TensorRT nor a GPU: engine building, running and inspection
are covered by the ``needs_trt`` tests, which skip with ``availability()``'s reason.
"""
import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from backends.qdq_lint import lint
from backends.tensorrt import INSTALL_HINT, availability
from backends.tensorrt import builder as B
from backends.tensorrt.inspect import (
    datatype_of,
    modules_of_layer,
    name_tokens,
    onnx_node_modules,
    summarize_layers,
)
from backends.tensorrt.runner import check_sidecar, torch_dtype
from core.errors import UserError
from frontends.examples import tiny_block
from tools.compile import main

MODELS = "tests/models_generic.py"
CPP = Path(__file__).resolve().parents[1] / "backends" / "tensorrt" / "cpp"
REASON = availability()
needs_trt = pytest.mark.skipif(REASON is not None, reason=REASON or "")


# ----------------------------------------------------------------------------- availability

def _fake_trt(monkeypatch, **attrs):
    """A stand-in ``tensorrt`` module; touching anything not given fails the test."""
    mod = types.ModuleType("tensorrt")
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    return mod


def test_availability_is_one_line_reason_here():
    if REASON is None:
        pytest.skip("TensorRT and a GPU are present")
    assert "\n" not in REASON
    assert REASON in (INSTALL_HINT, "no CUDA device") or REASON.startswith("tensorrt cannot be imported")


def test_availability_checks_cuda_without_touching_tensorrt(monkeypatch):
    _fake_trt(monkeypatch)  # has no Runtime/Builder: a call into it would raise AttributeError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert availability() == "no CUDA device"


def test_entry_points_refuse_before_any_runtime_call(tmp_path):
    if REASON is None:
        pytest.skip("TensorRT and a GPU are present")
    from backends.tensorrt.inspect import inspect_engine
    from backends.tensorrt.runner import TrtStep

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    for call in (lambda: TrtStep(engine), lambda: inspect_engine(engine),
                 lambda: B.build_engine(tmp_path / "m.onnx", engine, profiles={"x": ((1,), (1,), (1,))})):
        with pytest.raises(UserError, match=REASON.split(" (")[0]):
            call()


# ----------------------------------------------------------------------------- profiles

def test_profiles_from_a_bundle_with_dynamic_batch_and_tokens():
    b = tiny_block()  # dims: batch and tokens in [1, 4096]; example (2, 16, 64)
    prof = B.profiles_from_bundle(b.input_names, b.example_inputs, b.extra["dynamic_shapes"])
    assert prof == {"x": ((1, 1, 64), (2, 16, 64), (4096, 4096, 64))}
    capped = B.profiles_from_bundle(b.input_names, b.example_inputs, b.extra["dynamic_shapes"], caps={"tokens": 680, "batch": 16})
    assert capped == {"x": ((1, 1, 64), (2, 16, 64), (16, 680, 64))}


def test_profiles_shared_dims_mixed_specs_and_static_inputs():
    batch = torch.export.Dim("batch", min=1, max=64)
    tokens = torch.export.Dim("tokens", min=2, max=680)
    unbounded = torch.export.Dim("free")
    names = ["x", "cond", "positions", "k_cache", "scale"]
    inputs = (torch.zeros(8, 10, 32), torch.zeros(8, dtype=torch.long), torch.zeros(10, dtype=torch.long),
              torch.zeros(2, 8, 4, 100, 16), torch.zeros(3))
    specs = ({0: batch, 1: tokens}, {0: batch}, [tokens], {1: batch, -2: unbounded}, None)
    prof = B.profiles_from_bundle(names, inputs, specs, max_cap=512)
    assert prof["x"] == ((1, 2, 32), (8, 10, 32), (64, 512, 32))  # tokens' 680 capped at 512
    assert prof["cond"] == ((1,), (8,), (64,))
    assert prof["positions"] == ((2,), (10,), (512,))
    assert prof["k_cache"] == ((2, 1, 4, 1, 16), (2, 8, 4, 100, 16), (2, 64, 4, 512, 16))  # -2 is axis 3; Dim min 0 -> 1
    assert prof["scale"] == ((3,), (3,), (3,))
    by_name = B.profiles_from_bundle(names, inputs, dict(zip(names, specs)), max_cap=512)
    assert by_name == prof


def test_static_bundle_gives_a_fixed_profile_and_bad_specs_are_user_errors():
    from tests.models_generic import block

    _, inputs = block()
    assert B.profiles_from_bundle(["x"], inputs, None) == {"x": ((2, 8, 32),) * 3}
    with pytest.raises(UserError, match="no explicit range"):
        B.profiles_from_bundle(["x"], inputs, ({0: torch.export.Dim.AUTO},))
    with pytest.raises(UserError, match="2 entries for 1 inputs"):
        B.profiles_from_bundle(["x"], inputs, (None, None))
    with pytest.raises(UserError, match="min <= opt <= max"):
        B._as_profile_list({"x": ((4,), (2,), (8,))})


# ----------------------------------------------------------------------------- sidecar, atomic write

def test_sidecar_content(tmp_path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x09 fake onnx bytes" * 1000)
    prof = {"x": ((1, 1, 64), (2, 16, 64), (16, 680, 64))}
    meta = B.sidecar(onnx_path=onnx_file, profiles=[prof], trt_version="11.4.0.106", gpu_name="NVIDIA H100 80GB HBM3",
                     capability=(9, 0), build={"strongly_typed": True})
    assert meta["tensorrt_version"] == "11.4.0.106"
    assert meta["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "sm": "9.0"}
    assert meta["onnx"] == {"path": "model.onnx", "sha256": hashlib.sha256(onnx_file.read_bytes()).hexdigest()}
    assert meta["inputs"] == {"x": [2, 16, 64]}
    assert meta["profiles"] == [{"x": {"min": [1, 1, 64], "opt": [2, 16, 64], "max": [16, 680, 64]}}]
    assert json.loads(json.dumps(meta)) == meta  # plain JSON
    engine = tmp_path / "model.engine"
    Path(str(engine) + ".json").write_text(json.dumps(meta))
    check_sidecar(engine, "11.4.0.106", (9, 0))
    with pytest.raises(UserError, match="rebuild"):
        check_sidecar(engine, "11.4.0.106", (8, 0))
    with pytest.raises(UserError, match="rebuild"):
        check_sidecar(engine, "10.13.2.6", (9, 0))


def test_timing_cache_read(tmp_path):
    assert B.read_timing_cache(None) == b"" and B.read_timing_cache(tmp_path / "none") == b""
    (tmp_path / "tc").write_bytes(b"abc")
    assert B.read_timing_cache(tmp_path / "tc") == b"abc"


# ----------------------------------------------------------------------------- TensorRT-facing logic on fakes
# (these check our rules, e.g. STRONGLY_TYPED when the enum exists, not TensorRT's API)

def test_network_flags_follow_the_enum():
    enum = types.SimpleNamespace(STRONGLY_TYPED=2)
    assert B._network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=enum)) == (1 << 2, True)
    assert B._network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())) == (0, False)


def test_progress_monitor_drives_the_callback():
    class IProgressMonitor:
        def __init__(self):
            pass

    seen = []
    mon = B._progress_monitor(types.SimpleNamespace(IProgressMonitor=IProgressMonitor), lambda *a: seen.append(a))
    mon.phase_start("Building", None, 3)
    assert mon.step_complete("Building", 0) is True
    mon.phase_finish("Building")
    assert seen == [("Building", 0, 3), ("Building", 1, 3), ("Building", 3, 3)]
    assert B._progress_monitor(types.SimpleNamespace(), print) is None  # API without IProgressMonitor


def test_torch_dtype_by_member_name():
    e = lambda n: types.SimpleNamespace(name=n)
    assert torch_dtype(e("HALF")) is torch.float16 and torch_dtype(e("INT8")) is torch.int8
    assert torch_dtype(e("INT64")) is torch.int64 and torch_dtype(e("FLOAT")) is torch.float32
    with pytest.raises(UserError):
        torch_dtype(e("FP4"))


# ----------------------------------------------------------------------------- inspector summary

SAMPLE = {
    "Layers": [
        {"Name": "blocks.3.attn.mat_qkv.weight_int8 + node_dequantize_5 + node_MatMul_31 + node_linear_2",
         "LayerType": "CaskGemmMatrixMultiply",
         "Inputs": [{"Name": "node_quantize_2_out", "Location": "Device", "Dimensions": [16, 64],
                     "Format/Datatype": "Row major linear Int8 format"}],
         "Outputs": [{"Name": "linear_2", "Format/Datatype": "Row major linear FP16 format"}],
         "Metadata": "[ONNX Layer: node_dequantize_5]\x1f[ONNX Layer: node_MatMul_31]"},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to node_MatMul_40", "LayerType": "Reformat",
         "Inputs": [{"Format/Datatype": "Row major linear FP32"}], "Outputs": [{"Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "{ForeignNode[node_layer_norm_1...node_quantize_2]}", "LayerType": "Myelin",
         "Inputs": [{"Format/Datatype": "Row major linear FP32"}], "Outputs": [{"Format/Datatype": "Row major linear Int8"}]},
        {"Name": "node_softmax", "LayerType": "Softmax", "Inputs": [{"Format/Datatype": "Half"}],
         "Outputs": [{"Format/Datatype": "Half"}], "Metadata": ""},
        {"Name": "shape_call", "LayerType": "ShapeHostToDevice", "Inputs": [], "Outputs": []},
    ],
    "Bindings": ["x", "y"],
}
NODE_MODULES = {"node_MatMul_31": "fc1", "node_layer_norm_1": "norm2", "node_quantize_2": "fc1",
                "node_MatMul_40": "fc2", "node_softmax": "attn"}


def test_datatype_and_tokens():
    assert datatype_of("Thirty-two wide channel vectorized row major Int8 format") == "int8"
    assert datatype_of("Channel major FP16 format where channel % 8 == 0") == "fp16"
    assert datatype_of("Row major linear BFloat16") == "bf16"
    assert datatype_of("Row major linear FP32") == "fp32" and datatype_of("Half") == "fp16"
    assert datatype_of("") is None
    assert name_tokens("{ForeignNode[a...b]}") == ["a", "b"]
    assert name_tokens("w.weight_int8 + node_x") == ["w.weight_int8", "node_x"]


def test_layer_names_map_to_module_paths():
    assert modules_of_layer("blocks.3.attn.mat_qkv.weight_int8 + node_dequantize_5") == ["blocks.3.attn.mat_qkv"]
    assert modules_of_layer("blocks.0.fc1.input_scale") == ["blocks.0.fc1"]
    assert modules_of_layer("node_MatMul_31 + fc1.weight_int8", NODE_MODULES) == ["fc1"]
    assert modules_of_layer("{ForeignNode[node_layer_norm_1...node_quantize_2]}", NODE_MODULES) == ["norm2", "fc1"]
    assert modules_of_layer("node_unknown_7") == []


def test_inspector_summary_on_a_hand_written_sample():
    s = summarize_layers(SAMPLE, NODE_MODULES)
    assert s["layers"] == 5 and s["detailed"] is True
    assert s["by_precision"] == {"fp16": 1, "fp32": 2, "int8": 1, "unknown": 1}
    assert s["reformat_layers"] == 1
    assert s["layer_types"]["Myelin"] == 1
    assert s["modules"]["blocks.3.attn.mat_qkv"]["precisions"] == ["int8"]
    assert s["modules"]["fc1"]["precisions"] == ["int8", "fp32"]  # the GEMM (via metadata) and the LN->Q Myelin region
    assert s["modules"]["fc2"]["layers"] == ["Reformatting CopyNode for Input Tensor 0 to node_MatMul_40"]
    assert s["int8_modules"] == ["blocks.3.attn.mat_qkv", "fc1"]


def test_inspector_summary_without_detailed_verbosity():
    s = summarize_layers({"Layers": ["fc1.weight_int8 + node_MatMul_31", "node_softmax"]})
    assert s["detailed"] is False and s["by_precision"] == {"unknown": 2}
    assert list(s["modules"]) == ["fc1"]


# ----------------------------------------------------------------------------- compile --target trt

@pytest.fixture(scope="module")
def trt_compiled(tmp_path_factory):
    if REASON is None:
        pytest.skip("TensorRT and a GPU are present: the unavailable path does not apply")
    out = tmp_path_factory.mktemp("trt") / "out"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([f"{MODELS}:block", "--target", "trt", "--out", str(out)])
    return rc, err.getvalue(), out


def test_compile_trt_unavailable_exits_2_and_keeps_the_onnx(trt_compiled):
    rc, err, out = trt_compiled
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and REASON in last and f"{out}/model.onnx" in last
    lines = err.splitlines()
    early = next(i for i, line in enumerate(lines) if REASON in line)
    assert early < next(i for i, line in enumerate(lines) if line.startswith("[1/4] loading"))  # said before loading
    assert (out / "model.onnx").is_file()
    assert not list(out.parent.glob(".out.tmp-*"))
    rep = lint(out / "model.onnx")
    assert rep.ok and sum(rep.quantized_gemms.values()) == 4
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "trt"
    assert report["tensorrt"] == {"built": False, "reason": REASON}
    assert report["onnx"]["ort_reference_max_abs_diff"] <= 1e-5
    assert not (out / "model.engine").exists()


def test_node_module_map_of_the_exported_onnx(trt_compiled):
    _, _, out = trt_compiled
    nm = onnx_node_modules(onnx.load(str(out / "model.onnx")))
    gemm_modules = {nm[n.name] for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMul" and n.name in nm}
    assert {"attn.qkv", "attn.proj", "fc1", "fc2"} <= gemm_modules
    q_modules = {nm[n.name] for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "QuantizeLinear"}
    assert q_modules == {"attn.qkv", "attn.proj", "fc1", "fc2"}


# ----------------------------------------------------------------------------- C++ runner

def _trt_headers() -> Path | None:
    roots = [os.environ.get("TENSORRT_ROOT", ""), "/usr/local/TensorRT", "/usr"]
    for root in filter(None, roots):
        for inc in ("include", "include/x86_64-linux-gnu", "include/aarch64-linux-gnu"):
            if (Path(root) / inc / "NvInfer.h").is_file():
                return Path(root) / inc
    return None


def _cmake_build(tmp_path, *defs) -> subprocess.CompletedProcess:
    build = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), *defs], capture_output=True, text=True, check=False)
    if cfg.returncode:
        return cfg
    return subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, check=False)


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None, reason="no cmake / C++ compiler")
def test_cpp_npy_reader_round_trips(tmp_path):
    r = _cmake_build(tmp_path, "-DTRT_STEP_NPY_ONLY=ON")
    assert r.returncode == 0, r.stderr[-2000:]
    tool = tmp_path / "build" / "npy_roundtrip"
    arrays = [np.random.default_rng(0).standard_normal((2, 8, 32)).astype(np.float32), np.arange(7, dtype=np.int64),
              np.array([-128, 0, 127], dtype=np.int8), np.zeros((0, 3), np.float32), np.float32(2.5) * np.ones((), np.float32)]
    for a in arrays:
        np.save(tmp_path / "in.npy", a)
        run = subprocess.run([str(tool), str(tmp_path / "in.npy"), str(tmp_path / "out.npy")], capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr
        b = np.load(tmp_path / "out.npy")
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((2, 3), np.float32)))
    np.save(tmp_path / "d.npy", np.ones(3))  # float64: not supported
    for bad, msg in (("f.npy", "Fortran"), ("d.npy", "unsupported .npy dtype")):
        run = subprocess.run([str(tool), str(tmp_path / bad), str(tmp_path / "o.npy")], capture_output=True, text=True, check=False)
        assert run.returncode == 1 and msg in run.stderr


@pytest.mark.skipif(_trt_headers() is None or shutil.which("cmake") is None,
                    reason="TensorRT headers (NvInfer.h) not found under TENSORRT_ROOT, /usr/local/TensorRT or /usr")
def test_cpp_runner_configures_and_builds(tmp_path):
    r = _cmake_build(tmp_path, f"-DTENSORRT_ROOT={_trt_headers().parent}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "build" / "trt_step").is_file()


# ----------------------------------------------------------------------------- TensorRT + GPU

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("eng") / "out"
    assert main([f"{MODELS}:block", "--target", "trt", "--out", str(out)]) == 0
    return out


@needs_trt
def test_engine_built_with_sidecar_and_inspector(engine):
    report = json.loads((engine / "report.json").read_text())
    t = report["tensorrt"]
    assert t["built"] is True and (engine / "model.engine").is_file()
    meta = json.loads((engine / "model.engine.json").read_text())
    assert meta == t["sidecar"]
    assert meta["onnx"]["sha256"] == hashlib.sha256((engine / "model.onnx").read_bytes()).hexdigest()
    assert t["inspector"]["detailed"] and t["inspector"]["int8_modules"]


@needs_trt
def test_trt_step_matches_onnxruntime(engine):
    from backends.ort_runner import OrtStep
    from backends.tensorrt.runner import TrtStep
    from tests.models_generic import block

    _, inputs = block()
    got = TrtStep(engine / "model.engine")(*inputs)
    ref = OrtStep(engine / "model.onnx")(*inputs)
    for g, r in zip(got, ref, strict=True):
        assert g.is_cuda
        torch.testing.assert_close(g.float().cpu(), r.float(), atol=5e-2, rtol=5e-2)  # tactics differ from ORT's
