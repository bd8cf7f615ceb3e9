"""KV caches (``backends/cuda/kv_cache.py``) updated in place: the rewritten step returns what the functional
one returns, writes it into its cache inputs, returns those very tensors, also through
torch.compile; attended over their visible prefix: equal to the masked attention."""
import copy

import pytest
import torch

from backends.cuda.kv_cache import (attention_into_codes, cached_attention, cached_attention_codes,
                                    cached_attention_int8, in_place_caches, int8_caches, kv_write, kv_write_int8,
                                    qkv_into_caches, qlinear_qkv, visible_keys, visible_prefix,
                                    visible_prefix_attention)
from backends.cuda.lower import qlinear, to_device
from backends.cuda.reference import kv_dequantize, kv_quantize
from core.numerics import sqnr_db
from tests.test_cuda_lower import FAMILIES, _sqnr_to, compiled, lowered, outputs


def _clone(inputs):
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]


@pytest.mark.parametrize("family", FAMILIES)
def test_in_place_step_equals_the_functional_one(family):
    _, steps, _, q = compiled(family, "ptq4arvg")
    low, _ = lowered(q)
    ref_gm = copy.deepcopy(low)
    state = in_place_caches(low)
    names = [n.name for n in low.graph.nodes if n.op == "placeholder"]
    assert sorted(names[i] for i in state) == sorted(n for n in names if "cache" in n)
    assert sum(n.target is kv_write for n in low.graph.nodes) == sum(steps[0][i].shape[0] for i in state)  # layers
    assert not [n for n in low.graph.nodes if n.target is torch.stack and "cache" in str(n.args)]
    changed = 0
    for inputs in steps[:4]:
        expected = outputs(ref_gm, inputs)
        given = _clone(inputs)
        with torch.no_grad():
            got = low(*given)
        for i, j in state.items():
            assert got[j] is given[i]  # the cache output is the input, updated
            changed += not torch.equal(given[i], inputs[i])
        for a, b in zip(expected, got, strict=True):
            assert torch.equal(a, b.float())
    assert changed  # the steps wrote into their caches


def test_torch_compile_keeps_the_caches_in_place():
    """Through torch.compile's functionalization the writes land on the input: same tensors out, same values;
    with the attention over the visible prefix, as ``CudaStep`` runs it. (``aot_eager``: no C++ compiler
    needed in CI. Inductor then keeps ``kv_write`` on the input buffer, no copy: its generated code on the
    CPU, and the GPU profile in BENCHMARKS.md.)"""
    _, steps, _, q = compiled("var", "ptq4arvg")
    low, _ = lowered(q)
    ref_gm = copy.deepcopy(low)
    state = in_place_caches(low)
    mask = visible_prefix_attention(low)
    run = torch.compile(low, backend="aot_eager")
    inputs = steps[-1]
    given = _clone(inputs)
    with torch.no_grad(), visible_keys(visible_prefix(inputs[mask])):
        got = run(*given)
    for i, j in state.items():
        assert got[j] is given[i]
    for a, b in zip(outputs(ref_gm, inputs), got, strict=True):
        torch.testing.assert_close(b.float(), a, rtol=1e-4, atol=1e-4)


def test_other_graphs_are_left_alone():
    """A stack that is not every layer of one cache input, in order, is not a cache."""
    class Partial(torch.nn.Module):
        def forward(self, x, cache):
            pos = torch.arange(x.shape[1])
            return torch.stack([cache[1].index_copy(1, pos, x), cache[0].index_copy(1, pos, x)])

    gm = torch.fx.symbolic_trace(Partial())
    gm.graph.output_node().args = ((gm.graph.output_node().args[0],),)
    gm.recompile()
    before = gm.code
    assert in_place_caches(gm) == {}
    assert gm.code == before


# ------------------------------------------------------------------------- attention over the visible prefix

