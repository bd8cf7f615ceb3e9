"""MAR's diffusion head as its own quantized graph: calibration on its inputs along the denoising
chain, W8A8 / W6A6 fidelity against the FP head, ONNX that passes the lint and matches onnxruntime,
and a generation with both graphs quantized."""
import pytest
import torch

from backends.onnx_export import export_onnx
from backends.ort_runner import make_session, run
from backends.qdq_lint import lint
from calib.capture import capture_head
from compiler.driver import quantize
from core.numerics import sqnr_db
from frontends.mar import Diffusion, build, random_mar

MINMAX = "canonicalize,observe,act-quant,weight-quant,insert-qdq"
SMOOTH = "canonicalize,observe,smooth,observe,act-quant,weight-quant,insert-qdq"


@pytest.fixture(scope="module")
def setup():
    bundle = build(random_mar("tiny", seed=3).state_dict(), config="tiny")
    inputs = capture_head(bundle, classes=[1, 2, 3, 4], seed=0, batch=2)
    return bundle, inputs


def _quantized(bundle, pipeline, bits, calib):
    return quantize(bundle.extra["head"], pipeline, bits, calib, progress=lambda it, **_: it)[1]


def _sqnr(head, gm, inputs):
    with torch.no_grad():
        return sum(sqnr_db(torch.cat(head(*x), 1), torch.cat(gm(*x), 1)) for x in inputs) / len(inputs)


