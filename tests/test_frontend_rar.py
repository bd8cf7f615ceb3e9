"""RAR frontend: official layout, step graph == teacher-forced forward, tracing, sampling, tokenizer."""
import pytest
import torch
import torch.fx as fx

from core.errors import UserError
from frontends import trace
from frontends.families import FAMILIES
from frontends.maskgit_vq import VQ_CONFIGS, MaskGITVQ, build_tokenizer
from frontends.rar import (
    CONFIGS,
    RARStep,
    build,
    detect,
    empty_cache,
    example_inputs,
    generate,
    load_rar,
    prefix_ids,
    random_rar,
    step_inputs,
)

TINY = CONFIGS["tiny"]



@pytest.fixture(scope="module")
def model():
    return random_rar("tiny", seed=1)


def cfg_condition(labels):
    """Class ids followed by as many null ids: the CFG batch."""
    cond = TINY.condition_id(torch.tensor(labels))
    return torch.cat([cond, torch.full_like(cond, TINY.none_condition_id)])


def prefill(condition):
    batch = len(condition)
    return step_inputs(TINY, prefix_ids(TINY, condition), condition, 0, empty_cache(TINY, batch),
                       empty_cache(TINY, batch))


def test_kv_cache_steps_equal_teacher_forced_forward(model):
    condition = cfg_condition([3, 7])
    tokens = torch.randint(0, TINY.codebook_size, (4, TINY.image_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens, condition)  # [B, 1 + n, V]
        step = RARStep(model)
        inputs, rows = prefill(condition), []
        for i in range(TINY.image_seq_len):
            logits, k, v = step(*inputs)
            rows.append(logits[:, -1])
            inputs = step_inputs(TINY, tokens[:, i:i + 1], condition, i + 2, k, v)
    stepwise = torch.stack(rows, 1)
    assert full.shape == (4, TINY.image_seq_len + 1, TINY.codebook_size)
    assert (stepwise - full[:, :TINY.image_seq_len]).abs().max() <= 1e-5


def test_fx_trace_equals_eager_for_prefill_and_decode(model):
    step = RARStep(model).eval()
    gm = fx.symbolic_trace(step)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", "condition", "positions", "attn_mask", "k_cache", "v_cache", "token_groups"]
    for inputs in (prefill(cfg_condition([2])), example_inputs(step)):
        with torch.no_grad():
            for ref, got in zip(step(*inputs), gm(*inputs), strict=True):
                assert torch.equal(ref, got)


def test_strict_load_round_trip_and_bundle(model):
    sd = model.state_dict()
    assert detect(sd) == "tiny" and FAMILIES["rar"].detect is detect
    bundle = build(sd, config="tiny")
    assert bundle.family == "rar" and bundle.output_names == ["logits", "k_cache_out", "v_cache_out"]
    assert list(bundle.module.state_dict()) == list(sd)
    assert all(torch.equal(bundle.module.state_dict()[k], v) for k, v in sd.items())
    ids, _, positions, _, k_cache, _, groups = bundle.example_inputs
    assert ids.shape == (2, 1) and positions.tolist() == [4] and groups.tolist() == [2]
    written = k_cache.abs().sum(-1).gt(0)  # [depth, B, heads, slots]
    assert written[..., :4].all() and not written[..., 4:].any()
    gm = trace(bundle)  # the generic frontend's checked trace
    tokens = bundle.extra["generate"]([1], seed=0, step=gm)
    assert torch.equal(tokens, bundle.extra["generate"]([1], seed=0))


def official_rar_shapes(dim: int, depth: int, mlp: int, heads: int = 16) -> dict:
    """The key list of the official ``rar_*.bin`` (models.md 3.3), written out independently."""
    shapes = {"cls_token": [1, 1, dim], "pos_embed": [1, 1280, dim], "target_aware_pos_embed": [1, 1280, dim],
              "timesteps_embeddings": [1, 356, dim]}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": [dim], b + "norm1.bias": [dim],
                   b + "attn.qkv.weight": [3 * dim, dim], b + "attn.qkv.bias": [3 * dim],
                   b + "attn.q_norm.weight": [dim // heads], b + "attn.q_norm.bias": [dim // heads],
                   b + "attn.k_norm.weight": [dim // heads], b + "attn.k_norm.bias": [dim // heads],
                   b + "attn.proj.weight": [dim, dim], b + "attn.proj.bias": [dim],
                   b + "norm2.weight": [dim], b + "norm2.bias": [dim],
                   b + "mlp.fc1.weight": [mlp, dim], b + "mlp.fc1.bias": [mlp],
                   b + "mlp.fc2.weight": [dim, mlp], b + "mlp.fc2.bias": [dim],
                   b + "adaLN_modulation.1.weight": [6 * dim, dim], b + "adaLN_modulation.1.bias": [6 * dim]}
    shapes |= {"embeddings.weight": [2026, dim],
               "adaln_before_head.adaLN_modulation.1.weight": [2 * dim, dim],
               "adaln_before_head.adaLN_modulation.1.bias": [2 * dim],
               "lm_head.weight": [1024, dim], "lm_head.bias": [1024]}
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("name, dim, depth, mlp, params", [
    ("rar_b", 768, 24, 3072, 260.92e6), ("rar_l", 1024, 24, 4096, 461.67e6),
    ("rar_xl", 1280, 32, 5120, 955.43e6), ("rar_xxl", 1408, 40, 6144, 1498.52e6)])
def test_official_shapes_detect_and_load_strictly(name, dim, depth, mlp, params):
    sd = official_rar_shapes(dim, depth, mlp)
    assert detect(sd) == name
    loaded = load_rar(sd, CONFIGS[name])
    assert list(loaded.state_dict()) == list(sd)
    assert sum(p.numel() for p in loaded.parameters()) == pytest.approx(params, rel=1e-4)


def test_load_errors_name_the_keys(model):
    sd = dict(model.state_dict())
    del sd["blocks.1.attn.qkv.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["lm_head.bias"] = torch.zeros(3)
    with pytest.raises(UserError) as e:
        build(sd, config=detect(sd))
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing keys: blocks.1.attn.qkv.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "lm_head.bias (3,) (expected (64,))" in msg
    assert detect({"tok_embeddings.weight": torch.zeros(1)}) is None


def test_per_image_seeding_does_not_depend_on_batch(model):
    kw = {"guidance_scale": 4.0, "guidance_scale_pow": 1.0, "temperature": 1.0}
    one = generate(model, [3], seed=5, **kw)
    three = generate(model, [3, 8, 3], seed=5, **kw)
    assert one.shape == (1, TINY.image_seq_len) and three.shape == (3, TINY.image_seq_len)
    assert torch.equal(three[0], one[0])
    assert not torch.equal(three[2], three[0])  # same class, another image index: another image
    assert not torch.equal(generate(model, [3], seed=6, **kw), one)


def test_tokenizer_decode_encode_and_strict_load(model, tmp_path):
    torch.manual_seed(0)
    vq = MaskGITVQ(VQ_CONFIGS["tiny"]).eval()
    ids = torch.randint(0, 64, (2, TINY.image_seq_len))
    images = vq.decode(ids)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    codes = vq.encode(torch.rand(2, 3, 16, 16))
    assert codes.shape == (2, 16) and codes.dtype == torch.long and codes.max() < 64

    path = tmp_path / "vq.bin"
    torch.save(vq.state_dict(), path)
    bundle = build(model.state_dict(), config="tiny", tokenizer=path)
    assert torch.equal(bundle.extra["tokenizer"].decode(ids), images)
    broken = dict(vq.state_dict())
    del broken["decoder.conv_out.bias"]
    with pytest.raises(UserError, match="missing keys: decoder.conv_out.bias"):
        build_tokenizer(broken)
