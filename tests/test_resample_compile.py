"""Codebook resampling of self-generated calibration (method.md §12.3) inside capture and tools.compile."""
import json

import pytest
import torch

import calib.resample as resample_mod
from calib.capture import capture
from calib.resample import code_targets
from frontends import load_model
from frontends.var import standin_quantizer
from tests.test_family_compile import _var

CLASSES = [0, 7, 4, 1, 3]  # two generation batches (4 + 1)


@pytest.fixture(scope="module")
def var_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resample")
    args = _var(tmp)
    return tmp, args, load_model(args[0], tokenizer=args[2])


def _original(bundle):
    """The unforced generations of CLASSES in capture's batches: per scale, probs [N, L, V] and codes [N, L]."""
    probs, codes = {}, {}
    for i, labels in enumerate([CLASSES[:4], CLASSES[4:]]):
        tokens = bundle.extra["generate"](torch.tensor(labels), i,
                                          on_probs=lambda si, p: probs.setdefault(si, []).append(p))
        for si, t in enumerate(tokens):
            codes.setdefault(si, []).append(t)
    return [torch.cat(probs[si]) for si in sorted(probs)], [torch.cat(codes[si]) for si in sorted(codes)]


def test_resampled_capture_hits_targets_and_replays_consistent_inputs(var_bundle, monkeypatch):
    tmp, _, bundle = var_bundle
    var = bundle.extra["model"]
    steps = capture(bundle, classes=CLASSES, seed=0, cache_dir=tmp / "cache", resample=True)
    plain = capture(bundle, classes=CLASSES, seed=0, cache_dir=tmp / "cache")
    probs, codes = _original(bundle)
    maps, summaries = resample_mod.resample_generations(bundle, CLASSES, 0)
    assert summaries == steps.resample_summary  # deterministic: the maps the capture replayed
    assert [s["l1_after"] for s in steps.resample_summary] == [0] * var.num_scales
    moved = 0
    for si, (p, c, m) in enumerate(zip(probs, codes, maps, strict=True)):
        target = code_targets(p.mean(dim=(0, 1)), c.numel())
        assert torch.equal(torch.bincount(m.flatten(), minlength=p.shape[-1]), target), si
        assert steps.resample_summary[si]["reassigned"] == int((m != c).sum())  # redraws never land on the old code
        moved += int((m != c).sum())
    assert moved > 0  # 5 random samples never match the model's frequencies by chance

    # Step inputs follow the resampled maps: scale 1's embedded input is rebuilt here from the
    # resampled scale-0 codes through the tokenizer's f_hat update, independently of the capture.
    quantizer = bundle.extra["tokenizer"].quantize if bundle.extra["tokenizer"] is not None else standin_quantizer(var.config)
    pn = var.config.patch_nums[-1]
    for chunk, rows in ((0, slice(0, 4)), (1, slice(4, 5))):
        first = sum(steps.counts[:chunk])
        x1 = steps[first + 1][0]  # [2B, T, C]: cond rows then uncond rows, both fed the same tokens
        b = rows.stop - rows.start
        f_hat = torch.zeros(b, var.config.cvae, pn, pn)
        _, next_map = quantizer.get_next_autoregressive_input(0, f_hat, quantizer.token_map(maps[0][rows]))
        expected = var.embed_tokens(next_map.flatten(2).transpose(1, 2), var.begin_ends[1][0])
        torch.testing.assert_close(x1[:b], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x1[b:], expected, rtol=1e-5, atol=1e-6)
    changed0 = (maps[0] != codes[0]).flatten()
    if changed0.any():  # a redrawn scale-0 token changes that image's next input
        i = int(changed0.nonzero()[0])
        chunk, row = divmod(i, 4)
        first = sum(steps.counts[:chunk])
        assert not torch.equal(steps[first + 1][0][row], plain[first + 1][0][row])

    # resume: the maps and steps come from the cache, nothing is sampled again
    monkeypatch.setattr(resample_mod, "resample_generations", lambda *a, **k: pytest.fail("resampled again"))
    again = capture(bundle, classes=CLASSES, seed=0, cache_dir=tmp / "cache", resample=True)
    assert again.resample_summary == steps.resample_summary
    for a, b in zip(again[len(again) - 1], steps[len(steps) - 1], strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_compile_resample_with_dgc_reports_counts(var_bundle):
    import tools.compile as compile_tool

    tmp, args, _ = var_bundle
    out = tmp / "out"
    assert compile_tool.main([*args, "--recipe", "minmax", "--target", "torch", "--out", str(out), "--calib-samples", "4",
                              "--calib-cache", str(tmp / "cache2"), "--resample", "--dgc", "ranked"]) == 0
    cal = json.loads((out / "report.json").read_text())["calibration"]
    assert "codebook-resampled" in cal["source"] and "DGC ranked" in cal["source"]
    per_scale = cal["resample"]["per_scale"]
    assert [s["tokens"] for s in per_scale] == [4 * n * n for n in (1, 2, 3, 4)]
    assert all(s["l1_after"] == 0 and s["reassigned"] * 2 == s["l1_before"] for s in per_scale)
    assert cal["resample"]["reassigned"] == sum(s["reassigned"] for s in per_scale)
    kept = cal["dgc"]["kept_cond_samples"]
    assert len(kept) == cal["dgc"]["kept_cond"] and {k["class"] for k in kept} <= {0, 7, 4, 1}


def test_resample_refuses_other_families_and_given_data(tmp_path):
    import tools.compile as compile_tool

    rc = compile_tool.main(["builtin:tiny-block", "--resample", "--out", str(tmp_path / "o")])  # builtin:tiny-block: calibration data given
    assert rc == 2 and not (tmp_path / "o").exists()
