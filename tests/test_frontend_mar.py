"""MAR frontend: official layout, step graph == the official drop-and-pad forward, the diffusion head
graph, the respaced DDPM, the mask schedule, and sampling that is deterministic per seed."""
import math

import pytest
import torch
from torch import fx

from core.errors import UserError
from frontends import trace
from frontends.families import FAMILIES
from frontends.families import detect as detect_family
from frontends.mar import (
    CONFIGS,
    Diffusion,
    DiffusionHead,
    MARStep,
    build,
    detect,
    example_inputs,
    generate,
    head_example_inputs,
    load_mar,
    mask_schedule,
    random_mar,
    space_timesteps,
    step_inputs,
)
from frontends.sampling import batch_seed

TINY = CONFIGS["tiny"]


@pytest.fixture(scope="module")
def model():
    return random_mar("tiny", seed=1)


@pytest.mark.parametrize("n_masked", [TINY.seq_len, 11, 5, 1])
def test_step_graph_equals_official_drop_and_pad_forward(model, n_masked):
    g = torch.Generator().manual_seed(n_masked)
    order = torch.stack([torch.randperm(TINY.seq_len, generator=g) for _ in range(3)])
    tokens = torch.randn(3, TINY.seq_len, TINY.token_dim, generator=g)
    mask = torch.zeros(3, TINY.seq_len).scatter(1, order[:, :n_masked], 1.0)
    tokens = tokens * (1 - mask).unsqueeze(-1)  # the sampler's unknown tokens are zeros
    condition = torch.tensor([4, 9, TINY.num_classes])  # two classes and the null class (fake_latent)
    with torch.no_grad():
        ref = model(tokens, mask, condition)  # [B, L, D] raster order, masked tokens dropped in the encoder
        z = MARStep(model)(*step_inputs(TINY, tokens, condition, order, n_masked))  # order layout
    raster = torch.empty_like(z).scatter_(1, order.unsqueeze(-1).expand_as(z), z)
    assert ref.shape == (3, TINY.seq_len, TINY.embed_dim)
    assert (raster - ref).abs().max() <= 1e-5
    # the inputs matter: another class, or one more known token, changes z
    assert (ref - model(tokens, mask, torch.tensor([5, 9, 10]))).abs().max() > 1e-3


def test_token_groups_and_mask_follow_the_order_layout():
    *_, attn_mask, groups = step_inputs(TINY, torch.zeros(1, 16, 4), torch.tensor([0]),
                                                              torch.arange(16)[None], 6)
    buf = TINY.buffer_size
    assert groups.tolist() == list(range(buf)) + [buf + 1] * 6 + [buf] * 10  # per-position buffer, masked, known
    assert attn_mask.shape == (1, buf + 16)
    attn_mask = attn_mask[0]
    assert torch.isinf(attn_mask[buf:buf + 6]).all() and not attn_mask[:buf].any() and not attn_mask[buf + 6:].any()


def test_fx_trace_equals_eager_and_checked_trace(model):
    step = MARStep(model).eval()
    gm = fx.symbolic_trace(step)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == [
        "tokens", "condition", "order", "attn_mask", "token_groups"]
    for inputs in (example_inputs(step), example_inputs(step, batch=3, masked=2)):
        with torch.no_grad():
            assert torch.equal(step(*inputs), gm(*inputs))
    assert not any("diffloss" in k for k in step.state_dict())  # the head is its own graph


def test_head_graph_equals_the_official_mlp(model):
    head = DiffusionHead(model.diffloss.net).eval()
    x, t, c = head_example_inputs(model, rows=5)
    net = model.diffloss.net
    with torch.no_grad():
        eps, var = head(x, t, c)
        # SimpleMLPAdaLN.forward written out: timestep MLP on [cos | sin] frequencies, AdaLN res blocks
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        y = net.time_embed.mlp(torch.cat([torch.cos(t[:, None].float() * freqs), torch.sin(t[:, None].float() * freqs)], -1))
        y = y + net.cond_embed(c)
        h = net.input_proj(x)
        for b in net.res_blocks:
            shift, scale, gate = b.adaLN_modulation(y).chunk(3, -1)
            h = h + gate * b.mlp(b.in_ln(h) * (1 + scale) + shift)
        shift, scale = net.final_layer.adaLN_modulation(y).chunk(2, -1)
        out = net.final_layer.linear(net.final_layer.norm_final(h) * (1 + scale) + shift)
        gm = fx.symbolic_trace(head)
        traced = gm(x, t, c)
    assert torch.allclose(torch.cat([eps, var], 1), out, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip((eps, var), traced))


