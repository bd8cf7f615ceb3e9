"""Tiny models with each kind of scale-folding source, for tests/test_folding.py.

Every factory returns a ModelBundle with example and calibration inputs. Parameters carry
outlier channels and DC offsets so that folding changes something measurable.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from frontends.examples import tiny_block  # noqa: F401  (the LayerNorm-source model)
from frontends.generic import ModelBundle


def _init(module: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 1 / math.sqrt(p.shape[-1])))


def _outliers(t: torch.Tensor, g: torch.Generator, n: int = 3, gain: float = 10.0, offset: float = 0.0) -> None:
    """Give ``n`` random channels of a per-channel vector a large value (``gain``) and the rest ``offset`` more."""
    with torch.no_grad():
        t.add_(offset)
        t[torch.randperm(t.numel(), generator=g)[:n]] = gain


def _bundle(name: str, module: nn.Module, make_input, g: torch.Generator, n_calib: int = 4) -> ModelBundle:
    example = make_input(g)
    calib = [make_input(g) for _ in range(n_calib)]
    return ModelBundle(name, module.eval(), example, calib_inputs=calib)


def _attention(q, k, v, heads: int):
    B, T, C = q.shape
    q, k, v = (t.reshape(B, T, heads, C // heads).transpose(1, 2) for t in (q, k, v))
    att = F.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(C // heads), dim=-1)
    return torch.matmul(att, v).transpose(1, 2).reshape(B, T, C)


# -- LlamaGen-like: RMSNorm + fused wqkv + SwiGLU (w1 and w3 share the input) ---------------------

class RMSNorm(nn.Module):
    """LlamaGen's RMSNorm (autoregressive/models/gpt.py): no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class LlamaBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, hidden: int = 64):
        super().__init__()
        self.heads = heads
        self.attention_norm = RMSNorm(dim)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = RMSNorm(dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        q, k, v = self.wqkv(self.attention_norm(x)).chunk(3, dim=-1)
        h = x + self.wo(_attention(q, k, v, self.heads))
        f = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(f)) * self.w3(f))


def llama_block(seed: int = 0) -> ModelBundle:
    g = torch.Generator().manual_seed(seed)
    block = LlamaBlock()
    _init(block, g)
    for norm in (block.attention_norm, block.ffn_norm):
        norm.weight.data.fill_(1.0)
        _outliers(norm.weight.data, g)
    return _bundle("llama-block", block, lambda g: (torch.randn(2, 8, 32, generator=g) + 0.5,), g)


# -- VAR-like AdaLN: ada_lin chunks gamma1, gamma2, scale1, scale2, shift1, shift2 ------------------

class VARBlock(nn.Module):
    """VAR's AdaLNSelfAttn (models/basic_var.py) with out-of-place ops except VAR's ``add_``."""

    def __init__(self, dim: int = 32, cond: int = 16, heads: int = 2):
        super().__init__()
        self.C, self.heads = dim, heads
        self.ln_wo_grad = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond, 6 * dim))
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x, cond_BD):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        q, k, v = self.mat_qkv(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)).chunk(3, dim=-1)
        x = x + self.proj(_attention(q, k, v, self.heads)).mul(gamma1)
        h = self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)
        return x + self.fc2(F.gelu(self.fc1(h))).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    """VAR's head_nm: ``scale, shift = ada_lin(cond).view(-1, 1, 2, C).unbind(2)``."""

    def __init__(self, dim: int, cond: int):
        super().__init__()
        self.C = dim
        self.ln_wo_grad = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond, 2 * dim))

    def forward(self, x, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class VARTiny(nn.Module):
    def __init__(self, dim: int = 32, cond: int = 16, vocab: int = 48):
        super().__init__()
        self.block = VARBlock(dim, cond)
        self.head_nm = AdaLNBeforeHead(dim, cond)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x, cond_BD):
        return self.head(self.head_nm(self.block(x, cond_BD), cond_BD))


def _modulation_outliers(linear: nn.Linear, chunks: list[int], dim: int, g: torch.Generator) -> None:
    """Large modulation biases on a few channels of the given chunks (scale or shift rows)."""
    for c in chunks:
        _outliers(linear.bias.data[c * dim:(c + 1) * dim], g, gain=4.0, offset=0.3)


