"""KV caches updated in place (``backends/cuda/kv_cache.py``): the rewritten step returns what the functional
one returns, writes it into its cache inputs, returns those very tensors, and stays in place through
torch.compile (no copy of a cache)."""
import copy

import pytest
import torch

from backends.cuda.kv_cache import in_place_caches, kv_write
from tests.test_cuda_lower import FAMILIES, compiled, lowered, outputs


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
    """Through inductor (CPU here, as on CUDA) the writes stay on the input: same tensors out, same values."""
    _, steps, _, q = compiled("var", "ptq4arvg")
    low, _ = lowered(q)
    ref_gm = copy.deepcopy(low)
    state = in_place_caches(low)
    run = torch.compile(low)
    inputs = steps[-1]
    given = _clone(inputs)
    with torch.no_grad():
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
