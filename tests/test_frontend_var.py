"""VAR frontend: official layout, step == full forward, fx traceability, driver determinism, VQVAE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from frontends import trace
from frontends.families import bundle_from_state_dict
from frontends.var import (
    CONFIGS,
    STEP_INPUT_NAMES,
    VAR,
    VARStep,
    build,
    detect,
    generate,
    sample_tokens,
)
from frontends.var_vqvae import VQVAE, VQVAE_CONFIGS, bicubic_upsample

TINY = CONFIGS["tiny"]


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values for every parameter (biases and q/v biases included), so a wrong wiring shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
    return module.eval()



@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _randomize(VAR(TINY), 1), _randomize(VQVAE(VQVAE_CONFIGS["tiny"]), 2)


def _recorded_run(var, vae, labels, seed=0):
    """Generate, recording every step's inputs and raw (pre-CFG) logits."""
    step, calls = VARStep(var).eval(), []

    def recording_step(*inputs):
        out = step(*inputs)
        calls.append((inputs, out))
        return out

    tokens = sample_tokens(var, labels, quantizer=vae.quantize, seed=seed, top_k=20, top_p=0.9, step=recording_step)
    return tokens, calls


# ----------------------------------------------------------------------------- numerics

def test_stepwise_generation_equals_teacher_forced_forward(tiny):
    var, vae = tiny
    labels = torch.tensor([3, 7])
    tokens, calls = _recorded_run(var, vae, labels)
    cfg_labels = torch.cat((labels, torch.full_like(labels, TINY.num_classes)))
    x = vae.idxBl_to_var_input(tokens).repeat(2, 1, 1)
    with torch.no_grad():
        full = var(cfg_labels, x)
    for (begin, end), (_, (logits, _, _)) in zip(var.begin_ends, calls, strict=True):
        assert (logits - full[:, begin:end]).abs().max() <= 1e-5


def test_fx_trace_equals_eager_on_every_scale(tiny):
    var, vae = tiny
    step = VARStep(var).eval()
    gm = torch.fx.symbolic_trace(step)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == STEP_INPUT_NAMES
    _, calls = _recorded_run(var, vae, [1, 4])
    with torch.no_grad():
        for inputs, eager in calls:
            for got, ref in zip(gm(*inputs), eager, strict=True):
                torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_group_ids_are_scale_indices(tiny):
    var, vae = tiny
    _, calls = _recorded_run(var, vae, [2])
    groups = [inputs[STEP_INPUT_NAMES.index("token_groups")] for inputs, _ in calls]
    assert [g.tolist() for g in groups] == [[si] * (pn * pn) for si, pn in enumerate(TINY.patch_nums)]


# ----------------------------------------------------------------------------- checkpoints and family

def test_strict_load_round_trip_and_bundle(tiny):
    var, _ = tiny
    sd = {k: v.clone() for k, v in var.state_dict().items()}
    assert detect(sd) == "tiny"
    bundle = bundle_from_state_dict(sd, path="tiny_var.pth")
    assert bundle.family == "var" and bundle.input_names == STEP_INPUT_NAMES
    loaded = bundle.extra["model"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in var.state_dict().items())
    x, _, _, attn_bias, k_cache, _, groups = bundle.example_inputs
    last = TINY.patch_nums[-1] ** 2
    assert x.shape == (2, last, TINY.width) and attn_bias.shape == (last, TINY.seq_len)
    assert k_cache.shape == (TINY.depth, 2, TINY.heads, TINY.seq_len, TINY.head_dim)
    assert k_cache[:, :, :, : TINY.seq_len - last].abs().sum() > 0  # filled by the earlier scales
    assert groups.tolist() == [len(TINY.patch_nums) - 1] * last
    assert bundle.extra["group_maps"]["*.attn.proj"] == [0, 1, 1, 1]
    trace(bundle)  # the generic tracer checks the graph against eager on the example inputs
    first = bundle.extra["generate"]([5], 3)
    assert [t.shape for t in first] == [(1, pn * pn) for pn in TINY.patch_nums]


def _official_d16_layout() -> dict[str, tuple[int, ...]]:
    """models.md §1.4: the 220 tensors of var_d16.pth, written out independently of our classes."""
    C, V, L = 1024, 4096, 680
    layout = {"pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
              "word_embed.weight": (C, 32), "word_embed.bias": (C,), "class_emb.weight": (1001, C),
              "lvl_embed.weight": (10, C)}
    for i in range(16):
        b = f"blocks.{i}."
        layout |= {b + "attn.scale_mul_1H11": (1, 16, 1, 1), b + "attn.q_bias": (C,), b + "attn.v_bias": (C,),
                   b + "attn.zero_k_bias": (C,), b + "attn.mat_qkv.weight": (3 * C, C),
                   b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
                   b + "ffn.fc1.weight": (4 * C, C), b + "ffn.fc1.bias": (4 * C,),
                   b + "ffn.fc2.weight": (C, 4 * C), b + "ffn.fc2.bias": (C,),
                   b + "ada_lin.1.weight": (6 * C, C), b + "ada_lin.1.bias": (6 * C,)}
    layout |= {"head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
               "head.weight": (V, C), "head.bias": (V,)}
    return layout


