"""Infinity family on tiny random configs: the official key layout, step-wise == teacher-forced full
forward, the text path (a tiny random T5 saved to a temp dir), the bitwise sampler, and tools.compile
with every recipe to TensorRT-legal ONNX that onnxruntime runs like torch."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from frontends.infinity import (
    CONFIGS,
    Infinity,
    InfinityStep,
    apply_rope,
    build,
    detect,
    rope_table,
    sample_bits,
)

transformers = pytest.importorskip("transformers", reason="the T5 text encoder needs transformers (dev extra)")

TINY = CONFIGS["tiny"]
WORDS = ["a", "an", "the", "of", "on", "in", "with", "at", "red", "fox", "cat", "dog", "photo", "painting", "style",
         "sky", "city", "tree", "night", "light"]


def random_infinity(seed: int = 0) -> Infinity:
    """Tiny Infinity with every parameter random (ada_gss, biases, cfg_uncond ... not at their init)."""
    torch.manual_seed(seed)
    model = Infinity(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def save_tiny_t5(directory, d_model: int = TINY.text_channels) -> None:
    """A random T5 encoder and a word-level tokenizer (``tokenizers``), saved as a local directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(directory)
    torch.manual_seed(1)
    cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(cfg).eval().save_pretrained(directory)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    save_tiny_t5(d)
    return d


def _text(batch=2):
    torch.manual_seed(5)
    feats = torch.randn(batch, TINY.text_maxlen, TINY.text_channels)
    mask = torch.zeros(batch, TINY.text_maxlen, dtype=torch.bool)
    for i in range(batch):
        mask[i, : 3 + 2 * i] = True
    return feats, mask


# -- layout ---------------------------------------------------------------------------------------

OFFICIAL_2B_KEYS = {  # from the released infinity_2b_reg.pth (block_chunks=8, 4 blocks each)
    "cfg_uncond": (512, 2048), "text_norm.weight": (2048,), "text_proj_for_sos.ca.mat_q": (1, 16, 128),
    "text_proj_for_sos.ca.mat_kv.weight": (4096, 2048), "text_proj_for_ca.0.weight": (2048, 2048),
    "text_proj_for_ca.2.weight": (2048, 2048), "pos_start": (1, 1, 2048), "lvl_embed.weight": (15, 2048),
    "word_embed.weight": (2048, 32), "shared_ada_lin.1.weight": (12288, 2048),
    "block_chunks.7.module.3.ada_gss": (1, 1, 6, 2048), "block_chunks.0.module.0.sa.scale_mul_1H11": (1, 16, 1, 1),
    "block_chunks.0.module.0.sa.mat_qkv.weight": (6144, 2048), "block_chunks.0.module.0.sa.zero_k_bias": (2048,),
    "block_chunks.0.module.0.ca.mat_q.weight": (2048, 2048), "block_chunks.0.module.0.ca.mat_kv.weight": (4096, 2048),
    "block_chunks.0.module.0.ca.v_bias": (2048,), "block_chunks.0.module.0.ca_norm.weight": (2048,),
    "block_chunks.0.module.0.ffn.fc1.weight": (8192, 2048), "head_nm.ada_lin.1.weight": (4096, 2048),
    "head.weight": (64, 2048),
}


def test_2b_layout_has_the_official_names_and_shapes():
    from frontends.infinity import _layout

    layout = _layout("2b")
    for key, shape in OFFICIAL_2B_KEYS.items():
        assert layout[key] == shape, key
    assert not any(k.startswith("blocks.") for k in layout)
    assert sum(k.endswith(".ada_gss") for k in layout) == 32
    n = sum(math.prod(s) for s in layout.values())
    assert 2.0e9 < n < 2.4e9  # "Infinity-2B"


