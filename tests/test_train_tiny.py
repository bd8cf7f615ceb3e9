"""The shipped MNIST models: training lowers the losses, the shipped files load strictly by family
detection and generate deterministically, ``builtin:`` names, and the CLI's bad-input path."""
from __future__ import annotations

import pytest
import torch

from frontends import examples, families, train_tiny
from frontends.generic import load_checkpoint, load_model
from frontends.llamagen import unwrap_state_dict
from frontends.train_tiny import Phase, Settings
from tools.train_tiny import main

FEW = Phase(steps=8, batch=16, lr=2e-3, warmup=1)


@pytest.fixture(scope="module")
def digits():
    """16 training digits: batch == data, so every step sees the same images and the loss curve is not batch noise."""
    return train_tiny.load_train_data(limit=16)


def _first_last(losses: list[float]) -> tuple[float, float]:
    return sum(losses[:2]) / 2, sum(losses[-2:]) / 2


def test_tokenizer_steps_lower_the_reconstruction_loss(digits):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    _, var_log = train_tiny.train_vqvae(digits, Settings(vqvae=FEW), g)
    _, vq_log = train_tiny.train_vq(digits, Settings(vq=FEW), g)
    _, kl_log = train_tiny.train_kl_vae(digits, Settings(kl_vae=FEW), g)
    for log in (var_log, vq_log, kl_log):
        first, last = _first_last(log["losses"])
        assert last < 0.7 * first, (first, last)


def test_generator_steps_lower_the_token_loss(digits):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    from frontends import vq16
    from frontends.var_vqvae import VQVAE, VQVAE_CONFIGS

    # Untrained tokenizers: their tokens of real digits are still a fixed, structured target.
    tokens, inputs = train_tiny.var_inputs(VQVAE(VQVAE_CONFIGS["mnist"]).eval(), digits.images)
    _, var_log = train_tiny.train_var(tokens, inputs, digits.labels, Settings(var=FEW), g)
    gpt_tokens = vq16.VQModel(vq16.VQ_CONFIGS["mnist"]).eval().encode(digits.images)
    _, gpt_log = train_tiny.train_gpt(gpt_tokens, digits.labels, Settings(gpt=FEW), g)
    for log in (var_log, gpt_log):
        first, last = _first_last(log["losses"])
        assert first == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.3)  # near-uniform at init
        assert last < first - 0.5, (first, last)


@pytest.mark.parametrize("name,family,config", [("mnist-var", "var", "mnist"), ("mnist-gpt", "llamagen", "GPT-mnist")])
def test_shipped_checkpoints_are_detected_and_load_strictly_in_float32(name, family, config):
    model_file, _ = examples.EMBEDDED[name]
    state_dict = load_checkpoint(examples.EMBEDDED_DIR / model_file)
    assert families.detect(state_dict) == (family, config)
    weights = unwrap_state_dict(state_dict)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}  # stored small
    bundle = load_model(f"builtin:{name}")
    assert bundle.family == family
    model = bundle.extra["model"]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in bundle.extra["tokenizer"].parameters()} == {torch.float32}
    # strict load: every stored tensor is in the model, equal after the fp16 -> fp32 cast
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in weights.items())


@pytest.mark.parametrize("name", list(examples.EMBEDDED))
def test_shipped_models_generate_deterministically(name):
    bundle = load_model(f"builtin:{name}")
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        a = bundle.extra["generate"](labels, 5)
        b = bundle.extra["generate"](labels, 5)
        c = bundle.extra["generate"](labels, 6)
        images = bundle.extra["tokenizer"].decode(a)
    flat = (lambda t: torch.cat(t, 1) if isinstance(t, list) else t)
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))
    assert images.shape == (2, 3, 32, 32)
    assert 0.0 <= images.min() and images.max() <= 1.0
    # a digit: dark background, some bright strokes (not a flat or saturated image)
    assert images.mean() < 0.4 and (images > 0.5).float().mean() > 0.03


def test_bad_data_path_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["--out", str(out), "--data", str(tmp_path / "no-mnist-here")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no-mnist-here" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_stage_is_a_user_error(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "m"), "--only", "classifierx"]) == 2
    assert "unknown stage 'classifierx'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_generate_tool_takes_a_builtin_name_and_needs_a_tokenizer_for_files(tmp_path, capsys):
    import numpy as np

    from tools.generate import main as generate

    assert generate(["builtin:mnist-var", "--classes", "0,7", "--out", str(tmp_path / "g")]) == 0
    with np.load(tmp_path / "g" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (2, 32, 32, 3) and npz["arr_1"].tolist() == [0, 7]
    model_file, _ = examples.EMBEDDED["mnist-var"]
    assert generate([str(examples.EMBEDDED_DIR / model_file), "--out", str(tmp_path / "h")]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
