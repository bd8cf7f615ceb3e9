"""Files appear whole or not at all; a failed compile keeps its dumps in OUT.failed/ and says so in one line."""
import contextlib
import io
import json
import os

import pytest

from core.errors import PassError, UserError
from core.io import atomic_output_dir, atomic_write_bytes, failed_dir
from passes.infra import Pass, PassContext, PassResult, register
from tools.compile import main


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "model.engine"
    atomic_write_bytes(target, b"old")
    assert target.read_bytes() == b"old"

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.engine"]  # no temp left behind


def test_output_dir_moves_partial_output_to_failed(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PassError, match=r"boom \(partial output kept in .*out\.failed/\)"):
        with atomic_output_dir(out, force=False) as tmp:
            (tmp / "dumps").mkdir()
            (tmp / "dumps" / "000_canonicalize.txt").write_text("graph")
            raise PassError("boom")
    assert not out.exists()
    assert (failed_dir(out) / "dumps" / "000_canonicalize.txt").read_text() == "graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.failed"]
    with atomic_output_dir(out, force=False) as tmp:  # a good run replaces the last failure's leftovers
        (tmp / "report.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_dir_failing_before_writing_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="^bad input$"):
        with atomic_output_dir(out, force=False):
            raise UserError("bad input")
    assert list(tmp_path.iterdir()) == []


@register
class _Explode(Pass):
    name = "test-explode"

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        with gm.graph.inserting_after(next(iter(gm.graph.nodes))):  # a partial edit the dump must show
            gm.graph.create_node("call_function", len, (next(iter(gm.graph.nodes)),), name="half_done")
        raise RuntimeError("kaboom")


def test_failing_pass_keeps_its_dumps_and_prints_one_error_line(tmp_path):
    out = tmp_path / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["builtin:tiny-block", "--pipeline", "canonicalize,observe,act-quant,test-explode,insert-qdq", "--target", "torch",
                   "--out", str(out)])
    assert rc == 2
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "test-explode" in errors[0] and "kaboom" in errors[0] and f"{out}.failed/" in errors[0]
    assert not out.exists()
    dumps = failed_dir(out) / "dumps"
    assert (dumps / "000_canonicalize.txt").is_file()
    failed = (dumps / "003_test-explode.failed.txt").read_text()
    assert "kaboom" in failed and "half_done" in failed
    manifest = json.loads((dumps / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["canonicalize", "observe", "act-quant", "test-explode"]
    assert "kaboom" in manifest["passes"][-1]["failed"]


# -- leftovers: temporaries carry the PID; SIGTERM cleans up, a later run sweeps what SIGKILL left ----------

def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporaries_carry_the_pid_and_stale_ones_of_dead_processes_are_swept(tmp_path):
    from core.io import MARKER, _tag, atomic_path

    out = tmp_path / "out"
    with atomic_output_dir(out, force=False) as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}.")
        with atomic_path(tmp / "f.txt") as t:
            assert t.name.startswith(f".f.txt.tmp-{os.getpid()}.")
            t.write_text("x")
    host = _tag().split(".", 1)[1]
    dead, alive = _dead_pid(), os.getpid()
    stale_dir = tmp_path / f".out.tmp-{dead}.{host}-abcd1234"
    stale_file = tmp_path / f".report.json.tmp-{dead}.{host}-abcd1234.tmp"
    live_dir = tmp_path / f".out.tmp-{alive}.{host}-efgh5678"
    other_host = tmp_path / f".out.tmp-{dead}.000000-ijkl9012"
    for d in (stale_dir, live_dir, other_host):
        d.mkdir()
        (d / "half.onnx").write_text("partial")
    stale_file.write_text("partial")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "x").write_text("new")
    atomic_write_bytes(tmp_path / "report.json", b"{}")
    assert not stale_dir.exists() and not stale_file.exists()
    assert live_dir.exists() and other_host.exists()  # a running process's, another machine's: left alone
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "x"]


_SLOW_WRITER = """
import sys, time
from core.io import atomic_output_dir, atomic_path
from tools._cli import main_wrapper

@main_wrapper
def main(argv):
    with atomic_output_dir(sys.argv[1], force=False) as tmp:
        (tmp / "dumps").mkdir()
        with atomic_path(tmp / "model.onnx") as part:
            part.write_text("half")
            print("ready", flush=True)
            time.sleep(60)
    return 0

sys.exit(main())
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_killed_run_leaves_nothing_for_long(tmp_path, sig):
    """SIGTERM: one error line, status 143, the temporaries removed at once. SIGKILL cannot be caught:
    its temporaries are swept by the next run writing the same output."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out)], cwd=root, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    assert [x.name.split("-")[0] for x in tmp_path.iterdir()] == [".out.tmp"]
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    if sig == "SIGTERM":
        assert p.returncode == 143
        assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
            "error: terminated by SIGTERM; temporary files removed"]
        assert list(tmp_path.iterdir()) == []
        return
    assert p.returncode == -signal.SIGKILL and len(list(tmp_path.iterdir())) == 1
    with atomic_output_dir(out, force=False) as tmp:
        (tmp / "report.json").write_text("{}")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]
