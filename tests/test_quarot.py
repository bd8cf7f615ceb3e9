"""``quarot``: Hadamard rotations folded offline where they can be and applied online where AdaLN,
LayerNorm, the KV cache or a GELU block them.

Hadamard matrices are exact; the pass keeps FP outputs on every block type; the graph's rotation is
``x @ Q`` with ``W Q`` (direct); linear -> linear folds offline with no run-time op; AdaLN is named as
the blocker; rotation beats plain min-max on outlier channels; the recipe exports the tiny VAR to
ONNX that matches onnxruntime and passes the TensorRT lint.
"""
from __future__ import annotations

import copy
import json

import models_folding as M
import pytest
import torch

from core.errors import UserError
from core.numerics import sqnr_db
from passes.infra import PassManager, get_attr
from passes.quarot import hadamard, random_hadamard
from tests.test_baselines import _compile, _passes, var_args  # noqa: F401  (fixture)
from tests.test_folding import MODELS, compile_graph, worst_rel_err


@pytest.mark.parametrize("n", [1, 2, 12, 20, 32, 60, 96, 1024, 1920])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    q = random_hadamard(n, 3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))
    assert (q.abs() - n ** -0.5).abs().max() < 1e-12  # every entry ±1/sqrt(n): no channel is left alone


def test_unsupported_order_is_an_error_naming_it():
    with pytest.raises(UserError, match="order 36"):
        hadamard(36)


@pytest.mark.parametrize("model", ["tiny-block", "var", "rar", "llamagen", "linear-linear"])
def test_quarot_fires_and_preserves_outputs(model):
    bundle = MODELS[model][0]()
    fp, gm, ctx, pm = compile_graph(bundle, "canonicalize,quarot")
    rec = pm.records[1]
    assert rec["modified"] and rec["probe_rel_err"] < 1e-5 and worst_rel_err(fp, gm, bundle) < 1e-5
    linears = {s for s, site in ctx.sites.items() if site.kind == "linear"}
    offline_sinks = {s for name in rec["stats"]["offline"] for s in name.split(" -> ")[1].split("+")}
    assert set(rec["stats"]["online"]) | offline_sinks == linears  # every linear is rotated one way


def test_var_adaln_blocks_the_residual_rotation_and_each_online_site_says_why():
    bundle = M.var_tiny()
    fp, gm, ctx, pm = compile_graph(bundle, "canonicalize,quarot")
    stats = pm.records[1]["stats"]
    assert stats["offline"] == []
    assert sorted(stats["blocked_by_adaln"]) == ["block.fc1", "block.mat_qkv", "head"]
    assert all(stats["online"][s].startswith("AdaLN") for s in stats["blocked_by_adaln"])
    assert "gelu" in stats["online"]["block.fc2"]
    assert "attention output" in stats["online"]["block.proj"] and "KV cache" not in stats["online"]["block.proj"]
    assert any(n.startswith("quarot: AdaLN blocks") and "head" in n for n in ctx.notes)
    # the graph's online rotation is x @ Q and the weight W Q, Q the seeded randomised Hadamard
    n = bundle.module.block.fc2.in_features
    q = random_hadamard(n, 0).float()
    torch.testing.assert_close(get_attr(gm, "block.fc2.input_rotation"), q)
    torch.testing.assert_close(get_attr(gm, "block.fc2.weight"), get_attr(fp, "block.fc2.weight") @ q, rtol=1e-5, atol=1e-6)
    # online=false leaves them unrotated and changes nothing
    _, gm2, _, pm2 = compile_graph(M.var_tiny(), "canonicalize,quarot{online=false}")
    assert not pm2.records[1]["modified"] and "block.fc2" in pm2.records[1]["stats"]["unrotated"]


def test_linear_to_linear_rotation_folds_offline_with_no_runtime_op():
    bundle = M.norm_mlp()
    fp, gm, ctx, pm = compile_graph(bundle, "canonicalize,quarot")
    stats = pm.records[1]["stats"]
    assert stats["offline"] == ["fc1 -> fc2"] and "fc2" not in stats["online"]
    assert not hasattr(gm.fc2, "input_rotation") and hasattr(gm.fc1, "input_rotation")
    q = random_hadamard(get_attr(fp, "fc2.weight").shape[1], 0).float()
    torch.testing.assert_close(get_attr(gm, "fc2.weight"), get_attr(fp, "fc2.weight") @ q, rtol=1e-5, atol=1e-6)
    # fc1's output rows rotated: Q^T W_fc1' ... composed with fc1's own online input rotation
    q1 = random_hadamard(get_attr(fp, "fc1.weight").shape[1], 0).float()
    torch.testing.assert_close(get_attr(gm, "fc1.weight"), q.T @ get_attr(fp, "fc1.weight") @ q1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 6])
