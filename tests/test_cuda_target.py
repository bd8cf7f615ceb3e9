"""``--target cuda``: the lowered graph as data (safetensors, graph.json, sidecar), reloaded without running
code, equal to the graph it was saved from; ``tools.generate --quantized DIR`` and the bench runners use it."""
import contextlib
import io
import json

import pytest
import torch

from backends import registry
from compiler.driver import quantize
from core.numerics import run_outputs
from frontends import load_model
from tools.bench import main as bench_main
from tools.compile import main as compile_main
from tools.generate import main as generate_main


def _run(fn, argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = fn(argv)
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "out"
    rc, err = _run(compile_main, ["builtin:mnist-var", "--target", "cuda", "--recipe", "minmax", "--evaluate", "0",
                                  "--no-site-sqnr", "--calib-samples", "2", "--calib-cache", str(out.parent / "cache"),
                                  "--out", str(out)])
    assert rc == 0, err
    return out


def test_artefact_is_data_with_a_sidecar(compiled):
    names = sorted(p.name for p in compiled.iterdir())
    assert {"graph.json", "weights.safetensors", "cuda.json", "report.json"} <= set(names)
    assert not [n for n in names if n.endswith((".pt", ".pkl"))]  # nothing to unpickle
    sidecar = json.loads((compiled / "cuda.json").read_text())
    assert sidecar["format"] == "int8" and sidecar["torch"] == torch.__version__ and "autotune" in sidecar
    report = json.loads((compiled / "report.json").read_text())
    lowering = next(p for p in report["passes"] if p["name"] == "lower-cuda")
    quantized_linears = sum(1 for s in report["sites"].values() if s["kind"] == "linear" and "input" in s["quantized"])
    assert lowering["stats"]["qgemm"] == quantized_linears > 0
    assert report["cuda"]["weights_bytes"] == (compiled / "weights.safetensors").stat().st_size


def test_reloaded_graph_equals_the_saved_one(compiled):
    bundle = load_model("builtin:mnist-var")
    step, what = registry.artefact_target(compiled).load_step(compiled, bundle, torch.device("cpu"))
    assert "torch reference" in what
    # the same lowering in this process, from the same calibration cache: the file round trip changes nothing
    from compiler.config import CalibrationConfig, CompileConfig
    from compiler.driver import Compiler

    c = Compiler(CompileConfig(model="builtin:mnist-var", recipe="minmax", target="cuda",
                               calibration=CalibrationConfig(samples=2, cache=str(compiled.parent / "cache"))),
                 say=lambda m: None)
    _, gm, _, _ = c.quantize()
    for inputs in [bundle.example_inputs, *list(c.calibrate().inputs)[:3]]:
        for a, b in zip(run_outputs(gm, inputs), run_outputs(step, inputs), strict=True):
            assert torch.equal(a, b)


def test_graph_calls_the_kernels_as_operators(compiled):
    """The lowered graph names its kernels as torch operators (nothing to import from a file's say-so)."""
    nodes = json.loads((compiled / "graph.json").read_text())["nodes"]
    targets = {n["target"] for n in nodes if n["op"] == "call_function"}
    assert "ops:arvgq_cuda.qlinear.default" in targets and "ops:arvgq_cuda.layer_norm_q.default" in targets
    assert not [t for t in targets if t.startswith("backends.")]


def test_generate_runs_the_artefact(compiled, tmp_path):
    rc, err = _run(generate_main, ["builtin:mnist-var", "--quantized", str(compiled), "--classes", "0,1",
                                   "--device", "cpu", "--out", str(tmp_path / "q")])
    assert rc == 0, err
    assert "int8 torch reference of the kernels" in err
    rc, _ = _run(generate_main, ["builtin:mnist-var", "--classes", "0,1", "--device", "cpu", "--out", str(tmp_path / "fp")])
    q, fp = torch.load(tmp_path / "q" / "tokens.pt"), torch.load(tmp_path / "fp" / "tokens.pt")
    agree = sum(int((a == b).sum()) for a, b in zip(q, fp)) / sum(a.numel() for a in fp)
    assert 0.8 < agree < 1.0  # quantized: close to FP, not equal to it


@pytest.mark.parametrize("argv,message", [
    (["--kv-cache", "int8"], "error: --kv-cache int8 applies to --quantized DIR of tools.compile --target cuda or "
                             "cuda-fp8, not to the FP model"),
    (["--onnx", "{onnx}", "--kv-cache", "int8"], "error: --kv-cache int8 applies to --quantized DIR of tools.compile "
                                                 "--target cuda or cuda-fp8, not to onnx artefacts"),
    (["--quantized", "{cuda}", "--kv-cache", "int8", "--device", "cpu"],
     "error: --kv-cache int8: the caches are kept so on a GPU only (--device cuda)"),
])
def test_generate_gpu_options_need_a_cuda_artefact(compiled, tmp_path, argv, message):
    """``--kv-cache`` says where it does not apply, before any image is made."""
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    argv = [a.format(onnx=onnx, cuda=compiled) for a in argv]
    rc, err = _run(generate_main, ["builtin:mnist-var", "--classes", "0", *argv, "--out", str(tmp_path / "o")])
    assert rc == 2 and err.strip().splitlines()[-1] == message
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no output, no partial batches


def test_generate_hands_the_gpu_options_to_the_step(compiled, tmp_path, monkeypatch):
    """The artefact's step is built with the caches' format (on the CPU the step then runs the torch reference,
    with float caches: int8 ones are refused there)."""
    import backends.cuda.runner

    seen = []
    real = backends.cuda.runner.CudaStep

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(backends.cuda.runner, "CudaStep", recording)
    rc, err = _run(generate_main, ["builtin:mnist-var", "--quantized", str(compiled), "--classes", "0",
                                   "--device", "cpu", "--out", str(tmp_path / "o")])
    assert rc == 0, err
    assert [k["kv_cache"] for k in seen] == ["float"] and "compile" not in seen[0]


def test_fp8_target_quantizes_weights_for_fp8(compiled, tmp_path):
    """``--target cuda-fp8``: weight-quant puts the weights on the FP8 grid itself; the lowering takes them as they
    are (none re-quantized from int8), and they are saved as E4M3."""
    from safetensors import safe_open

    out = tmp_path / "fp8"
    rc, err = _run(compile_main, ["builtin:mnist-var", "--target", "cuda-fp8", "--recipe", "minmax", "--evaluate",
                                  "0", "--no-site-sqnr", "--calib-samples", "2", "--calib-cache",
                                  str(compiled.parent / "cache"), "--out", str(out)])
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    stats = {p["name"]: p["stats"] for p in report["passes"]}
    assert stats["weight-quant"]["format"] == "fp8"
    assert stats["lower-cuda"]["weights_from_int8"] == 0 and stats["lower-cuda"]["qgemm"] == 17
    with safe_open(out / "weights.safetensors", "pt") as f:
        names = [k for k in f.keys() if k.endswith(("weight_fp8", "weight_int8"))]  # noqa: SIM118 (safe_open is no dict)
        assert len(names) == 17 and all(f.get_tensor(k).dtype == torch.float8_e4m3fn for k in names)
    assert json.loads((out / "cuda.json").read_text())["format"] == "fp8"


def test_fp8_target_refuses_other_bit_widths(tmp_path):
    rc, err = _run(compile_main, ["builtin:mnist-var", "--target", "cuda-fp8", "--bits", "W6A6", "--out",
                                  str(tmp_path / "out")])
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: --bits W6A6: FP8 (E4M3) has 8 bits")
    assert not (tmp_path / "out").exists()


def test_cuda_runners_need_cuda(monkeypatch):
    import tools.bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the message a machine without CUDA gives
    monkeypatch.setattr(tools.bench, "quantize", lambda *a, **k: pytest.fail("quantized before refusing"))
    rc, err = _run(bench_main, ["--model", "tiny-block", "--backends", "torch-fp32,cuda-int8", "--repeats", "1"])
    assert rc == 2 and err.strip().splitlines() == ["error: backend cuda-int8 needs CUDA"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_on_gpu_keeps_token_agreement(compiled, tmp_path):
    """The artefact on the Triton kernels keeps the CPU path's token agreement with FP within 1 point (each
    against FP on its own device: CUDA draws other random streams than the CPU)."""
    common = ["builtin:mnist-var", "--classes", ",".join(str(i % 10) for i in range(200))]  # 200: +-0.5 point
    for device in ("cuda", "cpu"):
        for name, extra in (("q", ["--quantized", str(compiled)]), ("fp", [])):
            rc, err = _run(generate_main, [*common, *extra, "--device", device, "--out", str(tmp_path / f"{name}_{device}")])
            assert rc == 0, err

    def agreement(device):
        q, fp = (torch.load(tmp_path / f"{n}_{device}" / "tokens.pt") for n in ("q", "fp"))
        return sum(int((x == y).sum()) for x, y in zip(q, fp)) / sum(x.numel() for x in fp)

    on_gpu, on_cpu = agreement("cuda"), agreement("cpu")
    assert on_gpu >= on_cpu - 0.01, (on_gpu, on_cpu)
    # int8 KV caches: a scale per cached row adds its rounding to every later step's attention
    rc, err = _run(generate_main, [*common, "--quantized", str(compiled), "--kv-cache", "int8", "--device", "cuda",
                                   "--out", str(tmp_path / "q8_cuda")])
    assert rc == 0 and "int8 KV caches" in err, err
    q8 = torch.load(tmp_path / "q8_cuda" / "tokens.pt")
    fp = torch.load(tmp_path / "fp_cuda" / "tokens.pt")
    on_gpu8 = sum(int((x == y).sum()) for x, y in zip(q8, fp)) / sum(x.numel() for x in fp)
    print(f"token agreement with FP: GPU {on_gpu:.2%}, with int8 KV caches {on_gpu8:.2%}; CPU {on_cpu:.2%}")
    assert on_gpu8 >= on_cpu - 0.03, (on_gpu8, on_cpu)


def test_kernels_are_opaque_operators_to_torch_compile():
    """torch.compile traces the lowered graph with the kernels as operators (their fake shapes and dtypes
    must be right) and computes what the eager graph does."""
    import torch._dynamo.testing

    bundle = load_model("builtin:mnist-var")
    _, gm, _, _ = quantize(bundle, "canonicalize,observe{histograms=false},stwq,weight-quant,insert-qdq,"
                           "fuse-attention,lower-cuda", "W8A8", [bundle.example_inputs])
    torch._dynamo.reset()
    counts = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(gm, backend=counts, fullgraph=True)  # fullgraph: no graph break at a kernel
    for a, b in zip(run_outputs(gm, bundle.example_inputs), run_outputs(compiled, bundle.example_inputs), strict=True):
        assert torch.equal(a, b)
    assert counts.frame_count == 1
