"""Calibration cache and resume (calib/cache.py)."""
from __future__ import annotations

import json

import pytest
import torch

from calib.cache import CalibCache, calib_key, state_dict_hash
from calib.observers import TensorObserver
from core.errors import UserError

GROUPS = torch.tensor([0, 1, 1, 2, 2, 2])
SAMPLER = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}
N_CHUNKS = 6


class Killed(Exception):
    """Stands for the process being killed in the middle of a capture."""


def _model() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"blocks.0.attn.qkv.weight": torch.randn(24, 8, generator=g), "blocks.0.attn.qkv.bias": torch.zeros(24)}


def _capture(i: int) -> dict:
    """What the FP generation would give for batch i: a step's inputs and token groups."""
    g = torch.Generator().manual_seed(100 + i)
    return {"x": torch.randn(2, 6, 8, generator=g) * (1 + i), "groups": GROUPS, "step": i}


def _cache(root, seed=42, sampler=SAMPLER, n_samples=12, model=None) -> CalibCache:
    return CalibCache(root, calib_key(model or _model(), sampler, seed, n_samples), N_CHUNKS)


def _capture_all(cache: CalibCache, kill_at: int | None = None) -> list[int]:
    """The capture loop of the frontends; raises Killed on reaching chunk ``kill_at``."""
    captured = []
    for i in range(cache.n_chunks):
        if cache.has(i):
            continue
        if i == kill_at:
            raise Killed
        cache.save(i, _capture(i))
        captured.append(i)
    return captured


def _statistics(cache: CalibCache) -> dict:
    obs = TensorObserver("blocks.0.attn.qkv.input")
    for i in range(cache.n_chunks):
        chunk = cache.load(i)
        obs.update(chunk["x"], chunk["groups"], step=chunk["step"])
    return obs.state_dict()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            _assert_same_state(value, b[key])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_resume_after_kill_gives_identical_statistics(tmp_path):
    cache = _cache(tmp_path / "resumed")
    with pytest.raises(Killed):
        _capture_all(cache, kill_at=3)
    (cache.path / "chunk_00003.pt.tmp.4242").write_bytes(b"half a chunk")  # killed while writing 3
    resumed = _cache(tmp_path / "resumed")
    assert resumed.path == cache.path and resumed.first_missing() == 3 and not resumed.complete
    assert _capture_all(resumed) == [3, 4, 5]
    assert resumed.complete and _capture_all(resumed) == []

    straight = _cache(tmp_path / "straight")
    assert _capture_all(straight) == list(range(N_CHUNKS))
    _assert_same_state(_statistics(resumed), _statistics(straight))


def test_observer_state_in_chunks_resumes_identically(tmp_path):
    """Chunks that carry the running observer state: resume from the last one written."""
    def run(cache, kill_at=None):
        start = cache.first_missing()
        if start:
            obs = TensorObserver.from_state(cache.load(start - 1)["observers"]["qkv"])
        else:
            obs = TensorObserver("qkv")
        for i in range(start, cache.n_chunks):
            if i == kill_at:
                raise Killed
            chunk = _capture(i)
            obs.update(chunk["x"], chunk["groups"], step=i)
            cache.save(i, {"inputs": chunk, "observers": {"qkv": obs.state_dict()}})
        return obs.state_dict()

    with pytest.raises(Killed):
        run(_cache(tmp_path / "a"), kill_at=2)
    _assert_same_state(run(_cache(tmp_path / "a")), run(_cache(tmp_path / "b")))


def test_key_changes_with_seed_settings_samples_and_weights(tmp_path):
    base = _cache(tmp_path).key_hash
    assert _cache(tmp_path).key_hash == base
    changed = _model()
    changed["blocks.0.attn.qkv.bias"][3] = 1e-6
    others = [
        _cache(tmp_path, seed=43),
        _cache(tmp_path, sampler={**SAMPLER, "top_p": 0.95}),
        _cache(tmp_path, n_samples=16),
        _cache(tmp_path, model=changed),
        CalibCache(tmp_path, calib_key(_model(), SAMPLER, 42, 12), N_CHUNKS + 1),
    ]
    assert len({c.key_hash for c in others} | {base}) == len(others) + 1
    key = json.loads((tmp_path / base / "key.json").read_text())
    assert key["seed"] == 42 and key["sampler"] == SAMPLER and key["n_chunks"] == N_CHUNKS


