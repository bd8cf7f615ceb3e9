"""``tools.compile --device``: calibration (generation, observers, passes) on a GPU, files on the CPU.

The CUDA tests run only where a GPU is; they were run on the lent H100 (BENCHMARKS.md).
"""
import json

import pytest
import torch

from calib.device import OnDevice, resolve_device, stream_to
from core.errors import UserError
from tests.test_family_compile import FAMILIES
from tools.compile import main

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_on_a_machine_without_it_is_a_one_line_error_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main([*FAMILIES["var"](tmp_path), "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("error: --device cuda: CUDA is not available here"), err
    assert not out.exists()


@pytest.mark.parametrize("name, message", [("mps", "only cpu and cuda"), ("tpu", "not a device name"), ("cuda:x", "not a device name")])
def test_unsupported_device_names_the_problem(name, message):
    with pytest.raises(UserError, match=message):
        resolve_device(name)


def test_inputs_are_moved_one_batch_at_a_time_and_not_for_the_cpu():
    batches = [(torch.ones(2), 3), (torch.zeros(1), 4)]
    assert stream_to(batches, torch.device("cpu")) is batches
    moved = stream_to(batches, torch.device("meta"))  # any device but the CPU is wrapped
    assert isinstance(moved, OnDevice) and len(moved) == 2
    x, n = moved[1]
    assert x.device.type == "meta" and x.shape == (1,) and n == 4
    assert batches[1][0].device.type == "cpu"  # the source is not touched


def _report(out):
    return json.loads((out / "report.json").read_text())


@needs_cuda
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_compiles_with_calibration_on_the_gpu(tmp_path, family):
    out = tmp_path / "out"
    assert main([*FAMILIES[family](tmp_path), "--device", "cuda", "--out", str(out), "--calib-samples", "2",
                 "--calib-cache", str(tmp_path / "cache")]) == 0
    r = _report(out)
    assert r["calibration"]["device"] == "cuda"
    assert r["onnx"]["tensorrt_lint"]["ok"], r["onnx"]["tensorrt_lint"]["violations"]
    assert r["onnx"]["ort_reference_max_abs_diff"] <= 1e-4  # the graph came back to the CPU whole
    assert r["fidelity"]["min_sqnr_db"] > 10


@needs_cuda
@pytest.mark.parametrize("recipe", ["minmax", "ptq4arvg"])
def test_gpu_calibration_decides_what_cpu_calibration_decides(tmp_path, recipe):
    """Same calibration steps (captured once on the CPU, passed as --calib-data): the GPU run's
    scales equal the CPU run's to float rounding, and the output SQNR agrees."""
    from calib.capture import capture
    from frontends import load_model

    args = FAMILIES["var"](tmp_path)
    bundle = load_model(args[0], tokenizer=args[2])
    steps = capture(bundle, classes=[0, 1], seed=0, cache_dir=tmp_path / "cache")
    torch.save([steps[i] for i in range(len(steps))], tmp_path / "calib.pt")
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main([*args, "--recipe", recipe, "--calib-data", str(tmp_path / "calib.pt"), "--device", device,
                     "--out", str(out)]) == 0
        reports[device] = _report(out)
    cpu, gpu = reports["cpu"]["qparams"], reports["cuda"]["qparams"]
    assert cpu.keys() == gpu.keys() and len(cpu) > 8
    for key in cpu:
        for field in ("scale_min", "scale_max"):
            assert gpu[key][field] == pytest.approx(cpu[key][field], rel=1e-3), (key, field)
    sqnr = [reports[d]["fidelity"]["min_sqnr_db"] for d in ("cpu", "cuda")]
    assert abs(sqnr[0] - sqnr[1]) < 0.5, sqnr
