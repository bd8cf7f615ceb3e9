"""How close two runs are: a step's outputs as a tensor list, SQNR, relative and max errors.

One place for these, so the pass manager's checks, the report's fidelity, export parity and the
tests all measure the same way.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils._pytree import tree_leaves


def tensor_outputs(out) -> list[torch.Tensor]:
    """Every tensor of a step's (nested) outputs, detached, in order; non-tensors dropped."""
    return [torch.as_tensor(t).detach() for t in tree_leaves(out) if isinstance(t, (torch.Tensor, np.ndarray))]


def run_outputs(fn, inputs: tuple) -> list[torch.Tensor]:
    """``tensor_outputs(fn(*inputs))`` in float32, without autograd."""
    with torch.no_grad():
        return [t.float() for t in tensor_outputs(fn(*inputs))]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref = torch.as_tensor(reference).detach().double()
    noise = (ref - torch.as_tensor(approx).detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum().clamp(min=1e-30) / noise))


def relative_error(ref: list[torch.Tensor], new: list[torch.Tensor]) -> float:
    """Largest ``||new - ref|| / ||ref||`` over matching outputs."""
    worst = 0.0
    for a, b in zip(ref, new, strict=True):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        worst = max(worst, float((a - b).norm() / a.norm().clamp(min=1e-30)))
    return worst


def max_abs_diff(ref: list[torch.Tensor], new: list[torch.Tensor]) -> float:
    return max((float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())
                for a, b in zip(ref, new, strict=True)), default=0.0)


def max_rel_diff(ref: list[torch.Tensor], new: list[torch.Tensor]) -> float:
    """Largest ``max|new - ref| / max|ref|`` over matching outputs: error relative to each output's scale."""
    return max((float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max()
                      / max(float(torch.as_tensor(a).abs().max()), 1e-12))
                for a, b in zip(ref, new, strict=True)), default=0.0)


def min_sqnr_db(ref: list[torch.Tensor], new: list[torch.Tensor]) -> float:
    return min((sqnr_db(a, b) for a, b in zip(ref, new, strict=True)), default=float("inf"))


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer a module holds, each tensor once (int8 weights count one byte each)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