def test_state_dict_hash_sees_content_names_and_dtypes():
    sd = _model()
    h = state_dict_hash(sd)
    assert state_dict_hash({k: v.clone() for k, v in reversed(sd.items())}) == h
    assert state_dict_hash({k: v.to(torch.bfloat16) for k, v in sd.items()}) != h
    assert state_dict_hash({"renamed." + k: v for k, v in sd.items()}) != h
    w = sd["blocks.0.attn.qkv.weight"]
    assert state_dict_hash({**sd, "blocks.0.attn.qkv.weight": w.T.contiguous().T}) == h  # layout is not content
    assert state_dict_hash({**sd, "blocks.0.attn.qkv.weight": w.reshape(8, 24)}) != h
    assert state_dict_hash({**sd, "scalar": torch.tensor(1.0), "_extra_state": {"v": 1}}) != h


def test_chunks_must_load_with_weights_only(tmp_path):
    cache = _cache(tmp_path)
    with pytest.raises(TypeError, match=r"chunk 0\['obs'\] is a TensorObserver"):
        cache.save(0, {"obs": TensorObserver("x")})
    assert not cache.has(0)
    cache.save(0, {"obs": TensorObserver("x").state_dict(), "shape": (2, 3), "none": None})
    assert cache.load(0)["shape"] == (2, 3)


def test_damaged_or_missing_chunks_are_user_errors(tmp_path):
    cache = _cache(tmp_path)
    with pytest.raises(UserError, match="no chunk 1"):
        cache.load(1)
    cache.chunk_path(1).write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="has no checksum.*delete .* and re-run to rebuild it"):
        cache.load(1)
    with pytest.raises(IndexError):
        cache.has(N_CHUNKS)


# -- captured steps: KV caches stored trimmed, generation batch size ----------------------------------

def _tiny_var(tmp_path):
    from frontends import load_model
    from tests.test_family_compile import _var

    args = _var(tmp_path)
    return args, load_model(args[0], tokenizer=args[2])


def test_kv_caches_are_stored_trimmed_and_read_back_exactly(tmp_path):
    from calib.capture import capture

    _, bundle = _tiny_var(tmp_path)
    recorded = []

    def recording_step(*inputs):
        recorded.append(tuple(t.clone() for t in inputs))
        return bundle.module(*inputs)

    with torch.no_grad():
        bundle.extra["generate"](torch.tensor([0, 1]), 0, step=recording_step)
    steps = capture(bundle, classes=[0, 1], seed=0, cache_dir=tmp_path / "cache", batch=2)
    assert len(steps) == len(recorded) > 2
    for got, want in zip(steps, recorded, strict=True):
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    saved = steps.cache.load(0)
    k = bundle.input_names.index("k_cache")
    stored = [s[k].shape[-2] for s in saved["steps"]]
    full = recorded[0][k].shape[-2]
    assert stored[0] == 0 and stored == sorted(stored) and stored[-1] < full  # what earlier steps wrote
    assert sum(stored) < 0.5 * full * len(stored)


def test_calib_batch_sets_the_generation_batches(tmp_path, capsys):
    """--calib-batch N: samples / N generations of N images, each giving one calibration batch per step."""
    from tools.compile import main

    args, bundle = _tiny_var(tmp_path)
    scales = len(bundle.extra["model"].config.patch_nums)
    for batch, generations in ((1, 4), (2, 2), (4, 1)):
        out = tmp_path / f"b{batch}"
        assert main([*args, "--recipe", "minmax", "--calib-samples", "4", "--calib-batch", str(batch),
                     "--calib-cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["calibration"]["batches"] == generations * scales, batch
    assert main([*args, "--calib-batch", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--calib-batch must be at least 1" in capsys.readouterr().err


def test_corrupted_chunk_is_an_error_that_says_how_to_rebuild(tmp_path):
    """Flipped bytes inside a chunk's tensor data (still a loadable file) are found by the chunk's checksum."""
    cache = _cache(tmp_path)
    _capture_all(cache)
    path = cache.chunk_path(2)
    data = bytearray(path.read_bytes())
    start = data.find(b"data/0") + 200  # inside the first tensor's storage: torch.load would not notice
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["x"], _capture(2)["x"])  # loads, other values
    with pytest.raises(UserError, match=r"chunk_00002\.pt is damaged \(its checksum does not match\): "
                                        r"delete .* \(or pass another --calib-cache\) and re-run to rebuild it"):
        cache.load(2)
    cache.load(1)  # the others still read
    cache.checksum_path(3).unlink()
    with pytest.raises(UserError, match="chunk_00003.pt has no checksum"):
        cache.load(3)


def test_calib_cache_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "cache").write_text("not a directory")
    with pytest.raises(UserError, match="cannot create .*another --calib-cache"):
        _cache(tmp_path / "cache")
