"""tools.bench: runs every backend, prints the table and the machine-readable last line (timings are not asserted)."""
import json

from tools.bench import main


def test_bench_table_and_last_line(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["--model", "tiny-block", "--backends", "ort-fp32,ort-int8,torch-fp32", "--batch", "2,3",
                 "--repeats", "2", "--warmup", "1", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    key, value = lines[-1].split("=")
    assert key == "speedup_vs_fp32" and float(value) > 0
    assert sum(ln.startswith("speedup_vs_fp32=") for ln in lines) == 2  # one per batch size
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]] == [2, 3]
    for r in data["results"]:
        assert set(r["backends"]) == {"ort-fp32", "ort-int8", "torch-fp32"}
        assert all(len(b["times_s"]) == 2 for b in r["backends"].values())
    sizes = data["results"][0]["backends"]
    assert sizes["ort-int8"]["size_bytes"] < sizes["ort-fp32"]["size_bytes"] / 2
    # fidelity beside speed: onnxruntime FP32 equals the FP graph to float rounding, int8 does not
    for r in data["results"]:
        sqnr = {name: b["sqnr_db"] for name, b in r["backends"].items()}
        assert sqnr["ort-fp32"] > 80 and 10 < sqnr["ort-int8"] < 60, sqnr
    assert "SQNR dB" in "\n".join(lines)


def test_bench_generation_on_var(capsys):
    assert main(["--model", "mnist-var", "--steps", "all", "--backends", "torch-fp32,torch-int8",
                 "--repeats", "1", "--warmup", "1"]) == 0
    assert "full generation" in capsys.readouterr().out


