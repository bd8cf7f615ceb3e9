"""LlamaGen frontend: step == teacher forcing, fx traceability, strict loading, seeding, VQ-16.

The helpers at the top are shared with test_frontend_par.py (same step, driver and loader).
"""
import math

import pytest
import torch
from torch import fx

from core.errors import UserError
from frontends import load_model, trace, vq16
from frontends.families import bundle_from_state_dict
from frontends.llamagen import CONFIGS, Transformer, build, checkpoint_config, detect, generate
from frontends.sampling import filter_top_k_top_p


def random_model(cls, cfg, seed=0):
    """A model with weights that give O(1) activations (norm gains around 1)."""
    g = torch.Generator().manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model


def stepwise_logits(model, step, tokens, labels):
    """Run the generation schedule with given tokens through ``step``; logits of every position."""
    ids, mask = model.sequence_ids(tokens, labels), model.attention_mask()
    k, v = model.empty_cache(tokens.shape[0])
    out = []
    with torch.no_grad():
        for pos in model.schedule():
            logits, k, v = step(ids[:, pos], pos, mask[pos], k, v, model.token_groups(pos))
            out.append(logits)
    return torch.cat(out, 1)


def check_stepwise_equals_teacher_forcing(model):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(model.config.vocab_size, (3, model.config.num_tokens), generator=g)
    labels = torch.tensor([2, 5, model.config.num_classes])
    with torch.no_grad():
        full = model.teacher_forcing(tokens, labels)[:, : model.config.num_tokens]
    gm = fx.symbolic_trace(model)
    for step in (model, gm):
        assert (stepwise_logits(model, step, tokens, labels) - full).abs().max() <= 1e-5
    assert full.dtype == torch.float32 and full.abs().max() > 1  # not a trivially zero comparison


def check_traced_equals_eager(model, bundle_inputs):
    """Prefill (class token, empty cache) and the bundle's decode step, traced vs eager."""
    k, v = model.empty_cache(2)
    pos = torch.tensor([0])
    prefill = (model.class_ids(torch.tensor([1, model.config.num_classes])), pos, model.attention_mask()[pos], k, v,
               model.token_groups(pos))
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        for inputs in (prefill, bundle_inputs):
            for ref, got in zip(model(*inputs), gm(*inputs)):
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def check_first_image_independent_of_batch(model, step=None):
    one = generate(model, [3], cfg_scale=2.0, seed=7, step=step)
    three = generate(model, [3, 1, 3], cfg_scale=2.0, seed=7, step=step)
    assert torch.equal(three[:1], one)
    assert not torch.equal(three[0], three[2])  # same class, own generator per image
    return three


def save_checkpoint(model, path, wrap="model"):
    weights = dict(model.state_dict())
    torch.save({wrap: weights, "steps": 10} if wrap else weights, path)


def tiny_vq(seed=0):
    return random_model(vq16.VQModel, vq16.VQ_CONFIGS["tiny"], seed)


def gpt_b_shapes():
    """The official c2i_B_256.pt layout (models.md §2.3), written out independently of our code."""
    shapes = {"cls_embedding.embedding_table.weight": (1001, 768), "tok_embeddings.weight": (16384, 768),
              "norm.weight": (768,), "output.weight": (16384, 768)}
    for i in range(12):
        shapes |= {f"layers.{i}.attention.wqkv.weight": (2304, 768), f"layers.{i}.attention.wo.weight": (768, 768),
                   f"layers.{i}.feed_forward.w1.weight": (2048, 768), f"layers.{i}.feed_forward.w3.weight": (2048, 768),
                   f"layers.{i}.feed_forward.w2.weight": (768, 2048), f"layers.{i}.attention_norm.weight": (768,),
                   f"layers.{i}.ffn_norm.weight": (768,)}
    return shapes



@pytest.fixture(scope="module")
def tiny():
    return random_model(Transformer, CONFIGS["tiny"])


def test_stepwise_generation_equals_teacher_forcing(tiny):
    assert [len(p) for p in tiny.schedule()] == [1] * 16
    check_stepwise_equals_teacher_forcing(tiny)


def test_bundle_from_checkpoint_round_trip_and_trace(tiny, tmp_path):
    path = tmp_path / "llamagen_tiny.pt"
    save_checkpoint(tiny, path)
    bundle = load_model(str(path))
    assert (bundle.family, bundle.name) == ("llamagen", "llamagen_tiny")
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in bundle.module.state_dict().items())
    assert bundle.input_names == ["tokens", "input_pos", "attn_mask", "k_cache", "v_cache", "token_groups"]
    assert bundle.output_names == ["logits", "k_cache_out", "v_cache_out"]
    tokens, pos, mask, k, v, groups = bundle.example_inputs
    assert tokens.shape == (2, 1) and pos.tolist() == [1] and groups.tolist() == [1] and mask.shape == (1, 17)
    assert k.shape == v.shape == (2, 2, 2, 17, 32)
    assert v[:, :, :, 0].abs().sum() > 0 and not v[:, :, :, 1:].any()  # the prefill wrote position 0 only
    check_traced_equals_eager(bundle.module, bundle.example_inputs)
    trace(bundle)  # the generic frontend's own traced-vs-eager check