def test_visible_prefix_of_masks():
    inf = float("-inf")
    prefix = torch.tensor([[0.0, 0.0, inf, inf]] * 3)
    assert visible_prefix(prefix) == 2
    assert visible_prefix(torch.zeros(2, 5)) == 5  # every key visible (VAR's last scale)
    assert visible_prefix(torch.tensor([[0.0, inf], [0.0, 0.0]])) is None  # causal: rows differ
    assert visible_prefix(torch.tensor([[0.0, inf, 0.0]])) is None  # a hole
    assert visible_prefix(torch.tensor([[inf, inf]])) is None
    assert visible_prefix(torch.tensor([[0.0, -1.0]])) is None  # a bias, not a mask


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_attention_equals_the_masked_step(family):
    """Every recorded step (VAR scales, LlamaGen prefill/decode), its mask read as ``CudaStep`` reads it."""
    _, steps, _, q = compiled(family, "ptq4arvg")
    low, _ = lowered(q)
    ref_gm = copy.deepcopy(low)
    in_place_caches(low)
    mask = visible_prefix_attention(low)
    assert mask is not None and sum(n.target is cached_attention for n in low.graph.nodes) > 0
    prefixes = set()
    for inputs in steps[:6]:
        n = visible_prefix(inputs[mask])
        prefixes.add(n)
        with torch.no_grad(), visible_keys(n):
            got = low(*_clone(inputs))
        for a, b in zip(outputs(ref_gm, inputs), got, strict=True):
            torch.testing.assert_close(b.float(), a, rtol=1e-5, atol=1e-5)
    if family in ("var", "mnist-var"):
        assert None not in prefixes and len(prefixes) > 1  # every scale's mask is a prefix, of its own length