def test_official_d16_layout_loads_strictly():
    layout = _official_d16_layout()
    assert len(layout) == 220
    sd = {k: torch.empty(s, device="meta", dtype=torch.long if k == "lvl_1L" else torch.float32)
          for k, s in layout.items()}
    assert detect(sd) == "d16"
    with torch.device("meta"):
        model = VAR(CONFIGS["d16"])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    model.load_state_dict(sd, strict=True, assign=True)


def test_missing_and_unexpected_keys_name_themselves(tiny):
    var, _ = tiny
    sd = dict(var.state_dict())
    del sd["blocks.1.ffn.fc2.bias"]
    sd["blocks.1.ffn.fc3.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing keys: blocks\.1\.ffn\.fc2\.bias.*unexpected keys: blocks\.1\.ffn\.fc3"):
        build(sd, path="broken.pth", config=detect(sd))


def test_non_var_checkpoint_is_not_detected():
    assert detect({"tok_embeddings.weight": torch.zeros(2, 2)}) is None


def test_tokenizer_file_loads_strictly(tiny, tmp_path):
    var, vae = tiny
    path = tmp_path / "vae.pth"
    torch.save(vae.state_dict(), path)
    bundle = build(dict(var.state_dict()), path="v.pth", config="tiny", tokenizer=path)
    assert torch.equal(bundle.extra["tokenizer"].quantize.embedding.weight, vae.quantize.embedding.weight)


# ----------------------------------------------------------------------------- driver and VQVAE

def test_generation_is_deterministic_per_image(tiny):
    var, vae = tiny
    pair = generate(var, [3, 5], seed=11, top_k=20, vae=vae)
    alone = generate(var, [3], seed=11, top_k=20, vae=vae)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(pair.tokens, alone.tokens, strict=True))
    assert pair.images.shape == (2, 3, 32, 32)
    assert 0 <= pair.images.min() and pair.images.max() <= 1
    torch.testing.assert_close(pair.images[:1], alone.images, rtol=0, atol=1e-4)  # conv sums vary with batch


def test_bad_logits_fail_the_generation_once_at_its_end(tiny):
    """The draws' checks are read after the last scale (no host sync between scales), and still raise."""
    var, vae = tiny
    step, calls = VARStep(var).eval(), []

    def nan_at_scale_1(*inputs):
        logits, k, v = step(*inputs)
        calls.append(1)
        return (logits * torch.nan if len(calls) == 2 else logits), k, v

    with pytest.raises(RuntimeError, match="probabilities contain"):
        sample_tokens(var, [1, 2], quantizer=vae.quantize, step=nan_at_scale_1)
    assert len(calls) == var.num_scales


@pytest.mark.parametrize("shape,size", [((2, 3, 1, 1), 16), ((2, 3, 5, 5), 16), ((4, 32, 10, 10), 16),
                                        ((1, 2, 4, 6), 9)])
def test_bicubic_upsample_is_torch_bicubic(shape, size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(size))
    expected = F.interpolate(x, size=(size, size), mode="bicubic")
    assert torch.allclose(bicubic_upsample(x, size), expected, atol=1e-5, rtol=0)


def test_vqvae_round_trip_shapes(tiny):
    _, vae = tiny
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = vae.img_to_idxBl(images)
    assert [t.shape for t in tokens] == [(2, pn * pn) for pn in TINY.patch_nums]
    assert all(t.max() < TINY.vocab_size for t in tokens)
    assert vae.idxBl_to_var_input(tokens).shape == (2, TINY.seq_len - 1, TINY.cvae)
    assert vae.decode(tokens).shape == (2, 3, 32, 32)


def test_official_vqvae_layout_and_phi_schedule():
    with torch.device("meta"):
        vae = VQVAE(VQVAE_CONFIGS["ch160v4096z32"])
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert len(shapes) == 324  # models.md §1.2
    assert shapes["encoder.conv_out.weight"] == (32, 640, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (640, 32, 3, 3)
    assert shapes["decoder.up.4.attn.2.qkv.weight"] == (1920, 640, 1, 1)
    assert shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (320, 160, 1, 1)
    assert "decoder.up.1.upsample.conv.weight" in shapes and "decoder.up.0.upsample.conv.weight" not in shapes
    assert shapes["quantize.quant_resi.qresi_ls.3.weight"] == (32, 32, 3, 3)
    assert shapes["quantize.ema_vocab_hit_SV"] == (10, 4096)
    assert [vae.quantize.quant_resi.index(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_bad_labels_are_user_errors(tiny):
    var, vae = tiny
    with pytest.raises(UserError, match="out of range"):
        sample_tokens(var, [TINY.num_classes], quantizer=vae.quantize)


def test_images_of_one_batch_draw_different_streams():
    """Regression: seeds spread by 2**32 collapse to one stream (torch keeps the low 32 bits)."""
    from frontends.var import CONFIGS, VAR, sample_tokens

    torch.manual_seed(0)
    var = VAR(CONFIGS["tiny"]).eval()
    tokens = sample_tokens(var, [3, 3, 3], seed=7, top_k=0, top_p=1.0)
    last = tokens[-1]
    assert not torch.equal(last[0], last[1]) and not torch.equal(last[1], last[2])
