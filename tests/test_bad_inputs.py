"""Issue 20, bad inputs tried as a new user would: each ends in one ``error:`` line naming the cause, exit
status 2, nothing partial written and nothing executed; and a run that quantizes nothing says so."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from core.io import MARKER
from tests.test_family_compile import _var
from tools.bench import main as bench_main
from tools.compile import main as compile_main
from tools.evaluate import main as evaluate_main
from tools.generate import main as generate_main
from tools.sensitivity import main as sensitivity_main

MODELS = "tests/models_generic.py"


def _one_error(capsys, *needles) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def var_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("var")
    ckpt, _, tok = _var(tmp)
    return Path(ckpt), Path(tok)


# -------------------------------------------------------------------------- --force never loses data

def test_compile_force_never_replaces_a_directory_holding_its_inputs(tmp_path, capsys):
    """The issue's command: ``compile m/block.pt2 --allow-pickle --calib-data m/calib.pt --out m --force``."""
    from tests.models_generic import block

    m = tmp_path / "m"
    m.mkdir()
    module, inputs = block()
    torch.export.save(torch.export.export(module, inputs), str(m / "block.pt2"))
    torch.save([inputs, inputs], m / "calib.pt")
    before = _snapshot(m)
    rc = compile_main([str(m / "block.pt2"), "--allow-pickle", "--calib-data", str(m / "calib.pt"), "--out", str(m),
                       "--force"])
    assert rc == 2
    _one_error(capsys, "holds an input of this run")
    assert _snapshot(m) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # the calibration cache inside --out would be deleted with it, so it is an input too
    rc = compile_main([f"{MODELS}:block", "--calib-cache", str(tmp_path / "o" / "cache"), "--out", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o").exists()
    _one_error(capsys, "holds an input of this run")


def test_force_replaces_only_an_unchanged_output_of_this_tool(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert compile_main([f"{MODELS}:block", "--target", "torch", "--out", str(mine), "--force"]) == 2
    _one_error(capsys, "was not written by this tool", "--force replaces only")
    assert (mine / "notes.txt").read_text() == "the user's" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]

    out = tmp_path / "out"
    assert compile_main([f"{MODELS}:block", "--target", "torch", "--out", str(out)]) == 0
    assert (out / MARKER).is_file()
    assert compile_main([f"{MODELS}:block", "--target", "torch", "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    (out / "dumps" / "my-notes.txt").write_text("added later")
    assert compile_main([f"{MODELS}:block", "--target", "torch", "--out", str(out), "--force"]) == 2
    _one_error(capsys, "holds files this tool did not write (dumps/my-notes.txt)")
    assert (out / "dumps" / "my-notes.txt").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_generate_force_never_replaces_a_directory_holding_its_inputs(tmp_path, var_files, capsys):
    m = tmp_path / "m"
    m.mkdir()
    for f in var_files:
        (m / f.name).write_bytes(f.read_bytes())
    before = _snapshot(m)
    rc = generate_main([str(m / "var.pth"), "--tokenizer", str(m / "vae.pth"), "--classes", "0", "--out", str(m),
                        "--force"])
    assert rc == 2
    _one_error(capsys, "holds an input of this run")
    assert _snapshot(m) == before and not (tmp_path / "m.partial").exists()
    # a compile output given as --quantized is an input too, even though this tool wrote it
    from core.io import atomic_output_dir

    with atomic_output_dir(tmp_path / "q", force=False) as q:
        (q / "graph.json").write_text("{}")
    rc = generate_main([str(var_files[0]), "--tokenizer", str(var_files[1]), "--quantized", str(tmp_path / "q"),
                        "--out", str(tmp_path / "q"), "--force"])
    assert rc == 2 and (tmp_path / "q" / "graph.json").read_text() == "{}"
    _one_error(capsys, "holds an input of this run")


# -------------------------------------------------------------------------- output paths checked first

def _unwritable_cases(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = {"under a file": (blocker / "out", "is a file, not a directory"),
             "under /proc": (Path("/proc/arvgq-out"), "cannot create files in /proc/"),
             "an existing file": (blocker, "is an existing file, not a directory")}
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        cases["in a read-only directory"] = (ro / "out", "cannot create files in")
    return cases


def test_output_paths_that_cannot_be_made_fail_before_any_work(tmp_path, var_files, capsys):
    for what, (out, needle) in _unwritable_cases(tmp_path).items():
        assert compile_main([f"{MODELS}:block", "--out", str(out)]) == 2, what
        err = _one_error(capsys, needle)
        assert "--force" not in err, what  # an existing file is not something --force would fix
        assert generate_main([str(var_files[0]), "--tokenizer", str(var_files[1]), "--out", str(out)]) == 2, what
        _one_error(capsys, needle)
        if what != "an existing file":  # sensitivity writes a file: one under the same place
            assert sensitivity_main(["builtin:tiny-block", "--out", str(out / "sites.txt")]) == 2, what
            _one_error(capsys, needle if what != "under a file" else "is a file, not a directory")
    assert sensitivity_main(["builtin:tiny-block", "--out", str(tmp_path)]) == 2
    _one_error(capsys, "is a directory; give a file path")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "read-only") == ["a-file"]


def test_json_outputs_and_calib_cache_are_checked_first(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    images = np.zeros((4, 28, 28, 3), np.uint8)
    np.savez(tmp_path / "s.npz", images, np.arange(4))
    for target in (blocker / "r.json", Path("/proc/arvgq/r.json")):
        assert evaluate_main([str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), "--json", str(target)]) == 2
        _one_error(capsys, "--json")
        assert bench_main(["--backends", "torch-fp32", "--json", str(target)]) == 2
        _one_error(capsys, "--json")
    from tools.profile_compile import main as profile_main
    from tools.train_tiny import main as train_main

    assert profile_main(["--json", str(blocker / "p.json")]) == 2
    _one_error(capsys, "--json", "is a file, not a directory")
    assert train_main(["--out", str(blocker / "models")]) == 2
    _one_error(capsys, "--out", "is a file, not a directory")
    assert evaluate_main([str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), "--json", str(tmp_path / "s.npz")]) == 2
    _one_error(capsys, "is an input of this run")
    assert compile_main([f"{MODELS}:block", "--calib-cache", str(blocker), "--out", str(tmp_path / "o")]) == 2
    _one_error(capsys, "--calib-cache", "is an existing file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "s.npz"]


# -------------------------------------------------------------------------- damaged inputs

def test_nan_or_inf_in_a_weight_is_named_before_any_work(tmp_path, var_files, capsys):
    sd = torch.load(var_files[0], weights_only=True)
    name = next(k for k, v in sd.items() if k.endswith("attn.mat_qkv.weight"))
    sd[name][0, 3] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    out = tmp_path / "o"
    assert compile_main([str(tmp_path / "nan.pth"), "--tokenizer", str(var_files[1]), "--out", str(out)]) == 2
    _one_error(capsys, f"tensor {name} holds NaN (1 of")
    assert generate_main([str(tmp_path / "nan.pth"), "--tokenizer", str(var_files[1]), "--out", str(out)]) == 2
    _one_error(capsys, f"tensor {name} holds NaN")
    vae = torch.load(var_files[1], weights_only=True)
    bad = next(k for k, v in vae.items() if v.is_floating_point() and v.numel() > 4 and k.endswith("weight"))
    vae[bad].view(-1)[:2] = float("inf")
    torch.save(vae, tmp_path / "inf_vae.pth")
    assert compile_main([str(var_files[0]), "--tokenizer", str(tmp_path / "inf_vae.pth"), "--out", str(out)]) == 2
    _one_error(capsys, f"tensor {bad} holds Inf (2 of")
    assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_blocked_pickle_payload_is_named_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"weight": Payload()}, tmp_path / "evil.pt")
    assert compile_main([str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o")]) == 2
    err = _one_error(capsys, "holds pickled Python objects", "--allow-pickle")
    assert "corrupt" not in err and not marker.exists() and not (tmp_path / "o").exists()


def test_corrupted_calibration_cache_is_an_error_not_other_scales(tmp_path, var_files, capsys):
    common = [str(var_files[0]), "--tokenizer", str(var_files[1]), "--recipe", "minmax", "--target", "torch",
              "--calib-samples", "2", "--calib-cache", str(tmp_path / "cache"), "--no-site-sqnr"]
    assert compile_main([*common, "--out", str(tmp_path / "a")]) == 0
    chunk = sorted((tmp_path / "cache").rglob("chunk_*.pt"))[0]
    data = bytearray(chunk.read_bytes())
    start = data.find(b"data/0") + 200
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    chunk.write_bytes(bytes(data))
    capsys.readouterr()
    assert compile_main([*common, "--out", str(tmp_path / "b")]) == 2
    _one_error(capsys, chunk.name, "is damaged", "--calib-cache", "re-run to rebuild it")
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.failed").exists()


# -------------------------------------------------------------------------- options

@pytest.mark.parametrize("samples", ["0", "-1", "1000000000"])
def test_calib_samples_is_validated(tmp_path, capsys, samples):
    assert compile_main([f"{MODELS}:block", "--calib-samples", samples, "--out", str(tmp_path / "o")]) == 2
    _one_error(capsys, "--calib-samples must be between 1 and 100000", f"got {samples}")
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_quantizes_nothing_is_an_error(tmp_path, capsys):
    out = tmp_path / "o"
    rc = compile_main(["builtin:tiny-block", "--pipeline", "canonicalize,observe,smooth,insert-qdq", "--target", "torch",
                       "--out", str(out)])
    assert rc == 2
    _one_error(capsys, "nothing was quantized", "act-quant, weight-quant or stwq")
    assert not out.exists()
    # without insert-qdq it is known before any work: nothing is written at all
    out = tmp_path / "p"
    rc = compile_main(["builtin:tiny-block", "--pipeline", "canonicalize,observe,act-quant", "--out", str(out)])
    assert rc == 2
    _one_error(capsys, "has no 'insert-qdq'")
    assert not out.exists() and not (tmp_path / "p.failed").exists() and not list(tmp_path.glob(".*.tmp-*"))


def test_a_partial_pipeline_asked_for_warns_in_console_and_report(tmp_path, capsys):
    out = tmp_path / "o"
    assert compile_main(["builtin:tiny-block", "--stop-after", "observe", "--target", "torch", "--out", str(out)]) == 0
    assert "WARNING: nothing is quantized" in capsys.readouterr().err
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any("WARNING: nothing is quantized" in n for n in notes)
    assert "WARNING: nothing is quantized" in (out / "report.md").read_text()


def test_pass_option_conflicts_and_messages(tmp_path, capsys):
    out = tmp_path / "o"
    assert compile_main(["builtin:tiny-block", "--stop-after", "observe", "--disable-pass", "observe",
                         "--out", str(out)]) == 2
    _one_error(capsys, "--stop-after observe names a pass that --disable-pass skips")
    assert compile_main(["builtin:tiny-block", "--disable-pass", "canonicalize", "--out", str(out)]) == 2
    err = _one_error(capsys, "--disable-pass canonicalize")
    assert "'observe'" not in err
    assert list(tmp_path.iterdir()) == []


def test_lint_hint_names_the_real_output(tmp_path, monkeypatch, capsys):
    import tools.compile as compile_tool

    report = {"model": "m", "recipe": "minmax", "bits": "W8A8", "qparams": {"a.input": {}},
              "fidelity": {"min_sqnr_db": 30.0}, "sites": {}, "size_bytes": {"fp": 1e6, "quantized": 5e5},
              "onnx": {"QuantizeLinear": 1, "DequantizeLinear": 1, "ort_reference_max_abs_diff": 0.0,
                       "ort_reference_sqnr_db": 99.0,
                       "tensorrt_lint": {"ok": False, "int8_gemms": {}, "violations": ["v"]}}}

    class Stub:
        def __init__(self, config):
            pass

        def compile(self, tmp):
            return report

    monkeypatch.setattr(compile_tool, "Compiler", Stub)
    out = tmp_path / "elsewhere"
    assert compile_main(["builtin:tiny-block", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"python -m tools.inspect {out}/model.onnx --lint" in printed and " out/model.onnx" not in printed


def test_bench_options_are_validated(tmp_path, capsys):
    for args, needle in ((["--repeats", "0"], "--repeats must be at least 1"),
                         (["--warmup", "-1"], "--warmup at least 0"),
                         (["--batch", "0"], "--batch sizes must be at least 1"),
                         (["--batch", "2,0"], "--batch sizes must be at least 1"),
                         (["--threads", "0"], "--threads must be at least 1")):
        assert bench_main(["--backends", "torch-fp32", *args]) == 2, args
        _one_error(capsys, needle)


def test_sensitivity_threshold_must_be_a_number(tmp_path, capsys):
    for value in ("nan", "inf"):
        assert sensitivity_main(["builtin:tiny-block", "--threshold", value, "--out", str(tmp_path / "x.txt")]) == 2
        _one_error(capsys, "--threshold must be a finite number")
    assert list(tmp_path.iterdir()) == []


def test_generate_onnx_that_is_not_onnx(tmp_path, var_files, capsys):
    (tmp_path / "model.onnx").write_bytes(os.urandom(4096))
    out = tmp_path / "o"
    assert generate_main([str(var_files[0]), "--tokenizer", str(var_files[1]), "--onnx", str(tmp_path / "model.onnx"),
                          "--classes", "0", "--out", str(out)]) == 2
    _one_error(capsys, "onnxruntime cannot load", "model.onnx")
    assert not out.exists() and not (tmp_path / "o.partial").exists()


def test_evaluate_bad_npz_files(tmp_path, capsys):
    images = np.zeros((4, 28, 28, 3), np.uint8)
    np.savez(tmp_path / "good.npz", images, np.arange(4))
    (tmp_path / "random.npz").write_bytes(os.urandom(1000))
    np.savez(tmp_path / "objects.npz", np.array([images[0], None], dtype=object), np.arange(2))
    np.savez(tmp_path / "label99.npz", images, np.array([0, 1, 2, 99]))
    good = str(tmp_path / "good.npz")
    assert evaluate_main([good, str(tmp_path / "random.npz")]) == 2
    err = _one_error(capsys, "is not an .npz file")
    assert "allow_pickle" not in err
    assert evaluate_main([good, str(tmp_path / "objects.npz")]) == 2
    err = _one_error(capsys, "holds Python objects")
    assert "allow_pickle" not in err
    assert evaluate_main([good, str(tmp_path / "label99.npz")]) == 2
    _one_error(capsys, "labels [99] are not MNIST classes (0..9)", "--no-mnist")