def test_respaced_cosine_diffusion():
    # the official space_timesteps("100") of 1000: stride 999/99, rounded
    steps = space_timesteps(1000, "100")
    assert len(steps) == 100 and steps[:4] == [0, 10, 20, 30] and steps[-1] == 999
    assert steps == sorted({round(j * 999 / 99) for j in range(100)})
    # unrespaced: betas are the cosine schedule's, and one p_sample step is the posterior mean
    d = Diffusion("1000")
    ab = [math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2 for t in (0.0, 0.001, 0.002)]
    beta1, beta0 = 1 - ab[2] / ab[1], 1 - ab[1] / ab[0]
    assert math.isclose(math.exp(float(d.tables["max_log"][1])), beta1, rel_tol=1e-12)
    x, eps, noise = torch.tensor([0.5]), torch.tensor([0.2]), torch.tensor([0.0])
    ac1, ac0 = (1 - beta0) * (1 - beta1), 1 - beta0
    x0 = x / math.sqrt(ac1) - math.sqrt(1 / ac1 - 1) * eps
    mean = beta1 * math.sqrt(ac0) / (1 - ac1) * x0 + (1 - ac0) * math.sqrt(1 - beta1) / (1 - ac1) * x
    assert torch.allclose(d.p_sample(eps, torch.zeros(1), x, 1, noise, 1.0), mean.float(), atol=1e-6)
    # the noise term: sqrt of the learned-range variance (frac=1: beta), scaled by the temperature; none at i=0
    got = d.p_sample(eps, torch.ones(1), x, 1, torch.ones(1), 0.5) - d.p_sample(eps, torch.ones(1), x, 1, noise, 0.5)
    assert math.isclose(float(got), 0.5 * math.sqrt(beta1), rel_tol=1e-5)
    assert float(d.p_sample(eps, torch.ones(1), x, 0, torch.ones(1), 1.0) - d.p_sample(eps, torch.ones(1), x, 0, noise, 1.0)) == 0


def test_mask_schedule_is_the_official_cosine():
    sched = mask_schedule(CONFIGS["mar_base"], 64)
    assert sched[0][:2] == (256, math.floor(256 * math.cos(math.pi / 2 / 64)))
    assert [n for n, _, _ in sched[1:]] == [nxt for _, nxt, _ in sched[:-1]]  # each iteration starts where the last stopped
    assert sched[-1][1] == 0 and all(nxt < n for n, nxt, _ in sched)  # at least one token per iteration, all at the end
    tiny = mask_schedule(TINY, 64)  # more iterations than tokens: the official loop then predicts nothing some rounds
    assert sum(n - nxt for n, nxt, _ in tiny) == TINY.seq_len and tiny[-1][1] == 0


