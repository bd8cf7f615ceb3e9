"""Generic frontend: loading specs, safe loading, trace errors that point at the user's code."""
import pytest
import torch

from core.errors import UserError
from frontends import load_model, trace
from frontends.generic import load_checkpoint

MODELS = "tests/models_generic.py"


def test_factory_spec_and_input_names():
    b = load_model(f"{MODELS}:two_in_two_out")
    assert b.input_names == ["first", "second"]
    gm = trace(b)
    ref = b.module(*b.example_inputs)
    got = gm(*b.example_inputs)
    assert all(torch.equal(a, c) for a, c in zip(ref, got))


def test_trace_error_names_module_and_line():
    b = load_model(f"{MODELS}:untraceable")
    with pytest.raises(UserError) as e:
        trace(b)
    msg = str(e.value)
    assert "module 'body'" in msg
    assert "models_generic.py:" in msg and "if x.sum() > 0" in msg
    assert "torch.export" in msg  # suggests the fix
    assert "\n" not in msg


def test_factory_returning_garbage():
    with pytest.raises(UserError, match="must return a ModelBundle"):
        load_model(f"{MODELS}:not_a_model")


def test_pickled_module_refused_by_default(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UserError, match="--allow-pickle"):
        load_model(str(path))
    with pytest.raises(UserError, match="example_inputs"):  # allowed, but a bare module has no inputs
        load_model(str(path), allow_pickle=True)


def test_state_dict_loads_weights_only(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))


@pytest.mark.parametrize("content,needle", [
    (None, "file not found"),
    (b"this is not a zip", "cannot read"),
])
def test_missing_and_corrupt_files(tmp_path, content, needle):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        load_model(str(path))


def test_unknown_spec_and_builtin():
    with pytest.raises(UserError, match="cannot tell what"):
        load_model("model.weird")
    with pytest.raises(UserError, match="unknown built-in model"):
        load_model("builtin:nope")


def test_pt2_program(tmp_path):
    b = load_model(f"{MODELS}:two_in_two_out")
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(b.module, b.example_inputs), str(path))
    with pytest.raises(UserError, match="allow-pickle"):  # torch.export.load unpickles: opt-in only
        load_model(str(path))
    b2 = load_model(str(path), allow_pickle=True)
    assert b2.input_names == ["first", "second"]
    gm = trace(b2)
    got = gm(*b.example_inputs)
    assert all(torch.allclose(a, c) for a, c in zip(b.module(*b.example_inputs), got))


def test_passes_do_not_touch_the_users_module():
    from passes import PassContext, PassManager

    b = load_model(f"{MODELS}:block")
    before = {k: v.clone() for k, v in b.module.state_dict().items()}
    PassManager("canonicalize,observe,act-quant,weight-quant,insert-qdq").run(
        trace(b), PassContext(calib_inputs=[b.example_inputs]))
    after = b.module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
