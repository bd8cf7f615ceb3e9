"""tools.profile_compile: one row per stage and sample count, pass names from the pipeline (timings not asserted)."""
import json

from tools.profile_compile import main

PIPELINE = "canonicalize,observe,act-quant,weight-quant,insert-qdq"


def test_profile_compile_rows(tmp_path, capsys):
    out = tmp_path / "p.json"
    # ONNX export is the slow stage (seconds); it is skipped here to keep the test short
    assert main(["--model", "var-tiny", "--samples", "1,2", "--pipeline", PIPELINE, "--no-onnx", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    stages = ["build", "trace", *(f"pass:{p}" for p in PIPELINE.split(",")), "pass-manager-checks"]
    rows = [ln.split() for ln in text.splitlines() if ln.split() and ln.split()[0] in stages]
    assert sorted((r[0], int(r[1])) for r in rows) == sorted((s, n) for s in stages for n in (1, 2))
    assert all(float(r[2]) >= 0 for r in rows)
    data = json.loads(out.read_text())
    assert [r["samples"] for r in data["results"]] == [1, 2]
    assert data["results"][1]["calib_steps"] == 2 * data["results"][0]["calib_steps"]
    assert all(r["passes"] == PIPELINE.split(",") for r in data["results"])


def test_profile_compile_rejects_unknown(capsys):
    assert main(["--model", "nope"]) == 2
    assert main(["--model", "var-tiny", "--samples", "0"]) == 2