def test_rotation_spreads_outlier_channels_and_beats_min_max(bits):
    bundle = M.outlier_mlp()
    fp, rot, ctx, _ = compile_graph(bundle, "canonicalize,quarot,observe,act-quant,weight-quant,insert-qdq", bits, bits)
    _, plain, ctx0, _ = compile_graph(M.outlier_mlp(), "canonicalize,observe,act-quant,weight-quant,insert-qdq", bits, bits)
    assert float(ctx.qparams["fc1.input"].scale) < 0.5 * float(ctx0.qparams["fc1.input"].scale)
    x = bundle.example_inputs[0]
    with torch.no_grad():
        ref = fp(x)
        assert sqnr_db(ref, rot(x)) > sqnr_db(ref, plain(x)) + 3.0


def test_quarot_recipe_exports_the_tiny_var_to_onnx(var_args):
    rc, out = _compile(var_args, "quarot", "onnx")
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    stats = _passes(r)["quarot"]["stats"]
    assert len(stats["online"]) == 9 and len(stats["blocked_by_adaln"]) == 5  # qkv, fc1 x 2 blocks + head
    assert any(n.startswith("quarot: AdaLN blocks") for n in r["notes"])
    assert "KV cache" in stats["online"]["blocks.0.attn.proj"]  # the family model's V is a step output
    assert r["onnx"]["ort_reference_max_abs_diff"] < 1e-3
    lint_r = r["onnx"]["tensorrt_lint"]
    assert lint_r["ok"], lint_r["violations"]
    assert lint_r["float_gemms"] >= 9  # the online rotations
    assert r["fidelity"]["min_sqnr_db"] > 10


@pytest.mark.parametrize("family", ["llamagen", "par"])
def test_rmsnorm_residual_rotation_folds_offline_and_keeps_outputs(tmp_path, family):
    # QuaRot's main rotation on the RMSNorm families: gains into the readers, then the residual stream is h Q
    from frontends import load_model
    from tests.test_family_compile import FAMILIES

    bundle = load_model(FAMILIES[family](tmp_path)[0])
    fp, gm, ctx, pm = compile_graph(bundle, "canonicalize,quarot")
    rec = pm.records[1]
    assert rec["probe_rel_err"] < 1e-5 and worst_rel_err(fp, gm, bundle) < 1e-5  # 5e-7 / 1e-6 measured
    res = rec["stats"]["residual"]
    assert res["rotated"], res
    n_layer = bundle.extra["model"].config.n_layer
    assert len(res["norms"]) == 2 * n_layer + 1 and len(res["writers"]) == 2 * n_layer  # wo and w2 per layer
    tables = {"tok_embeddings.weight", "cls_embedding.embedding_table.weight"}
    assert set(res["embeddings"]) == (tables | {"spe_tok_embeddings.special_embeddings.weight"} if family == "par" else tables)
    # the norms' readers take x Q offline: no online rotation left at wqkv, w1, w3 or the head
    online = rec["stats"]["online"]
    assert sorted(online) == sorted(f"layers.{i}.{s}" for i in range(n_layer) for s in ("attention.wo", "feed_forward.w2"))
    q = random_hadamard(get_attr(fp, "norm.weight").numel(), 0)
    for i in range(n_layer):
        assert torch.equal(get_attr(gm, f"layers.{i}.ffn_norm.weight"), torch.ones_like(get_attr(fp, "norm.weight")))
    # direct: head W diag(g) Q, tables E Q, a writer's rows Q^T W (w2's columns also carry its online rotation)
    g = get_attr(fp, "norm.weight").double()
    torch.testing.assert_close(get_attr(gm, "output.weight").double(), get_attr(fp, "output.weight").double() * g @ q,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(get_attr(gm, "tok_embeddings.weight").double(), get_attr(fp, "tok_embeddings.weight").double() @ q,
                               rtol=1e-5, atol=1e-6)
    w2 = "layers.0.feed_forward.w2.weight"
    q_in = random_hadamard(get_attr(fp, w2).shape[1], 0)
    torch.testing.assert_close(get_attr(gm, w2).double(), q.T @ get_attr(fp, w2).double() @ q_in, rtol=1e-5, atol=1e-6)
    # residual=false: the gains stay and the norms' readers are rotated online instead
    _, gm2, _, pm2 = compile_graph(load_model(FAMILIES[family](tmp_path)[0]), "canonicalize,quarot{residual=false}")
    st = pm2.records[1]["stats"]
    assert not st["residual"]["rotated"] and "residual=false" in st["online"]["output"]
    torch.testing.assert_close(get_attr(gm2, "norm.weight"), get_attr(fp, "norm.weight"))


def test_residual_rotation_refuses_a_stream_it_cannot_follow():
    # llama_block's residual is a step input (a placeholder), not embeddings: no offline rotation, and why
    _, _, _, pm = compile_graph(M.llama_block(), "canonicalize,quarot")
    stats = pm.records[1]["stats"]
    assert not stats["residual"]["rotated"] and "step input x" in stats["residual"]["reason"]
    assert stats["residual"]["reason"] in stats["online"]["wqkv"]