def test_the_visible_count_is_read_when_the_compiled_graph_runs():
    """torch.compile does not trace into ``cached_attention``: the count in force at run time decides."""
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    mask = torch.randn(4, 4)  # not a prefix mask: the two readings differ
    f = torch.compile(lambda q, k, v, m: cached_attention(q, k, v, m, None), backend="aot_eager")
    with visible_keys(None):
        masked = f(q, k, v, mask)
    with visible_keys(3):
        prefix = f(q, k, v, mask)
    torch.testing.assert_close(masked, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(prefix, torch.nn.functional.scaled_dot_product_attention(q, k[..., :3, :], v[..., :3, :]))
    assert not torch.allclose(masked, prefix)


def test_operators_pass_opcheck():
    """Fake (compile-time) and real kernels agree on shapes, strides and aliasing: what inductor asserts on
    the GPU."""
    from torch.library import opcheck

    q, k, v = torch.randn(3, 2, 3, 5, 8).unbind(0)
    k, v = torch.randn(2, 2, 3, 9, 8).unbind(0)
    mask = torch.zeros(5, 9)
    opcheck(cached_attention, (q, k, v, mask, None))
    with visible_keys(4):
        opcheck(cached_attention, (q, k, v, mask, 0.5))
    cache = torch.randn(2, 3, 9, 8)
    opcheck(kv_write, (cache, 2, torch.tensor([1, 4, 6]), torch.randn(2, 3, 3, 8)))


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_projection_writes_the_caches(family):
    """VAR's cosine attention: the qkv qgemm writes q and the caches (no kv_write left); the step's outputs and
    caches equal the in-place step's. The other families' graphs (RoPE between the projection and the cache;
    RAR's projection in another layout) have no match and stay as they are."""
    _, steps, _, q = compiled(family, "ptq4arvg")
    low, _ = lowered(q)
    state = in_place_caches(low)
    fused = copy.deepcopy(low)
    n = qkv_into_caches(fused)
    layers = steps[0][next(iter(state))].shape[0]
    if family in ("var", "mnist-var"):
        assert n == layers and not any(t.target is kv_write for t in fused.graph.nodes)
        assert sum(t.target is qlinear_qkv for t in fused.graph.nodes) == layers
    else:
        assert n == 0
    for inputs in steps[:4]:
        a, b = _clone(inputs), _clone(inputs)
        with torch.no_grad():
            expected, got = low(*a), fused(*b)
        for x, y in zip(expected, got, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
        for i in state:
            torch.testing.assert_close(b[i], a[i], rtol=1e-6, atol=1e-6)


def test_qkv_operator_passes_opcheck():
    from torch.library import opcheck

    gen = torch.Generator().manual_seed(0)
    B, T, K, H, D, L = 2, 3, 16, 2, 8, 5
    w = torch.randint(-8, 8, (3 * H * D, K), dtype=torch.int8, generator=gen)
    args = (torch.randint(-8, 8, (B, T, K), dtype=torch.int8, generator=gen), w, torch.rand(3 * H * D) * 0.1,
            w.float().sum(1), torch.tensor([0.05]), torch.tensor([1.0]), None, None, torch.randn(B, H, L, D),
            torch.randn(B, H, L, D), torch.tensor([1, 2, 4]), torch.rand(1, H, 1, 1) + 1, True, 1e-12)
    opcheck(qlinear_qkv, args)


# ------------------------------------------------------------------------------------------ int8 caches

@pytest.mark.parametrize("family", FAMILIES)
def test_int8_caches_step_close_to_the_float_one(family):
    """Every write and read of the caches in int8 (a scale per cached row): outputs within 25 dB and caches within 35 dB of
    the float step's, the first layer's cache rows as the float step writes them, rounded."""
    _, steps, _, q = compiled(family, "ptq4arvg")
    low, _ = lowered(q)
    ref_gm = copy.deepcopy(low)
    state = in_place_caches(low)
    mask = visible_prefix_attention(low)
    n_writes = sum(n.target is kv_write for n in low.graph.nodes)
    n_reads = sum(n.target is cached_attention for n in low.graph.nodes)
    scales = int8_caches(low, state)
    assert scales == sorted(state)
    assert sum(n.target is kv_write_int8 for n in low.graph.nodes) == n_writes
    assert sum(n.target is cached_attention_int8 for n in low.graph.nodes) == n_reads > 0
    assert not [n for n in low.graph.nodes if n.target in (kv_write, cached_attention)]
    for inputs in steps[:4]:
        expected = outputs(ref_gm, inputs)
        given = _clone(inputs)
        pairs = [kv_quantize(given[i]) for i in scales]
        for i, (codes, _) in zip(scales, pairs):
            given[i] = codes
        with torch.no_grad(), visible_keys(visible_prefix(inputs[mask])):
            got = low(*given, *(s for _, s in pairs))
        for j, (a, b) in enumerate(zip(expected, got, strict=True)):
            i = next((i for i, o in state.items() if o == j), None)
            if i is None:
                assert sqnr_db(a, b.float()) > 25, (family, j)
                continue
            codes, s = pairs[scales.index(i)]
            assert b is codes and b.dtype == torch.int8  # written in place
            deq = kv_dequantize(codes, s, torch.float32)
            assert sqnr_db(a, deq) > 35, (family, j)
            # the first layer writes what the float step writes, rounded (later layers' inputs differ already)
            bound = a[0].abs().amax(-1, keepdim=True) / 254 + 1e-6  # half a step of each row's grid
            assert bool(((deq[0] - a[0]).abs() <= bound * 1.01).all()), (family, j)


def test_int8_caches_need_every_use_rewritten():
    """A cache read by anything but the two operators (here: attention the prefix rewrite did not take) stays
    float."""
    _, _, _, q = compiled("var", "ptq4arvg")
    low, _ = lowered(q)
    state = in_place_caches(low)  # no visible_prefix_attention: SDPA reads the caches
    before = low.code
    assert int8_caches(low, state) == []
    assert low.code == before


def test_int8_operators_pass_opcheck():
    from torch.library import opcheck

    q = torch.randn(2, 3, 5, 8)
    k, ks = kv_quantize(torch.randn(2, 3, 9, 8))
    v, vs = kv_quantize(torch.randn(2, 3, 9, 8))
    mask = torch.zeros(5, 9)
    opcheck(cached_attention_int8, (q, k, ks, v, vs, mask, None))
    with visible_keys(4):
        opcheck(cached_attention_int8, (q, k, ks, v, vs, mask, 0.5))
    opcheck(kv_write_int8, (k.clone(), ks.clone(), 2, torch.tensor([1, 4, 6]), torch.randn(2, 3, 3, 8)))


def test_a_cache_format_other_than_float_or_int8_is_refused():
    from backends.cuda.runner import CudaStep
    from core.errors import UserError

    _, _, _, q = compiled("var", "ptq4arvg")
    with pytest.raises(UserError, match="kv_cache must be 'float' or 'int8', got 'fp8'"):
        CudaStep(lowered(q)[0], device="cpu", kv_cache="fp8")


# --------------------------------------------------------------------------------- attention into codes

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv", ["float", "int8"])
def test_attention_writes_the_projection_codes(family, kv):
    """Every attention writes its output projection's input codes (one a layer, in either cache format); the
    projection reads them as codes, and the step's outputs and caches equal the step's before the rewrite (on the
    CPU both quantize the same float32 attention on the same grid)."""
    _, steps, _, q = compiled(family, "ptq4arvg")
    low, _ = lowered(q)
    state = in_place_caches(low)
    mask = visible_prefix_attention(low)
    scales = int8_caches(low, state) if kv == "int8" else []
    fused = copy.deepcopy(low)
    n = attention_into_codes(fused)
    layers = steps[0][next(iter(state))].shape[0]
    assert n == layers
    assert not [t for t in fused.graph.nodes if t.target in (cached_attention, cached_attention_int8)]
    codes = [t for t in fused.graph.nodes if t.target is cached_attention_codes]
    assert len(codes) == layers and all(_only_qlinear(t) for t in codes)
    for inputs in steps[:4]:
        given = _clone(inputs)
        extra = []
        for i in scales:
            given[i], s = kv_quantize(given[i])
            extra.append(s)
        a, b = _clone(given), _clone(given)
        sa, sb = [s.clone() for s in extra], [s.clone() for s in extra]
        with torch.no_grad(), visible_keys(visible_prefix(inputs[mask])):
            expected, got = low(*a, *sa), fused(*b, *sb)
        for x, y in zip(expected, got, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
        for i in state:
            torch.testing.assert_close(b[i], a[i], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_codes_in_fp16_stay_within_the_quantization_noise(family):
    """In fp16, as on a GPU, the rewritten step quantizes the attention from float32 where the step before it
    quantized the attention's fp16 output: codes on a rounding boundary flip (up to 0.11 on tiny LlamaGen's
    logits). Each step stays within 5 dB below the quantization noise of the step before it (the bound of the
    GPU tests in tests/test_cuda_lower.py), and differs from it somewhere."""
    _, steps, fp, q = compiled(family, "ptq4arvg")
    low, _ = lowered(q)
    low = to_device(low, "cpu", torch.float16)
    in_place_caches(low)
    mask = visible_prefix_attention(low)
    fused = copy.deepcopy(low)
    assert attention_into_codes(fused) > 0
    moved = False
    for inputs in steps:
        half = [t.half() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        with torch.no_grad(), visible_keys(visible_prefix(inputs[mask])):
            before = [t.float() for t in low(*_clone(half))]
            after = [t.float() for t in fused(*_clone(half))]
        assert _sqnr_to(before, after) > _sqnr_to(outputs(fp, inputs), before) - 5
        moved |= any(not torch.equal(x, y) for x, y in zip(before, after))
    assert moved


def _only_qlinear(node) -> bool:
    """Read by one qlinear, as its input codes (no float input to quantize)."""
    (user,) = node.users
    return user.target is qlinear and user.args[0] is node and user.kwargs.get("a_inv_scale") is None


def test_attention_into_codes_leaves_float_projections_alone():
    """An attention whose projection takes no quantized input (here: its grid removed, as for an excluded
    projection) keeps its float output."""
    _, _, _, q = compiled("var", "ptq4arvg")
    low, _ = lowered(q)
    in_place_caches(low)
    visible_prefix_attention(low)
    for t in low.graph.nodes:
        if t.target is qlinear and t.kwargs.get("a_inv_scale") is not None:
            t.kwargs = {k: v for k, v in t.kwargs.items() if k != "a_inv_scale"}
    low.recompile()
    before = low.code
    assert attention_into_codes(low) == 0 and low.code == before


def test_attention_codes_operator_passes_opcheck():
    from torch.library import opcheck

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 3, 8, generator=gen).transpose(1, 2)
    k, v = torch.randn(2, 3, 9, 8, generator=gen), torch.randn(2, 3, 9, 8, generator=gen)
    grid = (torch.tensor([30.0, 50.0]), torch.tensor([2.0, -1.0]), torch.tensor([0, 1, 1, 0, 1]), -128, 127, False)
    mask = torch.zeros(5, 9)
    opcheck(cached_attention_codes, (q, k, v, None, None, mask, None, *grid))
    (kc, ks), (vc, vs) = kv_quantize(k), kv_quantize(v)
    with visible_keys(4):
        opcheck(cached_attention_codes, (q, kc, vc, ks, vs, mask, 0.5, *grid))