def test_head_inputs_cover_the_denoising_chain(setup):
    bundle, inputs = setup
    sampling = bundle.extra["sampling"]
    steps = Diffusion(sampling["num_sampling_steps"]).timestep_map
    # every call is one denoising step of one iteration, in descending time, on 2 x tokens rows (CFG)
    assert len(inputs) == 2 * len(steps) * sum(1 for _ in range(sampling["num_iter"]))  # 2 batches x iterations
    assert [int(x[1][0]) for x in inputs[:len(steps)]] == steps[::-1]
    assert all((x[1] == x[1][0]).all() and x[0].shape[0] % 2 == 0 for x in inputs)
    assert all(torch.equal(x[0][: len(x[0]) // 2], x[0][len(x[0]) // 2:]) for x in inputs)  # forward_with_cfg: [half, half]
    assert len(capture_head(bundle, classes=[1, 2], seed=0, batch=2, every=3)) == -(-len(inputs) // 2 // 3)


def test_quantized_head_fidelity_and_onnx(tmp_path, setup):
    bundle, inputs = setup
    head = bundle.extra["head"].module
    calib, held_out = inputs[::2], inputs[1::2]
    w8 = _quantized(bundle, MINMAX, "W8A8", calib)
    w6 = _quantized(bundle, MINMAX, "W6A6", calib)
    sq8 = _quantized(bundle, SMOOTH, "W8A8", calib)
    s8, s6, q8 = _sqnr(head, w8, held_out), _sqnr(head, w6, held_out), _sqnr(head, sq8, held_out)
    assert s8 > 25 and q8 > 25 and s8 > s6 + 6, (s8, s6, q8)  # ~6 dB per bit
    path = export_onnx(w8, inputs[0], tmp_path / "head.onnx", input_names=bundle.extra["head"].input_names,
                       output_names=bundle.extra["head"].output_names,
                       dynamic_shapes=bundle.extra["head"].extra["dynamic_shapes"])
    report = lint(path)
    assert report.ok, report.violations
    assert sum(report.quantized_gemms.values()) == 12  # every linear: time (2), cond, input, 2 blocks x 3, final (2)
    session = make_session(path, "reference")
    for x in (inputs[0], inputs[-1]):  # other row counts than the export example: the rows axis is dynamic
        with torch.no_grad():
            ref = torch.cat(w8(*x), 1)
        got = torch.cat([torch.as_tensor(o) for o in run(session, x)], 1)
        assert (got - ref).abs().max() <= 1e-4 or sqnr_db(ref, got) >= 50


def test_generation_with_both_graphs_quantized(setup):
    bundle, inputs = setup
    step_gm = quantize(bundle, MINMAX, "W8A8", [bundle.example_inputs], progress=lambda it, **_: it)[1]
    head_gm = _quantized(bundle, MINMAX, "W8A8", inputs[::2])
    gen = bundle.extra["generate"]
    fp, q_step, q_both = gen([5, 6], seed=1), gen([5, 6], seed=1, step=step_gm), gen([5, 6], seed=1, step=step_gm, head=head_gm)
    cos = [torch.nn.functional.cosine_similarity(fp.flatten(1), q.flatten(1)) for q in (q_step, q_both)]
    assert all((c > 0.95).all() for c in cos) and not torch.equal(q_step, q_both)


def test_compile_with_the_head_recipe(tmp_path, capsys):
    import json

    from tests.test_family_compile import _mar, _rar
    from tools.compile import main

    args = _mar(tmp_path)
    calib = ["--calib-samples", "2", "--calib-cache", str(tmp_path / "cache"), "--no-site-sqnr"]
    assert main([*args, "--recipe", "ptq4arvg-head", "--out", str(tmp_path / "h"), *calib[:-1]]) == 0  # site SQNR on
    r = json.loads((tmp_path / "h" / "report.json").read_text())
    h = r["head"]
    assert (tmp_path / "h" / "head.onnx").is_file() and h["onnx"]["tensorrt_lint"]["ok"]
    assert sum(h["onnx"]["tensorrt_lint"]["int8_gemms"].values()) == 12
    assert h["onnx"]["ort_reference_max_abs_diff"] <= 1e-4 or h["onnx"]["ort_reference_sqnr_db"] >= 50
    assert h["fidelity"]["min_sqnr_db"] > 15 and h["calibration_calls"] > 0
    # per-site SQNR of every head linear; one site alone costs less than all of them together
    assert len(h["site_sqnr_db"]) == 12 and min(h["site_sqnr_db"].values()) > h["fidelity"]["min_sqnr_db"] - 1
    md = (tmp_path / "h" / "report.md").read_text()
    assert "## Diffusion head" in md and "`final_layer.linear`" in md and "first 2 denoising steps" in md
    assert "smooth" in h["pipeline"] and r["onnx"]["tensorrt_lint"]["ok"]  # the transformer still compiled as ptq4arvg
    # the paper's map: the head stays FP, no second graph is written
    assert main([*args, "--recipe", "ptq4arvg", "--out", str(tmp_path / "p"), *calib]) == 0
    assert "head" not in json.loads((tmp_path / "p" / "report.json").read_text())
    assert not (tmp_path / "p" / "head.onnx").exists()
    capsys.readouterr()
    assert main([*_rar(tmp_path), "--recipe", "ptq4arvg-head", "--out", str(tmp_path / "r"), *calib]) == 2
    assert "rar family does not have" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_generate_runs_the_compiled_head(tmp_path):
    import json

    from frontends.kl_vae import KL_CONFIGS, AutoencoderKL
    from tests.test_family_compile import _mar
    from tools.compile import main as compile_main
    from tools.generate import main

    args = _mar(tmp_path)
    torch.manual_seed(0)
    torch.save({"model": AutoencoderKL(KL_CONFIGS["tiny"]).state_dict()}, tmp_path / "kl.ckpt")
    calib = ["--calib-samples", "2", "--calib-cache", str(tmp_path / "cache"), "--no-site-sqnr"]
    assert compile_main([*args, "--recipe", "ptq4arvg-head", "--out", str(tmp_path / "h"), *calib]) == 0
    assert compile_main([*args, "--recipe", "ptq4arvg", "--out", str(tmp_path / "p"), *calib]) == 0
    common = [*args, "--tokenizer", str(tmp_path / "kl.ckpt"), "--classes", "0,1", "--device", "cpu"]
    for name, extra in (("fp", []), ("p", ["--quantized", str(tmp_path / "p")]), ("h", ["--quantized", str(tmp_path / "h")])):
        assert main([*common, *extra, "--out", str(tmp_path / f"g{name}")]) == 0
    fp, p, h = (torch.load(tmp_path / f"g{n}" / "tokens.pt", weights_only=True).flatten(1) for n in ("fp", "p", "h"))
    assert json.loads((tmp_path / "h" / "report.json").read_text())["head"]["fp_steps"] == 2  # tools.generate reads it
    # same step graph (same calibration): the quantized head is the only difference between p and h
    assert not torch.equal(p, h) and (torch.nn.functional.cosine_similarity(fp, h) > 0.95).all()


def test_evaluate_rows_run_their_quantized_head(tmp_path):
    import json

    from frontends.kl_vae import KL_CONFIGS, AutoencoderKL
    from tests.test_family_compile import _mar
    from tools.compile import main as compile_main

    args = _mar(tmp_path)
    torch.manual_seed(0)
    torch.save({"model": AutoencoderKL(KL_CONFIGS["tiny"]).state_dict()}, tmp_path / "kl.ckpt")
    assert compile_main([*args, "--tokenizer", str(tmp_path / "kl.ckpt"), "--recipe", "ptq4arvg-head",
                         "--calib-samples", "2", "--calib-cache", str(tmp_path / "cache"), "--no-site-sqnr",
                         "--evaluate", "3", "--compare", "ptq4arvg:W8A8,ptq4arvg-head:W6A6",
                         "--out", str(tmp_path / "o")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "o" / "report.json").read_text())["quality"]["rows"]}
    both, step_only, both6 = rows["ptq4arvg-head W8A8, compiled"], rows["ptq4arvg W8A8"], rows["ptq4arvg-head W6A6"]
    # the same quantized step; the head quantized too adds its error (after the FP head's first steps it can be
    # next to nothing: 1.6e-6 (relative) less on an H100), and 6 bits more
    assert step_only["token_rel_mse"] <= both["token_rel_mse"] * (1 + 1e-4) and both["token_rel_mse"] < both6["token_rel_mse"]


def test_first_denoising_steps_run_the_fp_head(tmp_path):
    from core.errors import UserError
    from frontends.mar import Diffusion, FirstStepsFP
    from passes.recipes import load_recipe

    calls = []

    def graph(name):
        return lambda x, t, c: (calls.append((name, int(t[0]))), (x, x))[1]

    x = torch.zeros(3, 4)
    for fp_steps, fp_calls in ((2, [999, 989]), (1, [999]), (0, [])):
        calls.clear()
        head = FirstStepsFP(graph("q"), graph("fp"), "100", fp_steps)
        for t in reversed(Diffusion("100").timestep_map):
            head(x, torch.full((3,), t), x)
        assert [t for name, t in calls if name == "fp"] == fp_calls
        assert len([t for name, t in calls if name == "q"]) == 100 - len(fp_calls)
    assert load_recipe("ptq4arvg-head").head_fp_steps == 2 and load_recipe("ptq4arvg").head_fp_steps == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('pipeline = "observe"\n[head]\npipeline = "observe"\nfp_steps = -1\n')
    with pytest.raises(UserError, match="fp_steps must be a whole number"):
        load_recipe(str(bad))
