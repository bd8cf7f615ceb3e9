"""PAR frontend: parallel schedule, group mask, token groups, layout, loading and seeding."""
import pytest
import torch
from test_frontend_llamagen import (
    check_first_image_independent_of_batch,
    check_stepwise_equals_teacher_forcing,
    check_traced_equals_eager,
    gpt_b_shapes,
    random_model,
    save_checkpoint,
)

from core.errors import UserError
from frontends import llamagen, load_model
from frontends.par import PAR_CONFIGS, PARTransformer, build, detect, generate


@pytest.fixture(scope="module")
def tiny():
    return random_model(PARTransformer, PAR_CONFIGS["tiny"])


def test_schedule_groups_and_mask_follow_the_official_layout(tiny):
    assert [p.tolist() for p in tiny.schedule()] == [[0], [1], [2], [3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    with torch.device("meta"):
        assert len(PARTransformer(PAR_CONFIGS["PAR-XL-4x"]).schedule()) == 147  # 576 tokens, 4x
    # method.md §4.2: groups [0] [1] [2] [3] [4:8] [8:]
    assert tiny.token_groups(torch.arange(tiny.seq_len)).tolist() == [0, 1, 2, 3] + [4] * 4 + [5] * 12
    allowed = tiny.attention_allowed()
    assert allowed.shape == (20, 20) and allowed[4, 7] and allowed[9, 11] and not allowed[3, 4] and not allowed[7, 8]
    ids = tiny.sequence_ids(torch.arange(16)[None], torch.tensor([3]))[0]
    v, c = tiny.config.vocab_size, tiny.config.num_classes
    assert ids.tolist() == [v + 3, 0, 1, 2, 3, v + c + 1, v + c + 2, v + c + 3] + list(range(4, 16))


def test_region_interleaved_order_round_trips_to_raster(tiny):
    order = tiny.token_order()
    assert order[:4].tolist() == [0, 2, 8, 10]  # one token of each 2x2 region of the 4x4 grid
    assert torch.equal(tiny.to_raster(order[None]), torch.arange(16)[None])


def test_stepwise_generation_equals_teacher_forcing(tiny):
    check_stepwise_equals_teacher_forcing(tiny)


def test_bundle_round_trip_and_traced_step(tiny, tmp_path):
    path = tmp_path / "par_tiny.pt"
    save_checkpoint(tiny, path)
    bundle = load_model(str(path))
    assert bundle.family == "par"
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in bundle.module.state_dict().items())
    tokens, pos, _, _, v, groups = bundle.example_inputs
    assert pos.tolist() == [4, 5, 6, 7] and groups.tolist() == [4] * 4 and tokens.shape == (2, 4)
    assert v[:, :, :, :4].abs().sum() > 0 and not v[:, :, :, 4:].any()
    check_traced_equals_eager(bundle.module, bundle.example_inputs)


def test_detect_tells_par_from_llamagen_by_keys(tiny):
    assert detect(dict(tiny.state_dict())) == "tiny" and llamagen.detect(dict(tiny.state_dict())) is None
    b_like = {k: torch.empty(s, device="meta") for k, s in gpt_b_shapes().items()}
    assert detect(b_like) is None and llamagen.detect(b_like) == "GPT-B"


@pytest.mark.parametrize("name", ["PAR-XL-4x", "PAR-3B-16x"])
def test_real_layouts_are_detected_and_load_strictly(name):
    cfg = PAR_CONFIGS[name]
    with torch.device("meta"):
        weights = dict(PARTransformer(cfg).state_dict())
    assert detect({"model": weights}) == name
    special = weights["spe_tok_embeddings.special_embeddings.weight"]
    assert special.shape == (cfg.ar_token_num - 1, cfg.dim) and len(weights) == 4 * 1 + 1 + 7 * cfg.n_layer
    with torch.device("meta"):
        llamagen.strict_load(PARTransformer(cfg), weights, name)


def test_missing_special_tokens_is_a_user_error(tiny):
    weights = dict(tiny.state_dict())
    del weights["spe_tok_embeddings.special_embeddings.weight"]
    with pytest.raises(UserError, match=r"missing keys: spe_tok_embeddings\.special_embeddings\.weight"):
        build(weights, path=None, config="tiny")


def test_first_image_does_not_depend_on_batch_size(tiny):
    tokens = check_first_image_independent_of_batch(tiny)
    assert torch.equal(generate(tiny, [3], cfg_scale=2.0, seed=7), tokens[:1])
