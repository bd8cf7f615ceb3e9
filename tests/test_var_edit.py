"""VAR zero-shot editing (inpainting, outpainting, class-conditional editing) in our driver, against a
direct re-implementation of the official ``demo_zero_shot_edit.ipynb`` procedure on a tiny random VAR."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from frontends.sampling import image_seed
from frontends.var import CONFIGS, VAR, VARStep, edit_mask, sample_tokens, scale_keep_masks
from frontends.var_vqvae import VQVAE, VQVAE_CONFIGS
from tests.test_frontend_var import _randomize

TINY = CONFIGS["tiny"]
TOP_K, TOP_P = 20, 0.9


@pytest.fixture(scope="module")
def tiny():
    return _randomize(VAR(TINY), 1), _randomize(VQVAE(VQVAE_CONFIGS["tiny"]), 2)


# ----------------------------------------------------------------------------- the official procedure, re-implemented

def official_get_edit_mask(patch_nums, y0, x0, y1, x1, inpainting):
    ph = pw = patch_nums[-1]
    m = torch.zeros(ph, pw)
    m[round(y0 * ph):round(y1 * ph), round(x0 * pw):round(x1 * pw)] = 1
    return 1 - m if inpainting else m


def official_replace_embedding(edit_mask, h_BChw, gt_BChw, ph, pw):
    B = h_BChw.shape[0]
    m = edit_mask.unsqueeze(0).expand(B, *edit_mask.shape) if edit_mask.ndim == 2 else edit_mask
    force = F.interpolate(m.unsqueeze(1).float(), size=(ph, pw), mode="bilinear", align_corners=False).gt(0.5).int()
    if ph * pw <= 3:
        force.fill_(1)
    return gt_BChw * force + h_BChw * (1 - force)


def official_sample(logits_BlV, top_k, top_p, rng):
    B, l, V = logits_BlV.shape
    logits_BlV = logits_BlV.clone()
    if top_k > 0:
        logits_BlV.masked_fill_(logits_BlV < logits_BlV.topk(top_k, dim=-1)[0].amin(dim=-1, keepdim=True), -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits_BlV.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return torch.multinomial(logits_BlV.softmax(dim=-1).view(-1, V), 1, replacement=True, generator=rng).view(B, l)


@torch.no_grad()
def official_infer_with_mask(var, vae, label, g_seed, gt_tokens, mask, cfg=1.5):
    """``autoregressive_infer_cfg_with_mask`` for one image (the official rng is one per call):
    no KV cache here, every scale re-runs the whole prefix under the block-causal mask.
    Returns the code maps ``h_BChw`` per scale (after the replacement) and the final ``f_hat``."""
    rng = torch.Generator().manual_seed(g_seed)
    c = var.config
    label_B = torch.tensor([c.num_classes if label < 0 else label])
    cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, c.num_classes))))
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    inputs = [cond_BD[:, None] + var.pos_start + lvl_pos[:, :var.first_l]]
    emb = vae.quantize.embedding
    f_hat, maps, cur_L, SN = 0, [], 0, len(c.patch_nums)
    step = VARStep(var)
    for si, pn in enumerate(c.patch_nums):
        cur_L += pn * pn
        x = torch.cat(inputs, dim=1)
        k, v = var.new_kv_cache(2)
        logits, _, _ = step(x, cond_BD, torch.arange(cur_L), var.attn_bias_for_masking[0, 0, :cur_L], k, v,
                            var.lvl_1L[0, :cur_L])
        logits = logits[:, cur_L - pn * pn:]
        t = cfg * si / (SN - 1)
        logits = (1 + t) * logits[:1] - t * logits[1:]
        idx_Bl = official_sample(logits, TOP_K, TOP_P, rng)
        h = emb(idx_Bl).transpose(1, 2).reshape(1, c.cvae, pn, pn)
        gt = emb(gt_tokens[si]).transpose(1, 2).reshape(1, c.cvae, pn, pn)
        h = official_replace_embedding(mask, h, gt, pn, pn)
        maps.append(h)
        f_hat, nxt = vae.quantize.get_next_autoregressive_input(si, f_hat, h)
        if nxt is not None:
            inputs.append((var.word_embed(nxt.flatten(2).transpose(1, 2)) + lvl_pos[:, cur_L:cur_L + c.patch_nums[si + 1] ** 2]
                           ).repeat(2, 1, 1))
    return maps, f_hat


def _inputs(vae, n=3):
    """Input images: random smooth pictures, tokenized as the official ``vae.img_to_idxBl`` does."""
    g = torch.Generator().manual_seed(5)
    images = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear").clamp(0, 1)
    return vae.img_to_idxBl(images)


# ----------------------------------------------------------------------------- tests

def test_edit_mask_is_the_official_one():
    pn = TINY.patch_nums
    for box in [(0.1, 0.1, 0.8, 0.8), (0.25, 0.0, 0.75, 1.0), (0.375, 0.125, 0.625, 0.875), (0.0, 0.5, 1.0, 1.0)]:
        for inpainting in (True, False):
            assert torch.equal(edit_mask(pn, box, inpainting=inpainting), official_get_edit_mask(pn, *box, inpainting))
    # 4x4 last scale, y0 = 0.375 -> round(1.5) = 2 (half to even), y1 = 0.625 -> round(2.5) = 2: an empty box
    assert edit_mask(pn, (0.375, 0.0, 0.625, 1.0), inpainting=False).sum() == 0
    m = edit_mask(pn, (0.25, 0.25, 0.75, 0.75), inpainting=True)
    assert m.tolist() == [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]


def test_scale_keep_masks_follow_replace_embedding():
    """Per scale, the tokens kept are exactly where the official replacement puts the ground truth."""
    pn = (1, 2, 3, 4, 6, 8)
    g = torch.Generator().manual_seed(0)
    for mask in [edit_mask(pn, (0.25, 0.25, 0.75, 0.75), inpainting=True), edit_mask(pn, (0.1, 0.3, 0.9, 0.6), inpainting=False),
                 torch.rand(2, 8, 8, generator=g).round()]:
        keeps = scale_keep_masks(mask, pn, 2)
        for p, keep in zip(pn, keeps):
            h, gt = torch.zeros(2, 1, p, p), torch.ones(2, 1, p, p)
            assert torch.equal(keep.float(), official_replace_embedding(mask, h, gt, p, p).flatten(1)), p
    keeps = scale_keep_masks(edit_mask(pn, (0.25, 0.25, 0.75, 0.75), inpainting=True), pn, 1)
    # 1x1 always kept; 2x2: every cell is 0.75 (> 0.5); 6x6: the 12 cells whose bilinear value is
    # 0 or exactly 0.5 (row/column 1.5 and 5.5 of the 8x8 mask) are regenerated
    assert [int(k.sum()) for k in keeps] == [1, 4, 8, 12, 24, 48]
    assert [int(k.sum()) for k in scale_keep_masks(torch.zeros(8, 8), pn, 1)] == [1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("task", ["inpaint", "outpaint", "classedit"])
def test_driver_equals_official_procedure(tiny, task):
    """Our driver (KV cache, batched, per-image generators) gives the official procedure's code maps
    and f_hat, and the kept tokens equal the input's at every scale."""
    var, vae = tiny
    gt = _inputs(vae)
    box = (0.25, 0.25, 0.75, 1.0)
    mask = edit_mask(TINY.patch_nums, box, inpainting=task != "outpaint")
    labels = [-1, -1, -1] if task != "classedit" else [3, 7, 1]
    seed = 11
    tokens = sample_tokens(var, labels, quantizer=vae.quantize, seed=seed, top_k=TOP_K, top_p=TOP_P,
                           edit_tokens=gt, keep_mask=mask)
    keeps = scale_keep_masks(mask, TINY.patch_nums, 3)
    generated = 0
    for si in range(len(TINY.patch_nums)):
        assert torch.equal(tokens[si][keeps[si]], gt[si][keeps[si]]), si
        generated += int((tokens[si][~keeps[si]] != gt[si][~keeps[si]]).sum())
    assert generated > 0  # the edit region was really sampled
    for i, label in enumerate(labels):
        maps, f_hat = official_infer_with_mask(var, vae, label, image_seed(seed, i), [t[i:i + 1] for t in gt], mask)
        for si, h in enumerate(maps):
            assert torch.equal(vae.quantize.token_map(tokens[si][i:i + 1]), h), (i, si)
        ours = vae.quantize.idxBl_to_fhat([t[i:i + 1] for t in tokens])
        torch.testing.assert_close(ours, f_hat, rtol=1e-5, atol=1e-5)


