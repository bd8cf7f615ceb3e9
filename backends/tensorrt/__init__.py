"""TensorRT backend: engine build, Python runner, engine inspection, and a C++ runner (``cpp/``).

TensorRT cannot be installed in this workplace (reference/tensorrt.md §0), so every entry point
that touches TensorRT is gated by :func:`availability`. The pure helpers (optimisation-profile
construction, the engine sidecar, atomic writes, the inspector-JSON summary) need neither
TensorRT nor a GPU and are unit-tested here; everything else is written against the documented
10.x/11.x API (§1.9) and has not run.
"""
from __future__ import annotations

import importlib.util

INSTALL_HINT = "tensorrt is not installed (pip install tensorrt; PyPI has only stubs that download from NVIDIA's index)"


def availability() -> str | None:
    """None when TensorRT can build and run engines here, else a one-line reason.

    The CUDA check comes first and never touches a TensorRT runtime: on a machine without a GPU
    ``trt.Runtime`` still returns an object and deserialising an engine with it segfaults
    (reference/tensorrt.md §1.10).
    """
    if importlib.util.find_spec("tensorrt") is None:
        return INSTALL_HINT
    try:
        import tensorrt  # noqa: F401  (the PyPI stub or bindings without libnvinfer fail here, §0)
    except Exception as e:  # noqa: BLE001  (ImportError, OSError from missing libs, the stub's RuntimeError)
        return f"tensorrt cannot be imported ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


__all__ = ["INSTALL_HINT", "availability"]
