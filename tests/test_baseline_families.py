"""The issue-19 recipes quarot, svdquant, repq and dtwq on every family's tiny model: they compile to
ONNX that onnxruntime runs like the torch fake-quant graph, and the TensorRT lint finds exactly what
each recipe's docs say it cannot deploy (nothing for quarot and svdquant)."""
import pytest

from tests.test_family_compile import FAMILIES, compile_family

# recipe -> the lint rules its ONNX may break (and why): none, or its documented limits
ALLOWED = {"quarot": set(), "svdquant": set(),
           "repq": {"gemm-fusion"},  # attn @ V with log-sqrt2 probabilities in float
           "dtwq": {"constant-scale"}}  # run-time per-token scales


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("recipe", sorted(ALLOWED))
def test_recipe_compiles_every_family_to_onnx(tmp_path, family, recipe):
    r = compile_family(tmp_path, family, recipe)
    o = r["onnx"]
    # as tests/test_family_compile.py: equal, except for a value on a rounding boundary
    assert o["ort_reference_max_abs_diff"] <= 1e-4 or o["ort_reference_sqnr_db"] >= 50, o
    rules = {v.split("]")[0][1:] for v in o["tensorrt_lint"]["violations"]}
    assert rules <= ALLOWED[recipe], o["tensorrt_lint"]["violations"]
    if recipe == "dtwq":
        assert rules == {"constant-scale"}
    assert r["fidelity"]["min_sqnr_db"] > 10
    passes = {p["name"]: p for p in r["passes"]}
    fired = {"quarot": "quarot", "svdquant": "svd-lowrank", "repq": "repq-reparam", "dtwq": "dynamic-act-quant"}[recipe]
    assert passes[fired]["modified"]
    if recipe == "quarot":
        blocked = passes["quarot"]["stats"]["blocked_by_adaln"]
        assert bool(blocked) == (family in ("var", "rar"))  # AdaLN families only
        # the RMSNorm families rotate their residual stream offline: only wo and w2 stay online
        assert passes["quarot"]["stats"]["residual"]["rotated"] == (family in ("llamagen", "par"))
        if family in ("llamagen", "par"):
            assert {s.rsplit(".", 1)[-1] for s in passes["quarot"]["stats"]["online"]} == {"wo", "w2"}
    if recipe == "repq":
        assert passes["log2-softmax"]["stats"]["matmuls"] >= 1  # every family writes attention as matmuls