def test_all_ones_mask_reproduces_the_input_and_all_zeros_is_plain_generation(tiny):
    var, vae = tiny
    gt = _inputs(vae)
    kw = {"quantizer": vae.quantize, "seed": 4, "top_k": TOP_K, "top_p": TOP_P}
    kept = sample_tokens(var, [-1, 2, 5], edit_tokens=gt, keep_mask=torch.ones(4, 4), **kw)
    assert all(torch.equal(a, b) for a, b in zip(kept, gt))
    # all zeros: only the 1x1 scale is forced (official). With the plain run's own first token as
    # input, the edit run is the plain run, token for token.
    plain = sample_tokens(var, [-1, 2, 5], **kw)
    first_plain = [plain[0]] + gt[1:]
    zero = sample_tokens(var, [-1, 2, 5], edit_tokens=first_plain, keep_mask=torch.zeros(4, 4), **kw)
    assert all(torch.equal(a, b) for a, b in zip(zero, plain))
    # and with another first token it differs from plain generation after the first scale
    other = [(plain[0] + 1) % TINY.vocab_size] + gt[1:]
    moved = sample_tokens(var, [-1, 2, 5], edit_tokens=other, keep_mask=torch.zeros(4, 4), **kw)
    assert torch.equal(moved[0], other[0]) and not torch.equal(moved[-1], plain[-1])


def test_edit_runs_on_a_traced_graph(tiny):
    """The same driver runs any step callable: the fx-traced step gives the eager step's edit."""
    from frontends import trace
    from frontends.var import build

    var, vae = tiny
    bundle = build(var.state_dict(), config="tiny")
    gm = trace(bundle)
    gt = _inputs(vae)
    mask = edit_mask(TINY.patch_nums, (0.25, 0.25, 0.75, 0.75), inpainting=True)
    kw = {"quantizer": vae.quantize, "seed": 2, "top_k": TOP_K, "top_p": TOP_P, "edit_tokens": gt, "keep_mask": mask}
    eager = sample_tokens(var, [1, 2, 3], **kw)
    traced = sample_tokens(bundle.extra["model"], [1, 2, 3], step=gm, **kw)
    assert all(torch.equal(a, b) for a, b in zip(eager, traced))


def test_bad_edit_arguments(tiny):
    var, vae = tiny
    gt = _inputs(vae)
    with pytest.raises(UserError, match="both"):
        sample_tokens(var, [0, 1, 2], edit_tokens=gt)
    with pytest.raises(UserError, match="one \\[B, pn\\*pn\\] tensor per scale"):
        sample_tokens(var, [0, 1], edit_tokens=gt, keep_mask=torch.ones(4, 4))
    with pytest.raises(UserError, match="keep-mask"):
        sample_tokens(var, [0, 1, 2], edit_tokens=gt, keep_mask=torch.ones(2, 4, 4))