def test_bench_generation_on_llamagen(capsys):
    """A whole LlamaGen generation (class token, then one token a step) through each backend's step."""
    assert main(["--model", "gpt-tiny-decode", "--steps", "all", "--backends", "torch-fp32,torch-int8",
                 "--repeats", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "full generation" in out and "torch-int8" in out


def test_bench_rejects_unknown_names(capsys):
    assert main(["--model", "nope"]) == 2
    assert main(["--backends", "tensorrt-int4"]) == 2
    assert main(["--batch", "two"]) == 2


def test_bench_llamagen_decode(capsys):
    assert main(["--model", "gpt-tiny-decode", "--backends", "torch-fp32,ort-fp32,ort-int8", "--batch", "1,2",
                 "--repeats", "2", "--warmup", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    speedups = [ln for ln in lines if ln.startswith("speedup_vs_fp32=")]
    assert len(speedups) == 2 and all(float(ln.split("=")[1]) > 0 for ln in speedups)
    assert sum(ln.startswith("workload gpt-tiny-decode") for ln in lines) == 2


def test_steps_all_is_var_only(capsys):
    assert main(["--model", "block-d16", "--steps", "all", "--backends", "torch-fp32", "--repeats", "1"]) == 2
    assert "VAR" in capsys.readouterr().err


def test_bench_onnxruntime_int8_backends_and_profile(capsys):
    """Our int8 variant, the Q/DQ export with onnxruntime's fusion, and onnxruntime's own quantizers in one
    table; --profile says where an onnxruntime backend's time goes, by the op types it ran."""
    backends = "ort-fp32,ort-int8,ort-int8-qdq,ort-quant-static,ort-quant-dynamic,torch-fp32"
    assert main(["--model", "tiny-block", "--backends", backends, "--repeats", "2", "--warmup", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("backend "):].splitlines()
    assert "vs ort-fp32" in table[0] and "vs torch-fp32" in table[0]
    assert [ln.split()[0] for ln in table[1:7]] == backends.split(",")
    int8_profile = out[out.index("--- profile of ort-int8 "):out.index("--- profile of ort-int8-qdq")]
    # nodes run per call, by op type (the table lists the 15 costliest: onnxruntime's one DequantizeLinear, of k
    # before its transpose for q·kᵀ, often falls off it, so the test reads the GEMMs)
    nodes = {ln.split()[0]: int(ln.split()[-1]) for ln in int8_profile.splitlines()[2:-1]}
    assert nodes["MatMulIntegerToFloat"] == 5  # qkv, q·kᵀ, proj, fc1, fc2: every linear int8
    assert nodes.get("MatMul", 1) == 1  # p·v, the softmax's float output
    assert "DynamicQuantizeMatMul" in out[out.index("--- profile of ort-quant-dynamic"):]


def test_int8_graph_is_built_as_compile_builds_it(tmp_path, capsys):
    """The int8 backends measure what tools.compile ships: the family's default recipe and exclusions (VAR's
    one-row AdaLN linears stay float); a --pipeline override is recorded and labelled as one."""
    from frontends.var import DEFAULT_EXCLUDE

    shipped, override = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--model", "var-tiny", "--backends", "torch-fp32,torch-int8", "--repeats", "1", "--warmup", "0"]
    assert main([*common, "--json", str(shipped)]) == 0
    d = json.loads(shipped.read_text())
    assert d["recipe"] == "ptq4arvg" and not d["pipeline_override"] and d["bits"] == "W8A8"
    assert set(d["exclude"]) == set(DEFAULT_EXCLUDE)
    assert d["exclude"]["blocks.*.ada_lin.1"] == ["blocks.0.ada_lin.1", "blocks.1.ada_lin.1"]
    note = d["results"][0]["backends"]["torch-int8"]["note"]
    assert main([*common, "--pipeline", "canonicalize,observe,act-quant,weight-quant,insert-qdq", "--json", str(override)]) == 0
    e = json.loads(override.read_text())
    assert e["pipeline_override"] and e["recipe"] is None and e["pipeline"].startswith("canonicalize,observe,act-quant")
    assert "pipeline override" in capsys.readouterr().out
    # the excluded AdaLN linears are not int8 GEMMs: two blocks x 4 linears + head = 9 quantized sites of 12
    assert note.split()[0] == "9" and e["results"][0]["backends"]["torch-int8"]["note"].split()[0] == "9"


def test_quantize_static_peer_is_a_real_int8_model(tmp_path, capsys):
    """ort-quant-static (onnxruntime's own static QDQ quantization, calibrated on the workload's inputs) is an int8
    model beside ours: smaller than FP32, its logits close to the FP graph's but not equal, on a VAR step."""
    out = tmp_path / "s.json"
    assert main(["--model", "var-tiny", "--backends", "ort-fp32,ort-quant-static,ort-int8", "--repeats", "1",
                 "--warmup", "0", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    b = r["backends"]
    static, fp32 = b["ort-quant-static"], b["ort-fp32"]
    assert static["note"] == "onnxruntime quantize_static"
    assert static["size_bytes"] < 0.7 * fp32["size_bytes"]  # int8 MatMul weights (its Gemms and embeddings stay float)
    assert 10 < static["sqnr_db"] < 60 and fp32["sqnr_db"] > 80, {k: v["sqnr_db"] for k, v in b.items()}
    assert all(t > 0 for t in static["times_s"])


def test_busy_and_span_unions_kernel_intervals():
    """The profile's GPU timeline: overlapping and nested kernels count once, gaps not at all."""
    from compiler.bench import busy_and_span

    busy, span = busy_and_span([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (5.5, 5.7), (10.0, 10.5)])
    assert (busy, span) == (4.5, 10.5)
    assert busy_and_span([]) == (0.0, 0.0)


def test_measure_orders_interleave_or_block_the_backends():
    """Interleaved: the backends take turns every repeat; blocked: each one's warm-up and repeats together (a GPU
    at its power cap then runs each at its own clock). Every timed call is recorded either way."""
    import pytest
    import torch

    from backends.registry import Runner, measure

    for order, expected in (("interleaved", "aabb" + "ab" * 3), ("blocked", "aa" + "a" * 3 + "bb" + "b" * 3)):
        calls = []
        runs = [Runner(name, lambda _, name=name: calls.append(name), lambda x: x, 0, "cpu", torch.float32)
                for name in "ab"]
        measure(runs, warmup=2, repeats=3, order=order)
        assert "".join(calls) == expected, order
        assert [len(r.times) for r in runs] == [3, 3]
    with pytest.raises(ValueError, match="order must be one of"):
        measure(runs, warmup=1, repeats=1, order="random")


def test_nvml_meter_reads_the_gpu_or_says_why_not():
    """On CUDA: the SM clock after each timed call, and the energy over it where the GPU counts it (data-center
    GPUs do); without a GPU driver the meter is absent and says why."""
    import torch

    from backends.nvml import meter
    from backends.registry import Runner, measure

    if not torch.cuda.is_available():
        m, why = meter(0)
        assert m is None and "NVML" in why
        return
    x, y = (torch.randn(4096, 4096, device="cuda", dtype=torch.float16) for _ in range(2))
    # about 50 ms a call, 1 s in all: several updates of the energy counter (about every 100 ms)
    run = Runner("mm", lambda _: [torch.mm(x, x, out=y) for _ in range(250)], lambda t: t, 0, "cuda", torch.float16)
    assert measure([run], warmup=1, repeats=20, order="blocked") == ""  # H100/H200: clocks and energy
    assert len(run.clocks_mhz) == 20 and all(300 <= c <= 3000 for c in run.clocks_mhz)
    # GEMMs back to back: a busy GPU, under its power cap (700 W for an H100 or H200 SXM). The counter's moves are
    # timed to within a call at each end of the window (an H100 read 806 W over 10 calls of 46-74 ms): the bound
    # allows the window that much shorter than the energy's.
    slack = 2 * max(run.times) / (sum(run.times) - 2 * max(run.times))
    power = torch.cuda.get_device_properties(0).name, run.power_w, slack
    assert 100 < run.power_w < 700 * (1 + slack), power


def test_energy_is_measured_over_a_blocked_run_only(monkeypatch):
    """NVML's energy counter moves about every 100 ms, so one call's reading is 0 or a tenth of a second's worth
    (measured on an H100: 8 of 20 calls of 34 ms saw it move). The power is read over each backend's block in
    blocked order, between the counter's first and last move in it; interleaved runs say why they have none.
    Checked with calls of 10 ms on a fake clock and a counter that moves by 9 J every third call (300 W); a
    block of three calls sees one move, and says so."""
    import torch

    from backends import nvml, registry
    from backends.registry import Runner, measure

    state = {"calls": 0, "t": 0.0}

    class Counter:  # 9000 mJ each third call, at 1500 MHz
        has_energy = True

        def sample(self):
            return 9000 * (state["calls"] // 3), 1500

    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    for name in ("current_device", "memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: 0)
    monkeypatch.setattr(nvml, "meter", lambda device: (Counter(), ""))
    monkeypatch.setattr(registry.time, "perf_counter", lambda: state["t"])

    def runs():
        def fn(_):
            state["calls"] += 1
            state["t"] += 0.010
        return [Runner(name, fn, lambda t: t, 0, "cuda", torch.float16) for name in ("a", "b")]

    blocked = runs()
    assert measure(blocked, warmup=2, repeats=12, order="blocked") == ""
    assert [round(r.power_w, 6) for r in blocked] == [300.0, 300.0]
    assert all(r.clocks_mhz == [1500] * 12 for r in blocked)
    short = runs()  # three calls: the counter moves once in the block
    assert "shorter than two updates" in measure(short, warmup=2, repeats=3, order="blocked")
    assert [r.power_w for r in short] == [None, None]
    interleaved = runs()
    assert "blocked order only" in measure(interleaved, warmup=2, repeats=5)
    assert [r.power_w for r in interleaved] == [None, None] and len(interleaved[0].clocks_mhz) == 5


def test_block_power_is_taken_between_the_counters_moves():
    from backends.registry import block_power

    # before the block: a stale reading (the counter last moved in the warm-up); then moves at 0.25 s and 0.45 s
    readings = [(0.0, 1000), (0.1, 1000), (0.25, 61000), (0.35, 61000), (0.45, 121000), (0.5, 121000)]
    assert abs(block_power(readings) - 60 / 0.2) < 1e-9  # 60 J in 0.2 s, not 120 J in 0.5 s
    assert block_power(readings[:4]) is None  # one move: no window


def test_table_shows_the_gpu_clock_and_energy():
    import torch

    from backends.registry import Runner
    from compiler.bench import render

    runs = [Runner(name, None, None, 2**20, "cuda", torch.float16, times=[t, t * 1.1, t * 0.9],
                   clocks_mhz=clocks, power_w=power) for name, t, clocks, power in
            (("torch-fp16-graphs", 0.035, [1500, 1600, 1700], 219.0), ("cuda-int8", 0.025, [1800, 1900, 1980], None))]
    header, fp16, int8 = render(runs)[0].splitlines()
    assert "SM MHz" in header and "J/call" in header
    assert fp16.split()[5:7] == ["1600", "7.67"] and int8.split()[5:7] == ["1900", "n/a"]
    assert int8.split()[4] == "1.40x"


def test_bench_order_is_in_the_header_and_the_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["--model", "tiny-block", "--backends", "torch-fp32,torch-int8", "--repeats", "2", "--warmup", "1",
                 "--order", "blocked", "--json", str(out)]) == 0
    assert "2 blocked repeats after 1 warm-up" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["order"] == "blocked" and [r["order"] for r in data["results"]] == ["blocked"]
    assert all(len(b["times_s"]) == 2 for b in data["results"][0]["backends"].values())


def test_bench_times_both_orders_in_one_run(tmp_path, capsys):
    """--order interleaved,blocked: a table for each, on the same compiled backends; the JSON keeps both."""
    out = tmp_path / "b.json"
    assert main(["--model", "tiny-block", "--backends", "torch-fp32,torch-int8", "--repeats", "3", "--warmup", "1",
                 "--batch", "1,2", "--order", "interleaved,blocked", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("3 interleaved repeats") == 2 and printed.count("3 blocked repeats") == 2
    data = json.loads(out.read_text())
    assert [(r["batch"], r["order"]) for r in data["results"]] == [
        (1, "interleaved"), (1, "blocked"), (2, "interleaved"), (2, "blocked")]
    assert all(len(b["times_s"]) == 3 for r in data["results"] for b in r["backends"].values())
    for bad in ("sideways", "blocked,blocked"):
        assert main(["--model", "tiny-block", "--backends", "torch-fp32", "--order", bad]) == 2
        assert "--order must be one or more of interleaved, blocked" in capsys.readouterr().err


def test_bench_gives_fp8_backends_a_graph_quantized_for_fp8(monkeypatch, capsys):
    """An FP8 backend gets weights quantized for the FP8 grid (as ``--target cuda-fp8`` compiles them), an INT8
    backend of the same run int8 weights. Probed with two CPU runners standing in for cuda-fp8 and cuda-int8."""
    import torch

    from backends import registry

    seen = {}

    def probe(name):
        def prepare(fp_gm, q_gm, workdir, bundle):
            seen[name] = {t.dtype for n, t in q_gm.named_buffers() if n.endswith(("weight_int8", "weight_fp8"))}
            return registry.Runner(name, lambda x: q_gm(*x), registry.converter("cpu", torch.float32), 0, "cpu",
                                   torch.float32)
        return prepare

    registry.runners()  # the built-in runners first
    for name, tgt in (("probe-int8", "cuda"), ("probe-fp8", "cuda-fp8")):
        monkeypatch.setitem(registry._RUNNERS, name, registry.RunnerSpec(name, tgt, True, probe(name)))
    assert main(["--model", "tiny-block", "--backends", "torch-fp32,probe-int8,probe-fp8", "--repeats", "1",
                 "--warmup", "0"]) == 0
    assert seen == {"probe-int8": {torch.int8}, "probe-fp8": {torch.float8_e4m3fn}}
    assert "FP8 weights for probe-fp8" in capsys.readouterr().err