def var_tiny(seed: int = 0) -> ModelBundle:
    g = torch.Generator().manual_seed(seed)
    model = VARTiny()
    _init(model, g)
    _modulation_outliers(model.block.ada_lin[1], [2, 3, 4, 5], 32, g)  # scale1, scale2, shift1, shift2
    _modulation_outliers(model.head_nm.ada_lin[1], [0, 1], 32, g)
    return _bundle("var-tiny", model, lambda g: (torch.randn(2, 8, 32, generator=g), torch.randn(2, 16, generator=g)), g)


# -- RAR-like AdaLN: adaLN_modulation chunks shift_msa, scale_msa, gate_msa, shift_mlp, ... --------

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RARBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift_msa, scale_msa)).chunk(3, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.proj(_attention(q, k, v, self.heads))
        return x + gate_mlp.unsqueeze(1) * self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), shift_mlp, scale_mlp))))


class RARFinalLayer(nn.Module):
    """RAR's final layer: ``scale, shift = adaLN_modulation(c).chunk(2, dim=-1)``."""

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, vocab)

    def forward(self, x, c):
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class RARTiny(nn.Module):
    def __init__(self, dim: int = 32, vocab: int = 48):
        super().__init__()
        self.block = RARBlock(dim)
        self.final = RARFinalLayer(dim, vocab)

    def forward(self, x, c):
        return self.final(self.block(x, c), c)


def rar_tiny(seed: int = 0) -> ModelBundle:
    g = torch.Generator().manual_seed(seed)
    model = RARTiny()
    _init(model, g)
    _modulation_outliers(model.block.adaLN_modulation[1], [0, 1, 3, 4], 32, g)
    _modulation_outliers(model.final.adaLN_modulation[1], [0, 1], 32, g)
    return _bundle("rar-tiny", model, lambda g: (torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)), g)


# -- linear -> linear, and a region that must be rejected -----------------------------------------

class NormMLP(nn.Module):
    """``norm -> fc1 -> fc2 -> gelu -> fc3``: a LayerNorm region (norm -> fc1) and a linear one
    (fc1 -> fc2); fc1 is a sink of the first and the source of the second. fc1 has no bias."""

    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(self.fc1(self.norm(x)))))


def norm_mlp(seed: int = 0) -> ModelBundle:
    g = torch.Generator().manual_seed(seed)
    model = NormMLP()
    _init(model, g)
    model.norm.weight.data.fill_(1.0)
    _outliers(model.norm.weight.data, g, n=2, gain=8.0)
    _outliers(model.norm.bias.data, g, n=2, gain=2.0, offset=0.5)
    return _bundle("norm-mlp", model, lambda g: (torch.randn(4, 6, 16, generator=g),), g)


class ResidualNorm(nn.Module):
    """``h = norm(x); h + fc2(gelu(fc1(h)))``: norm's output also feeds the residual add, so
    the region norm -> fc1 cannot fold (scaling h would change the add)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        h = self.norm(x)
        return h + self.fc2(F.gelu(self.fc1(h)))


def residual_norm(seed: int = 0) -> ModelBundle:
    g = torch.Generator().manual_seed(seed)
    model = ResidualNorm()
    _init(model, g)
    return _bundle("residual-norm", model, lambda g: (torch.randn(2, 4, 16, generator=g),), g)


class MixedNorms(nn.Module):
    """Sources in their other spellings: ``F.layer_norm`` with a weight but no bias (the shift
    must create one) and the leaf module ``torch.nn.RMSNorm``."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.ln_weight = nn.Parameter(torch.ones(dim))
        self.fc_a = nn.Linear(dim, dim)
        self.rms = nn.RMSNorm(dim)
        self.fc_b = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        a = self.fc_a(F.layer_norm(x, (x.shape[-1],), self.ln_weight, None, 1e-5))
        return a + self.fc_b(self.rms(x))


def mixed_norms(seed: int = 0) -> ModelBundle:
    g = torch.Generator().manual_seed(seed)
    model = MixedNorms()
    _init(model, g)
    with torch.no_grad():
        model.ln_weight.fill_(1.0)
        _outliers(model.ln_weight, g, n=2, gain=6.0)
        model.rms.weight.fill_(1.0)
        _outliers(model.rms.weight, g, n=2, gain=6.0)
    return _bundle("mixed-norms", model, lambda g: (torch.randn(2, 6, 16, generator=g) + 1.0,), g)