def test_generate_is_deterministic_per_seed_and_batch_independent(model):
    kw = {"num_iter": 4, "cfg": 2.5, "num_sampling_steps": "5", "temperature": 0.9}
    full = generate(model, [1, 2, 3], seed=7, **kw)
    assert full.shape == (3, TINY.seq_len, TINY.token_dim) and torch.isfinite(full).all()
    again = generate(model, [1, 2, 3], seed=7, **kw)
    assert torch.equal(full, again)
    alone = generate(model, [2], seed=batch_seed(7, 1), **kw)  # image 1 of the batch, generated alone
    # Relative to the tokens' scale: the random head's chain grows them to ~5e4, and a CPU whose GEMMs block a
    # batch of 1 differently moves them by ~1e-7 of that (a batch-dependent draw or order would move them by O(1)).
    scale = full[1].abs().max()
    assert (alone[0] - full[1]).abs().max() <= 1e-5 * scale
    assert (generate(model, [1, 2, 3], seed=8, **kw) - full).abs().max() > 1e-2 * full.abs().max()
    # every token was written (no zeros left), and the traced step and head give the same tokens
    assert (full.abs().sum(-1) > 0).all()
    gm = fx.symbolic_trace(MARStep(model).eval())
    gh = fx.symbolic_trace(DiffusionHead(model.diffloss.net).eval())
    assert torch.allclose(generate(model, [1, 2, 3], seed=7, step=gm, head=gh, **kw), full, atol=1e-5)
    constant = generate(model, [1, 2, 3], seed=7, **{**kw, "cfg_schedule": "constant"})
    assert (constant - full).abs().max() > 1e-3
    with pytest.raises(UserError, match="cfg schedule"):
        generate(model, [1], cfg_schedule="cosine")


