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
        rc = main(["builtin:tiny-block", "--pipeline", "canonicalize,observe,act-quant,test-explode", "--target", "torch",
                   "--out", str(out)])
    assert rc == 1
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
