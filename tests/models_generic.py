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