def test_real_gpt_b_layout_loads_strictly_and_is_detected():
    weights = {k: torch.zeros(s) for k, s in gpt_b_shapes().items()}  # not empty(): garbage may be NaN, refused
    checkpoint = {"model": weights | {"freqs_cis": torch.zeros(257, 32, 2)}, "args": {}}
    assert detect(checkpoint) == "GPT-B"
    bundle = build(checkpoint, path=None, config="GPT-B")
    model = bundle.extra["model"]
    assert sum(p.numel() for p in model.parameters()) == 110_888_448  # 110.89 M, as the official class
    assert (model.config.n_head, model.config.grid, model.seq_len) == (12, 16, 257)
    assert bundle.example_inputs[3].shape == (12, 2, 12, 257, 64)


def test_image_size_from_the_file_name():
    weights = {k: torch.empty(s, device="meta") for k, s in gpt_b_shapes().items()}
    assert checkpoint_config(CONFIGS["GPT-B"], weights, "c2i_B_384.pt", None).grid == 24
    assert checkpoint_config(CONFIGS["GPT-B"], weights, "c2i_B_384.pt", 256).grid == 16
    assert checkpoint_config(CONFIGS["GPT-XL"], weights, "my_model.pt", None).grid == 24


def test_missing_key_is_a_user_error_naming_it(tiny, tmp_path):
    weights = dict(tiny.state_dict())
    del weights["layers.1.ffn_norm.weight"]
    with pytest.raises(UserError, match=r"missing keys: layers\.1\.ffn_norm\.weight") as e:
        build(weights, path=tmp_path / "x.pt", config="tiny")
    assert "\n" not in str(e.value)
    weights["layers.1.ffn_norm.weight"] = torch.ones(3)
    with pytest.raises(UserError, match=r"wrong shapes: layers\.1\.ffn_norm\.weight \(3,\) \(expected \(64,\)\)"):
        build(weights, path=None, config="tiny")


def test_detect_rejects_other_layouts(tiny):
    assert detect({"blocks.0.attn.mat_qkv.weight": torch.empty(3)}) is None
    par_like = dict(tiny.state_dict()) | {"spe_tok_embeddings.special_embeddings.weight": torch.empty(3, 64)}
    assert detect(par_like) is None


def test_first_image_does_not_depend_on_batch_size_and_traced_step_samples_the_same(tiny):
    tokens = check_first_image_independent_of_batch(tiny)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.int64
    assert torch.equal(generate(tiny, [3, 1, 3], cfg_scale=2.0, seed=7, step=fx.symbolic_trace(tiny)), tokens)


def test_bad_logits_fail_the_generation_once_at_its_end(tiny):
    """The draws' checks are read after the last step (no host sync between steps), and still raise."""
    calls = []

    def nan_at_step_3(*inputs):
        logits, k, v = tiny(*inputs)
        calls.append(1)
        return (logits * torch.nan if len(calls) == 3 else logits), k, v

    with pytest.raises(RuntimeError, match="probabilities contain"):
        generate(tiny, [1, 2], cfg_scale=2.0, step=nan_at_step_3)
    assert len(calls) == len(tiny.schedule())


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0, rule="hf")).tolist() == [[False, False, True, True]]
    # nucleus keeps the smallest prefix whose mass reaches top_p: 0.5 + 0.3 >= 0.7
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.7, rule="hf")).tolist() == [[False, False, True, True]]


def test_vq_decode_and_encode_shapes():
    vq = tiny_vq()
    ids = torch.randint(64, (2, 16))
    images = vq.decode(ids)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1 and images.std() > 0
    codes = vq.encode(images)
    assert codes.shape == (2, 16) and codes.dtype == torch.int64 and codes.max() < 64


def test_bundle_with_tokenizer_generates_images(tiny, tmp_path):
    save_checkpoint(tiny_vq(), tmp_path / "vq_tiny.pt")
    bundle = bundle_from_state_dict(dict(tiny.state_dict()), tmp_path / "gpt.pt", tokenizer=tmp_path / "vq_tiny.pt")
    tokens = bundle.extra["generate"]([4, 2], 0)
    images = bundle.extra["tokenizer"].decode(tokens)
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(UserError, match="not a PyTorch checkpoint|file not found"):
        build(dict(tiny.state_dict()), path=None, config="tiny", tokenizer=tmp_path / "missing.pt")
