"""Where calibration runs: ``tools.compile --device cuda`` puts generation, observers and passes
on a GPU; everything written to disk (calibration cache, ONNX, graph.json) stays CPU tensors.

A run on a device keeps three things there: the step graph (``GraphModule.to``), the
calibration inputs (moved one step at a time by `OnDevice`, so a cache larger than GPU memory
still streams) and the tensors the passes create (statistics, scales, new biases), which is
what ``with torch.device(...)`` as the default device gives without touching every pass.
`to_cpu` brings the graph and the quantization parameters back before export.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch

from core.errors import UserError


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, checked against this machine; a UserError names what is missing."""
    try:
        device = torch.device(name or "cpu")
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device name (cpu, cuda, cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                        f"CUDA build {torch.version.cuda or 'none'})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def inputs_to(inputs: tuple, device: torch.device | str) -> tuple:
    """A step's input tuple with every tensor on ``device`` (non-tensors as they are)."""
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)


class OnDevice(Sequence):
    """A sequence of input tuples, each moved to ``device`` when it is read."""

    def __init__(self, batches: Sequence[tuple], device: torch.device):
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple:
        return inputs_to(self.batches[i], self.device)


def stream_to(batches: Sequence[tuple], device: torch.device) -> Sequence[tuple]:
    """``batches`` read onto ``device`` one at a time (the same object for the CPU)."""
    return batches if device.type == "cpu" else OnDevice(batches, device)


@contextlib.contextmanager
def default_device(device: torch.device) -> Iterator[None]:
    """Tensors created without a device inside go to ``device`` (nothing changes for the CPU)."""
    if device.type == "cpu":
        yield
        return
    with torch.device(device):
        yield


def to_cpu(ctx, *modules: torch.nn.Module) -> None:
    """Move graphs and the context's quantization parameters back to the CPU, in place."""
    for m in modules:
        if m is not None:
            m.to("cpu")
    for key, qp in ctx.qparams.items():
        ctx.qparams[key] = dataclasses.replace(qp, scale=qp.scale.cpu(), zero_point=qp.zero_point.cpu())