def test_strict_load_detection_and_mismatch_message():
    sd = random_infinity().state_dict()
    assert detect(sd) == "tiny"
    bundle = build(sd, config="tiny")
    assert bundle.family == "infinity"
    for k, v in bundle.extra["model"].state_dict().items():
        assert torch.equal(v, sd[k]), k
    bad = dict(sd)
    bad.pop("block_chunks.1.module.0.ca.mat_kv.weight")
    bad["block_chunks.0.module.0.sa.extra"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing keys: block_chunks\.1\.module\.0\.ca\.mat_kv\.weight.*unexpected keys"):
        build(bad, config="tiny")
    assert detect({"pos_1LC": torch.zeros(1)}) is None
    # masks some official files carry are dropped, as the official loader does
    assert detect({**sd, "lvl_1L": torch.zeros(1, 14)}) == "tiny"
    build({**sd, "attn_bias_for_masking": torch.zeros(1, 1, 14, 14)}, config="tiny")
    # a checkpoint of no known size: the configuration is read from its shapes
    from frontends.infinity import config_from_state_dict

    cfg = config_from_state_dict(sd)
    assert (cfg.depth, cfg.width, cfg.heads, cfg.block_chunks, cfg.text_channels, cfg.text_maxlen, cfg.pool_heads,
            cfg.codebook_dim, cfg.ffn_hidden) == (2, 64, 2, 2, 32, 8, 2, 4, 256)


# -- numerics -------------------------------------------------------------------------------------

def test_rope_matches_a_direct_rotation():
    """Pair (x0, x1) of head dim 2m at grid point (i, j) rotates by angle pos * 10000^(-2m'/half)."""
    cfg = TINY
    table = rope_table(cfg, 1.0)  # schedule 1x1, 2x2, 3x3 on a full 3x3 grid
    assert table.shape == (1 + 4 + 9, 2, cfg.head_dim // 2)
    half = cfg.head_dim // 2
    inv = [10000 ** (-(2 * m) / half) for m in range(half // 2)]
    # token 1 + 3 = scale 1 (2x2), (i, j) = (1, 1): grid point round(1 * 3/2) = 2 for both axes
    expect = torch.tensor([2 * f for f in inv] + [2 * f for f in inv])
    torch.testing.assert_close(table[4, 0], expect.cos())
    torch.testing.assert_close(table[4, 1], expect.sin())
    x = torch.randn(1, 1, 14, cfg.head_dim)
    y = apply_rope(x, table)
    c, s = table[:, 0], table[:, 1]
    torch.testing.assert_close(y[..., 0::2], c * x[..., 0::2] - s * x[..., 1::2])
    torch.testing.assert_close(y[..., 1::2], s * x[..., 0::2] + c * x[..., 1::2])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_cross_attention_masks_padding_like_varlen_attention():
    model = random_infinity()
    block = model.block_chunks[0].module[0]
    x = torch.randn(2, 5, TINY.width)
    text = torch.randn(2, TINY.text_maxlen, TINY.width)
    bias = torch.zeros(2, TINY.text_maxlen)
    bias[0, 3:], bias[1, 6:] = -torch.inf, -torch.inf
    out = block.ca(x, text, bias)
    ca = block.ca
    for b, n in ((0, 3), (1, 6)):  # each sample attends to its own n tokens only (official flash varlen)
        kv = F.linear(text[b, :n], ca.mat_kv.weight, torch.cat((ca.zero_k_bias, ca.v_bias))).view(n, 2, 2, 32)
        q = ca.mat_q(x[b]).view(5, 2, 32).transpose(0, 1)
        o = F.scaled_dot_product_attention(q, kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1))
        torch.testing.assert_close(out[b], ca.proj(o.transpose(0, 1).reshape(5, 64)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_stepwise_equals_teacher_forced_full_forward(ratio):
    model = random_infinity()
    feats, mask = _text()
    first = sample_bits(model, feats, mask, ratio=ratio, cfg=1.0, tau=1.0, seed=3)
    assert [tuple(b.shape) for b in first.bits] == [(2, h, w, TINY.codebook_dim) for h, w in TINY.schedule(ratio)]
    seen = []

    def recording(*inputs):
        out = InfinityStep(model)(*inputs)
        seen.append(out[0][:2])  # the conditional half
        return out

    again = sample_bits(model, feats, mask, ratio=ratio, cfg=1.0, tau=1.0, seed=3, step=recording, fixed_bits=first.bits)
    full = model(feats, mask, first.bits, ratio)
    assert full.shape == (2, sum(h * w for h, w in TINY.schedule(ratio)), 2 * TINY.codebook_dim)
    torch.testing.assert_close(torch.cat(seen, dim=1), full, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(first.bits, again.bits))


def test_sampler_cfg_seeds_and_codes():
    model = random_infinity()
    feats, mask = _text(3)
    a = sample_bits(model, feats, mask, seed=7)
    b = sample_bits(model, feats[1:], mask[1:], seed=7 + 0x9E3779B1)  # image 1 alone, with its own seed
    assert all(torch.equal(x[1:2], y[:1]) for x, y in zip(a.bits, b.bits))  # batch-independent
    assert all(((x == 0) | (x == 1)).all() for x in a.bits)
    # the summed codes are the upsampled +-1/sqrt(d) codes of every scale
    d, (H, W) = TINY.codebook_dim, TINY.schedule(1.0)[-1]
    s = 1 / math.sqrt(d)
    expect = sum(F.interpolate((bits.float() * 2 * s - s).permute(0, 3, 1, 2)[:, :, None],
                               size=(1, H, W), mode="trilinear")
                 for bits, (h, w) in zip(a.bits, TINY.schedule(1.0)))
    torch.testing.assert_close(a.codes, expect)
    # CFG mixes the tau-scaled logits as cfg * cond + (1 - cfg) * uncond
    probs, logits = [], []

    def recording(*inputs):
        out = InfinityStep(model)(*inputs)
        logits.append(out[0])
        return out

    sample_bits(model, feats, mask, seed=7, cfg=4.0, tau=0.5, top_k=0, top_p=0.0, step=recording,
                on_probs=lambda si, p: probs.append(p))
    mixed = (4.0 * logits[0][:3] - 3.0 * logits[0][3:]) / 0.5
    torch.testing.assert_close(probs[0], mixed.reshape(3, -1, 2).softmax(-1))


def test_text_encoder_from_a_local_directory(t5_dir):
    from frontends.t5_text import T5TextEncoder

    enc = T5TextEncoder(t5_dir, TINY.text_maxlen)
    feats, mask = enc(["a red fox", "the city at night with light"])
    assert feats.shape == (2, TINY.text_maxlen, TINY.text_channels)
    assert mask.sum(1).tolist() == [4, 7]  # words + </s>
    direct = enc.model(input_ids=enc.tokenizer(["a red fox"], return_tensors="pt").input_ids).last_hidden_state
    torch.testing.assert_close(feats[0, :4], direct[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="not a directory"):
        T5TextEncoder(t5_dir / "nope", 8)


def test_bundle_generates_from_prompts(t5_dir):
    sd = random_infinity().state_dict()
    bundle = build(sd, config="tiny", text_encoder=str(t5_dir), prompts=["a red fox", "a cat photo"])
    bits = bundle.extra["generate"](torch.tensor([0, 1]), 0)
    assert [tuple(b.shape) for b in bits] == [(2, 1, 1, 4), (2, 2, 2, 4), (2, 3, 3, 4)]
    no_text = build(sd, config="tiny")
    shipped = no_text.extra["prompts"]  # frontends/prompts/infinity_calibration.txt, comments dropped
    assert len(shipped) == 52 and len(set(shipped)) == 52 and not any(p.startswith("#") for p in shipped)
    with pytest.raises(UserError, match="--text-encoder"):
        no_text.extra["generate"](torch.tensor([0]), 0)


# -- compile --------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["minmax", "smoothquant", "ptq4arvg", "shiftsum"])
def test_compiles_to_legal_onnx(tmp_path, t5_dir, recipe):
    from tools.compile import main

    torch.save(random_infinity().state_dict(), tmp_path / "infinity.pth")
    (tmp_path / "prompts.txt").write_text("a red fox\n# comment\nthe city at night\na cat photo\na dog painting\n")
    out = tmp_path / "out"
    rc = main([str(tmp_path / "infinity.pth"), "--text-encoder", str(t5_dir), "--prompts", str(tmp_path / "prompts.txt"),
               "--recipe", recipe, "--out", str(out), "--calib-samples", "2", "--calib-cache", str(tmp_path / "cache")])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    assert r["family"] == "infinity"
    assert "self-generated" in r["calibration"]["source"]
    o = r["onnx"]
    assert o["tensorrt_lint"]["ok"], o["tensorrt_lint"]["violations"]
    assert o["ort_reference_max_abs_diff"] <= 1e-4 or o["ort_reference_sqnr_db"] >= 50, o
    gemms = o["tensorrt_lint"]["int8_gemms"]
    assert sum(gemms.values()) >= 12
    assert r["fidelity"]["min_sqnr_db"] > 10
    if recipe == "minmax":  # the one exported graph serves another aspect ratio (other token counts, rope rows)
        from tools.generate import main as generate

        tiny_vae_file(tmp_path / "vae.pth")
        assert generate([str(tmp_path / "infinity.pth"), "--tokenizer", str(tmp_path / "vae.pth"), "--text-encoder",
                         str(t5_dir), "--prompt", "a red fox", "--aspect-ratio", "0.5", "--onnx", str(out / "model.onnx"),
                         "--device", "cpu", "--out", str(tmp_path / "gen")]) == 0
        import numpy as np

        assert np.load(tmp_path / "gen" / "samples.npz")["arr_0"].shape == (1, 4, 8, 3)  # 2x4 tokens, patch 2


# -- BSQ VAE decoder and tools.generate --------------------------------------------------------------

def tiny_vae_file(path, wrapped: bool = True):
    """A random tiny BSQ VAE checkpoint as the official files hold it: {"vae": state_dict}, with an
    encoder part generation never reads; ``wrapped=False`` spells convs/norms without the wrapper."""
    from frontends.bsq_vae import VAE_CONFIGS, BSQDecoder

    torch.manual_seed(2)
    dec = BSQDecoder(VAE_CONFIGS["tiny"])
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0, 0.2)
    sd = dec.state_dict()
    if not wrapped:
        sd = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias").replace(".norm.", "."): v
              for k, v in sd.items()}
    torch.save({"vae": {**sd, "encoder.conv_in.conv.weight": torch.zeros(32, 3, 3, 3)}}, path)
    return dec


def test_bsq_decoder_loads_both_spellings_and_decodes(tmp_path):
    from frontends.bsq_vae import load_bsq_decoder

    ref = tiny_vae_file(tmp_path / "a.pth", wrapped=True)
    tiny_vae_file(tmp_path / "b.pth", wrapped=False)
    a, b = load_bsq_decoder(tmp_path / "a.pth", 4), load_bsq_decoder(tmp_path / "b.pth", 4)
    assert "decoder.up.1.upsample.conv.conv.weight" in a.state_dict()  # the official nesting
    z = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(a(z), ref(z))
    torch.testing.assert_close(b(z), ref(z))
    assert a(z).shape == (2, 3, 6, 6) and a(z).abs().max() <= 1
    # the decoder's first layers, directly: conv_in then a GroupNorm/SiLU/conv residual block
    d = ref.decoder
    h = d.conv_in.conv(z)
    r = d.mid.block_1
    h1 = h + r.conv2.conv(F.silu(r.norm2.norm(r.conv1.conv(F.silu(F.group_norm(h, 32, r.norm1.norm.weight, r.norm1.norm.bias, 1e-6))))))
    torch.testing.assert_close(r(h), h1)
    with pytest.raises(UserError, match="4-bit codes; the model makes 32-bit"):
        load_bsq_decoder(tmp_path / "a.pth", 32)
    torch.save({"vae": {"encoder.x": torch.zeros(1)}}, tmp_path / "c.pth")
    with pytest.raises(UserError, match="no decoder"):
        load_bsq_decoder(tmp_path / "c.pth", 4)


def test_generate_from_a_prompt_writes_images(tmp_path, t5_dir, capsys):
    import numpy as np

    from tools.generate import main

    torch.save(random_infinity().state_dict(), tmp_path / "infinity.pth")
    vae = tiny_vae_file(tmp_path / "vae.pth")
    out = tmp_path / "out"
    args = [str(tmp_path / "infinity.pth"), "--tokenizer", str(tmp_path / "vae.pth"), "--text-encoder", str(t5_dir),
            "--prompt", "a red fox", "--prompt", "the city at night", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (2, 6, 6, 3)
    tokens = torch.load(out / "tokens.pt", weights_only=True)
    bits = tokens if isinstance(tokens, list) else tokens["tokens"]
    # the images are the decoder's output for the sampled bits (summed codes of every scale)
    s = 0.5
    H, W = 3, 3
    summed = sum(F.interpolate((b[:1].float() * 2 * s - s).permute(0, 3, 1, 2)[:, :, None], size=(1, H, W),
                               mode="trilinear") for b in bits)
    expect = ((vae(summed[:, :, 0]) + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert np.abs(images[0].astype(int) - expect[0].numpy().astype(int)).max() <= 1
    # a class-conditional option on a text-to-image model, and a prompt without a text encoder, fail cleanly
    assert main([str(tmp_path / "infinity.pth"), "--tokenizer", str(tmp_path / "vae.pth"), "--device", "cpu",
                 "--out", str(tmp_path / "o2")]) == 2
    assert "text-to-image model (infinity): pass --prompt" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


# -- folding ----------------------------------------------------------------------------------------

def test_folds_leave_fp_outputs_unchanged_and_fire():
    """smooth, sym-shift and gps on the traced step (every scale's inputs as calibration data): each
    changes its sinks' weights and leaves the float outputs as they were. The regions are the
    cross-attention's ca_norm -> ca.mat_q of every block and head_nm -> head; the self-attention and
    FFN inputs are modulated by the shared AdaLN (shared_ada_lin output + each block's ada_gss), which
    no per-block parameter can absorb, so they are quantized without a fold (README)."""
    import copy as _copy

    from core.numerics import relative_error, run_outputs
    from core.qmath import Precision
    from frontends import trace
    from passes import gps, smooth, sym_shift  # noqa: F401  (registers the passes)
    from passes.infra import PassContext, PassManager, QuantConfig, get_attr

    bundle = build(random_infinity().state_dict(), config="tiny")
    steps = []
    step = bundle.module

    def recording(*inputs):
        steps.append(inputs)
        return step(*inputs)

    sample_bits(bundle.extra["model"], *_text(2), seed=1, step=recording)
    bundle.calib_inputs = steps
    gm = trace(bundle)
    fp = _copy.deepcopy(gm)
    ctx = PassContext(config=QuantConfig(Precision("W8A8", 8, 8)), calib_inputs=steps, probe_inputs=bundle.example_inputs)
    gm = PassManager("canonicalize,observe").run(gm, ctx)
    sinks = ["block_chunks.0.module.0.ca.mat_q", "block_chunks.1.module.0.ca.mat_q", "head"]
    for fold, changes in (("smooth", "weight"), ("sym-shift", "bias"), ("gps", "weight")):
        before = _copy.deepcopy(gm)
        pm = PassManager(f"{fold},observe")
        gm = pm.run(gm, ctx)
        assert pm.records[0]["stats"]["regions"] == 3, fold
        assert pm.records[0]["probe_rel_err"] < 1e-5, fold
        for site in sinks:
            new = get_attr(gm, f"{site}.{changes}")
            old = dict(before.state_dict()).get(f"{site}.{changes}", torch.zeros_like(new))
            assert not torch.allclose(new, old), (fold, site)
    assert max(relative_error(run_outputs(fp, x), run_outputs(gm, x)) for x in steps) < 1e-5


def test_compile_without_text_encoder_or_with_evaluate_is_one_error_line(tmp_path, capsys):
    from tools.compile import main

    torch.save(random_infinity().state_dict(), tmp_path / "infinity.pth")
    common = [str(tmp_path / "infinity.pth"), "--calib-samples", "2", "--calib-cache", str(tmp_path / "cache")]
    assert main([*common, "--out", str(tmp_path / "a")]) == 2
    assert "pass --text-encoder DIR" in capsys.readouterr().err
    assert main([*common, "--evaluate", "4", "--out", str(tmp_path / "b")]) == 2
    assert "text-to-image" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    assert main([*common, "--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "c")]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_2b_schedules_and_rope_cover_every_official_aspect_ratio():
    """The official templates (h/w and w/h), 13 scales at 1M (1024 px for 1:1); the cache holds the
    longest; at the last scale a token (i, j) takes the angles of grid point (i, j)."""
    cfg = CONFIGS["2b"]
    assert len(cfg.ratios) == 15 and cfg.schedule(1.0)[-1] == (64, 64) and cfg.schedule(0.5)[-1] == (45, 90)
    assert cfg.schedule(1.9)[-1] == (90, 45)  # nearest template, as the official h_div_w_template
    assert cfg.seq_len == max(sum(h * w for h, w in hws) for _, hws in cfg.ratios) == 11269
    table = rope_table(cfg, 3.0)
    hws = cfg.schedule(3.0)
    assert table.shape == (sum(h * w for h, w in hws), 2, 64)
    H, W = hws[-1]
    i, j = 100, 30
    row = table[table.shape[0] - H * W + i * W + j]
    inv = 10000.0 ** (-torch.arange(0, 64, 2).double() / 64)
    torch.testing.assert_close(row[0].double(), torch.cat((i * inv, j * inv)).cos(), rtol=1e-4, atol=1e-4)


def test_prompt_on_a_class_conditional_model_is_refused(tmp_path, capsys):
    from frontends.var import CONFIGS as VAR_CONFIGS
    from frontends.var import VAR
    from frontends.var_vqvae import VQVAE, VQVAE_CONFIGS
    from tools.generate import main

    torch.manual_seed(0)
    torch.save(VAR(VAR_CONFIGS["tiny"]).state_dict(), tmp_path / "var.pth")
    torch.save(VQVAE(VQVAE_CONFIGS["tiny"]).state_dict(), tmp_path / "vae.pth")
    assert main([str(tmp_path / "var.pth"), "--tokenizer", str(tmp_path / "vae.pth"), "--prompt", "a fox",
                 "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    assert "class-conditional model (var); use --classes" in capsys.readouterr().err


def test_bench_infinity_step_and_generation(capsys):
    """tools.bench's Infinity workloads (the 2B one is a GPU job; its tiny twin runs here): the last-scale
    step on onnxruntime int8 vs FP, and a whole generation through the runner's step."""
    from compiler.bench import workloads
    from tools.bench import main

    b = workloads()["infinity-tiny"](1)
    assert len(b.calib_inputs) == 3 and b.calib_inputs[2][0].shape == (2, 9, TINY.width)  # every scale, lazily
    step = b.calib_inputs[2]
    assert step[5].tolist() == list(range(5, 14)) and step[-1].tolist() == [2] * 9  # positions, token groups
    bias = b.calib_inputs[1][6]  # scale 1 (2x2) sees the 5 tokens written so far, not the rest of the cache
    assert bias.shape == (4, 14) and (bias[:, :5] == 0).all() and torch.isinf(bias[:, 5:]).all()
    assert main(["--model", "infinity-tiny", "--backends", "torch-fp32,ort-int8", "--batch", "1",
                 "--repeats", "1", "--warmup", "0"]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split("=")[1]) > 0
    assert main(["--model", "infinity-tiny", "--steps", "all", "--backends", "torch-fp32,torch-int8",
                 "--repeats", "1", "--warmup", "0"]) == 0
    assert "full generation" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["minmax", "ptq4arvg"])
def test_cuda_lowering_equals_fake_quant(recipe):
    """The GPU backend's lowering (its torch reference ops on the CPU) takes every quantized GEMM of the
    Infinity step and equals the fake-quant graph on every scale's inputs."""
    from backends.torch_int8 import fuse_attention
    from core.numerics import sqnr_db
    from tests.test_cuda_lower import lowered, outputs, quantize, quantized_linears

    b = build(random_infinity().state_dict(), config="tiny")
    steps = []

    def recording(*inputs):
        steps.append(inputs)
        return b.module(*inputs)

    sample_bits(b.extra["model"], *_text(1), seed=0, step=recording)
    _, q, _ = quantize(b, recipe, steps)
    q = fuse_attention(q)[0]
    low, stats = lowered(q)
    assert stats["qgemm"] == quantized_linears(q) == 15  # 2 blocks x 7 + head
    assert stats["fused"]["adaln_layernorm"] > 0 and stats["fused"]["gelu_epilogue"] == 2
    for inputs in steps:
        for ref, out in zip(outputs(q, inputs), outputs(low, inputs), strict=True):
            assert sqnr_db(ref, out) > 60  # measured >= 134 dB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_target_generates_from_a_prompt_on_the_gpu(tmp_path, t5_dir):
    """The GPU runner: a tiny Infinity compiled for --target cuda generates from a prompt on CUDA, and its bits
    agree with the FP model's on the GPU as closely as the CPU fake-quant graph's agree on the CPU."""
    from tools.compile import main as compile_main
    from tools.generate import main as generate

    torch.save(random_infinity().state_dict(), tmp_path / "infinity.pth")
    tiny_vae_file(tmp_path / "vae.pth")
    (tmp_path / "prompts.txt").write_text("a red fox\nthe city at night\na cat photo\na dog painting\n")
    common = [str(tmp_path / "infinity.pth"), "--text-encoder", str(t5_dir)]
    for target in ("cuda", "torch"):
        assert compile_main([*common, "--prompts", str(tmp_path / "prompts.txt"), "--recipe", "minmax", "--target", target,
                             "--out", str(tmp_path / target), "--calib-samples", "2",
                             "--calib-cache", str(tmp_path / "cache")]) == 0
    prompts = [a for p in ("a red fox", "the city at night", "a cat photo", "a dog painting") for a in ("--prompt", p)]
    gen = [*common, "--tokenizer", str(tmp_path / "vae.pth"), *prompts]
    runs = {("cuda", "q"): ["--quantized", str(tmp_path / "cuda")], ("cuda", "fp"): ["--device", "cuda"],
            ("cpu", "q"): ["--quantized", str(tmp_path / "torch"), "--device", "cpu"], ("cpu", "fp"): ["--device", "cpu"]}
    for (device, kind), extra in runs.items():
        assert generate([*gen, *extra, "--out", str(tmp_path / f"{kind}_{device}")]) == 0, (device, kind)

    def agreement(device):
        q, fp = (torch.load(tmp_path / f"{k}_{device}" / "tokens.pt", weights_only=True) for k in ("q", "fp"))
        q, fp = (t if isinstance(t, list) else t["tokens"] for t in (q, fp))
        return sum(int((a == b).sum()) for a, b in zip(q, fp)) / sum(b.numel() for b in fp)

    on_gpu, on_cpu = agreement("cuda"), agreement("cpu")
    assert on_gpu > 0.5 and on_gpu >= on_cpu - 0.1, (on_gpu, on_cpu)