def test_strict_load_detection_and_bundle(model):
    sd = model.state_dict()
    assert detect(sd) == "tiny" and detect_family(sd) == ("mar", "tiny") and FAMILIES["mar"].detect is detect
    assert detect({"model_ema": sd, "model": {}, "epoch": 3}) == "tiny"  # a main_mar.py training checkpoint
    bundle = build({"model_ema": sd}, config="tiny")
    assert bundle.family == "mar" and bundle.input_names[:3] == ["tokens", "condition", "order"]
    assert all(torch.equal(bundle.extra["model"].state_dict()[k], v) for k, v in sd.items())
    gm = trace(bundle)
    assert bundle.extra["head"].family == "mar-head" and trace(bundle.extra["head"]) is not None
    bad = dict(sd)
    bad.pop("mask_token")
    bad["encoder_blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(UserError, match=r"missing keys: mask_token.*wrong shapes: encoder_blocks.0.attn.qkv.weight"):
        load_mar(bad, TINY)
    assert gm is not None


def official_mar_shapes(dim: int, depth: int, dl_d: int, dl_w: int) -> dict:
    """The key list of an official ``mar_*`` checkpoint (models/mar.py + diffloss.py, timm 0.9 Block),
    written out independently, in state_dict order."""
    s = {"fake_latent": [1, dim], "encoder_pos_embed_learned": [1, 320, dim], "mask_token": [1, 1, dim],
         "decoder_pos_embed_learned": [1, 320, dim], "diffusion_pos_embed_learned": [1, 256, dim],
         "class_emb.weight": [1000, dim], "z_proj.weight": [dim, 16], "z_proj.bias": [dim],
         "z_proj_ln.weight": [dim], "z_proj_ln.bias": [dim]}

    def blocks(prefix):
        out = {}
        for i in range(depth):
            b = f"{prefix}.{i}."
            out |= {b + "norm1.weight": [dim], b + "norm1.bias": [dim], b + "attn.qkv.weight": [3 * dim, dim],
                    b + "attn.qkv.bias": [3 * dim], b + "attn.proj.weight": [dim, dim], b + "attn.proj.bias": [dim],
                    b + "norm2.weight": [dim], b + "norm2.bias": [dim], b + "mlp.fc1.weight": [4 * dim, dim],
                    b + "mlp.fc1.bias": [4 * dim], b + "mlp.fc2.weight": [dim, 4 * dim], b + "mlp.fc2.bias": [dim]}
        return out

    s |= blocks("encoder_blocks") | {"encoder_norm.weight": [dim], "encoder_norm.bias": [dim],
                                     "decoder_embed.weight": [dim, dim], "decoder_embed.bias": [dim]}
    s |= blocks("decoder_blocks") | {"decoder_norm.weight": [dim], "decoder_norm.bias": [dim]}
    n = "diffloss.net."
    s |= {n + "time_embed.mlp.0.weight": [dl_w, 256], n + "time_embed.mlp.0.bias": [dl_w],
          n + "time_embed.mlp.2.weight": [dl_w, dl_w], n + "time_embed.mlp.2.bias": [dl_w],
          n + "cond_embed.weight": [dl_w, dim], n + "cond_embed.bias": [dl_w],
          n + "input_proj.weight": [dl_w, 16], n + "input_proj.bias": [dl_w]}
    for i in range(dl_d):
        r = f"{n}res_blocks.{i}."
        s |= {r + "in_ln.weight": [dl_w], r + "in_ln.bias": [dl_w], r + "mlp.0.weight": [dl_w, dl_w],
              r + "mlp.0.bias": [dl_w], r + "mlp.2.weight": [dl_w, dl_w], r + "mlp.2.bias": [dl_w],
              r + "adaLN_modulation.1.weight": [3 * dl_w, dl_w], r + "adaLN_modulation.1.bias": [3 * dl_w]}
    s |= {n + "final_layer.linear.weight": [32, dl_w], n + "final_layer.linear.bias": [32],
          n + "final_layer.adaLN_modulation.1.weight": [2 * dl_w, dl_w],
          n + "final_layer.adaLN_modulation.1.bias": [2 * dl_w]}
    return {k: torch.empty(v, device="meta") for k, v in s.items()}


@pytest.mark.parametrize("name, dim, depth, dl_d, dl_w, params", [
    ("mar_base", 768, 12, 6, 1024, 208e6), ("mar_large", 1024, 16, 8, 1280, 479e6),
    ("mar_huge", 1280, 20, 12, 1536, 943e6)])
def test_official_shapes_detect_and_load_strictly(name, dim, depth, dl_d, dl_w, params):
    sd = official_mar_shapes(dim, depth, dl_d, dl_w)
    assert detect(sd) == name
    loaded = load_mar(sd, CONFIGS[name])
    assert list(loaded.state_dict()) == list(sd)
    assert sum(p.numel() for p in loaded.parameters()) == pytest.approx(params, rel=3e-3)  # the README's sizes


def official_kl16_shapes() -> dict:
    """The key list of LDM's AutoencoderKL as MAR builds it (embed_dim 16, ch 128, ch_mult (1,1,2,2,4),
    2 ResNet blocks, encoder attention at 16 px, none in the decoder's levels), written out independently."""
    s, ch, mult = {}, 128, (1, 1, 2, 2, 4)

    def res(p, cin, cout):
        out = {p + "norm1.weight": [cin], p + "norm1.bias": [cin], p + "conv1.weight": [cout, cin, 3, 3],
               p + "conv1.bias": [cout], p + "norm2.weight": [cout], p + "norm2.bias": [cout],
               p + "conv2.weight": [cout, cout, 3, 3], p + "conv2.bias": [cout]}
        if cin != cout:
            out |= {p + "nin_shortcut.weight": [cout, cin, 1, 1], p + "nin_shortcut.bias": [cout]}
        return out

    def attn(p, c):
        out = {p + "norm.weight": [c], p + "norm.bias": [c]}
        for conv in ("q", "k", "v", "proj_out"):
            out |= {p + f"{conv}.weight": [c, c, 1, 1], p + f"{conv}.bias": [c]}
        return out

    s |= {"encoder.conv_in.weight": [ch, 3, 3, 3], "encoder.conv_in.bias": [ch]}
    cin = ch
    for i, m in enumerate(mult):
        for j in range(2):
            s |= res(f"encoder.down.{i}.block.{j}.", cin, ch * m)
            cin = ch * m
            if i == 4:
                s |= attn(f"encoder.down.{i}.attn.{j}.", cin)
        if i != 4:
            s |= {f"encoder.down.{i}.downsample.conv.weight": [cin, cin, 3, 3], f"encoder.down.{i}.downsample.conv.bias": [cin]}
    for part in ("encoder", "decoder"):
        mid = {}
        mid |= res(f"{part}.mid.block_1.", 512, 512) | attn(f"{part}.mid.attn_1.", 512) | res(f"{part}.mid.block_2.", 512, 512)
        if part == "encoder":
            s |= mid | {"encoder.norm_out.weight": [512], "encoder.norm_out.bias": [512],
                        "encoder.conv_out.weight": [32, 512, 3, 3], "encoder.conv_out.bias": [32]}
        else:
            s |= {"decoder.conv_in.weight": [512, 16, 3, 3], "decoder.conv_in.bias": [512]} | mid
    cin = 512
    for i in reversed(range(5)):
        for j in range(3):
            s |= res(f"decoder.up.{i}.block.{j}.", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            s |= {f"decoder.up.{i}.upsample.conv.weight": [cin, cin, 3, 3], f"decoder.up.{i}.upsample.conv.bias": [cin]}
    s |= {"decoder.norm_out.weight": [ch], "decoder.norm_out.bias": [ch], "decoder.conv_out.weight": [3, ch, 3, 3],
          "decoder.conv_out.bias": [3], "quant_conv.weight": [32, 32, 1, 1], "quant_conv.bias": [32],
          "post_quant_conv.weight": [16, 16, 1, 1], "post_quant_conv.bias": [16]}
    return {k: torch.zeros(v) for k, v in s.items()}


def test_kl16_layout_loads_strictly_and_decodes():
    from frontends.kl_vae import KL_CONFIGS, build_vae

    sd = official_kl16_shapes()
    vae = build_vae({"model": sd, }, "kl16")  # kl16.ckpt nests the weights under "model"
    assert vae.config == KL_CONFIGS["kl16"] and set(vae.state_dict()) == set(sd)
    with pytest.raises(UserError, match="missing keys: decoder.conv_out.bias"):
        build_vae({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"})


def test_kl_attention_and_decode_follow_ldm():
    from frontends.kl_vae import KL_CONFIGS, LATENT_SCALE, AttnBlock, AutoencoderKL

    torch.manual_seed(0)
    blk = AttnBlock(32)
    x = torch.randn(2, 32, 3, 3)
    with torch.no_grad():
        h = blk.norm(x)
        q, k, v = blk.q(h).reshape(2, 32, 9).permute(0, 2, 1), blk.k(h).reshape(2, 32, 9), blk.v(h).reshape(2, 32, 9)
        w = torch.softmax(torch.bmm(q, k) * 32 ** -0.5, dim=2).permute(0, 2, 1)  # models/vae.py, step by step
        ref = x + blk.proj_out(torch.bmm(v, w).reshape(2, 32, 3, 3))
        assert torch.allclose(blk(x), ref, atol=1e-6)
        vae = AutoencoderKL(KL_CONFIGS["tiny"]).eval()
        tokens = torch.randn(2, 16, 4)
        img = vae.decode(tokens)
        z = tokens.transpose(1, 2).reshape(2, 4, 4, 4) / LATENT_SCALE  # unpatchify, then vae.decode(tokens / 0.2325)
        direct = (vae.decoder(vae.post_quant_conv(z)).clamp(-1, 1) + 1) / 2
    assert img.shape == (2, 3, 8, 8) and torch.equal(img, direct)
    assert vae.encode(img).shape == (2, 16, 4)


@pytest.mark.parametrize("iterations", ["last", "all"])
def test_calibration_records_the_reference_iterations(tmp_path, model, iterations):
    from calib.capture import capture

    bundle = build(model.state_dict(), config="tiny", calib_iterations=iterations)
    steps = capture(bundle, classes=[1, 2, 3], seed=0, cache_dir=tmp_path, batch=2)
    sched = [s for s in mask_schedule(TINY, bundle.extra["sampling"]["num_iter"]) if s[0] != s[1]]
    per_batch = 1 if iterations == "last" else len(sched)
    assert steps.counts == [per_batch, per_batch]
    buf = TINY.buffer_size
    # the masked span of each recorded step: the last iteration's only, or every iteration's in turn
    masked = [int((steps[i][4] == buf + 1).sum()) for i in range(per_batch)]
    assert masked == ([sched[-1][0]] if iterations == "last" else [n for n, _, _ in sched])
    assert steps[0][0].shape[0] == 4  # CFG: 2 images + 2 null rows
    with pytest.raises(UserError, match="calib_iterations"):
        build(model.state_dict(), config="tiny", calib_iterations="first")
