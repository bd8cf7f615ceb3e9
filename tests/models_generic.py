"""Small generic models for the tests, loaded by the CLI as `tests/models_generic.py:<factory>`."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from frontends.examples import Block


def block():
    torch.manual_seed(0)
    return Block(32, 2).eval(), (torch.randn(2, 8, 32),)


class TwoInTwoOut(nn.Module):
    """Two inputs, two outputs, in an order the export must keep."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(16, 4)

    def forward(self, first, second):
        return self.b(second), F.relu(self.a(first))


def two_in_two_out():
    torch.manual_seed(1)
    return TwoInTwoOut().eval(), (torch.randn(3, 16), torch.randn(3, 16) * 2)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace this
            return self.inner(x)
        return x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Branchy()

    def forward(self, x):
        return self.body(x)


def untraceable():
    return Wrapper().eval(), (torch.randn(2, 4),)


def not_a_model():
    return 42


class GroupedBlock(nn.Module):
    """A block whose step input carries token groups, like the family step graphs.

    Token 0 is a "sink" with activations ~30x larger than the others, the case STWQ is for.
    """

    def __init__(self, dim=32):
        super().__init__()
        self.embed = nn.Linear(dim, dim)  # sees the raw tokens, sink included
        self.block = Block(dim, 2)

    def forward(self, x, token_groups):
        return self.block(self.embed(x))


def grouped_inputs(seed, batch=2, tokens=9, dim=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=g)
    x[:, 0] *= 30.0
    groups = torch.tensor([0] + [1] * 4 + [2] * (tokens - 5))
    return x, groups


def grouped_block():
    torch.manual_seed(0)
    from frontends.generic import ModelBundle

    m = GroupedBlock().eval()
    return ModelBundle("grouped-block", m, grouped_inputs(0), calib_inputs=[grouped_inputs(s) for s in range(1, 5)])