class TiedSink(nn.Module):
    """``a(norm(x)) + b(x)`` with ``b.weight`` tied to ``a.weight``: scaling a's columns would
    change b, so the region norm -> a cannot fold."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.a(self.norm(x)) + self.b(x)


def tied_sink(seed: int = 0) -> ModelBundle:
    g = torch.Generator().manual_seed(seed)
    model = TiedSink()
    _init(model, g)
    return _bundle("tied-sink", model, lambda g: (torch.randn(2, 4, 16, generator=g),), g)


class SharedShift(nn.Module):
    """AdaLN whose shift rows also feed the output: editing them would change that add too."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Linear(dim, 2 * dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.fc(modulate(self.norm(x), shift, scale)) + shift.unsqueeze(1)


def shared_shift(seed: int = 0) -> ModelBundle:
    g = torch.Generator().manual_seed(seed)
    model = SharedShift()
    _init(model, g)
    return _bundle("shared-shift", model, lambda g: (torch.randn(2, 4, 16, generator=g), torch.randn(2, 16, generator=g)), g)


# -- the GPS formula on a known X: identity linear source, so the region input is the input --------

class IdentityThenLinear(nn.Module):
    """``fc(src(x))`` with ``src`` the identity: the region src -> fc sees exactly ``x``."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.src = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, out)

    def forward(self, x):
        return self.fc(self.src(x))


def identity_then_linear(x_batches: list[torch.Tensor], w: torch.Tensor) -> ModelBundle:
    model = IdentityThenLinear(w.shape[1], w.shape[0])
    with torch.no_grad():
        model.src.weight.copy_(torch.eye(w.shape[1]))
        model.src.bias.zero_()
        model.fc.weight.copy_(w)
        model.fc.bias.zero_()
    return ModelBundle("identity-then-linear", model.eval(), (x_batches[0],), calib_inputs=[(x,) for x in x_batches])


# -- activation outliers with a DC offset, for the minmax < smoothquant < GPS ordering ------------

class OutlierMLP(nn.Module):
    """Pre-norm MLP block whose LayerNorm has a few huge-gain channels and per-channel offsets."""

    def __init__(self, dim: int = 64, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def outlier_mlp(seed: int = 0, gain: float = 30.0, offset: float = 2.0) -> ModelBundle:
    g = torch.Generator().manual_seed(seed)
    model = OutlierMLP()
    _init(model, g)
    with torch.no_grad():
        model.norm.weight.fill_(1.0)
        _outliers(model.norm.weight, g, n=4, gain=gain)
        model.norm.bias.copy_(torch.rand(64, generator=g) * offset)
    return _bundle("outlier-mlp", model, lambda g: (torch.randn(4, 16, 64, generator=g),), g, n_calib=8)


def dominant_outlier_mlp(seed: int = 0, gain: float = 30.0, spread: float = 4.0, offset: float = 2.0,
                         n_calib: int = 8) -> ModelBundle:
    """OutlierMLP whose LayerNorm has ONE channel of gain ``gain`` (it sets the per-tensor
    activation step, GPS's channel k) and the other gains log-uniform in ``[1/spread, spread]``
    (so channels differ in energy per unit of range, which SmoothQuant's max-based scale
    ignores), offsets in ``[0, offset]``. Inputs are uniform in [-1, 1]: bounded, so a few
    calibration batches see the true ranges and held-out data is not clipped."""
    g = torch.Generator().manual_seed(seed)
    model = OutlierMLP()
    _init(model, g)
    with torch.no_grad():
        model.norm.weight.copy_(torch.exp((torch.rand(64, generator=g) * 2 - 1) * math.log(spread)))
        model.norm.weight[torch.randperm(64, generator=g)[0]] = gain
        model.norm.bias.copy_(torch.rand(64, generator=g) * offset)
    return _bundle("dominant-outlier-mlp", model, lambda g: (torch.rand(4, 16, 64, generator=g) * 2 - 1,), g,
                   n_calib=n_calib)
