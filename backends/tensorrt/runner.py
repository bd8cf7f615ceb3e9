"""Run a TensorRT engine with torch CUDA tensors: ``TrtStep``, with ``OrtStep``'s call signature.

Written against the documented 10.x/11.x runtime API (reference/tensorrt.md §1.9: ``num_io_tensors``,
``get_tensor_name/mode/dtype``, ``set_input_shape``, ``get_tensor_shape``, ``set_tensor_address``,
``execute_async_v3``). It has never run here: no TensorRT, no GPU (§0).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from core.errors import UserError

# TensorRT DataType member name -> torch dtype
_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
           "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
           "FP8": torch.float8_e4m3fn}


def torch_dtype(trt_dtype) -> torch.dtype:
    """torch dtype of a ``trt.DataType`` (matched by member name, so no TensorRT import is needed)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _DTYPES:
        raise UserError(f"TensorRT dtype {name} has no torch equivalent here")
    return _DTYPES[name]


def check_sidecar(engine_path: str | Path, trt_version: str, capability: tuple[int, int]) -> None:
    """Refuse an engine built by another TensorRT version or for another SM before deserialising
    it (a plan is version- and GPU-specific, reference/tensorrt.md §1.9). No sidecar: no check."""
    meta_path = Path(str(engine_path) + ".json")
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    sm = f"{capability[0]}.{capability[1]}"
    if meta.get("tensorrt_version") != trt_version or meta.get("gpu", {}).get("sm") != sm:
        raise UserError(f"{engine_path} was built with TensorRT {meta.get('tensorrt_version')} for sm "
                        f"{meta.get('gpu', {}).get('sm')}; this is TensorRT {trt_version} on sm {sm}: rebuild it")


class TrtStep:
    """A deserialised engine as a step callable: ``step(*inputs) -> tuple of torch CUDA tensors``."""

    def __init__(self, engine_path: str | Path, *, profile: int = 0):
        from backends.tensorrt import availability

        reason = availability()  # before any TensorRT runtime call: no GPU means a segfault (§1.10)
        if reason is not None:
            raise UserError(f"cannot run a TensorRT engine: {reason}")
        import tensorrt as trt

        self.trt = trt
        check_sidecar(engine_path, trt.__version__, torch.cuda.get_device_capability())
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not deserialise {engine_path} (see the TensorRT log above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        if profile:
            self.context.set_optimization_profile_async(profile, torch.cuda.current_stream().cuda_stream)

    def _bind_inputs(self, inputs) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise UserError(f"the engine takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"got {len(inputs)}")
        keep = []
        for name, x in zip(self.input_names, inputs):
            want = torch_dtype(self.engine.get_tensor_dtype(name))
            x = torch.as_tensor(x).to(device="cuda", dtype=want).contiguous()
            if not self.context.set_input_shape(name, tuple(x.shape)):
                raise UserError(f"input {name}: shape {tuple(x.shape)} is outside the engine's optimisation profile")
            self.context.set_tensor_address(name, x.data_ptr())
            keep.append(x)  # alive until the step has run
        return keep

    def _bind_outputs(self) -> list[torch.Tensor]:
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"output {name} has a data-dependent shape {shape}; TrtStep does not support it")
            y = torch.empty(shape, dtype=torch_dtype(self.engine.get_tensor_dtype(name)), device="cuda")
            self.context.set_tensor_address(name, y.data_ptr())
            outs.append(y)
        return outs

    def __call__(self, *inputs) -> tuple[torch.Tensor, ...]:
        """One step on the current CUDA stream (as reference/tensorrt.md §1.9): stream order keeps the
        inputs' copies, the engine and the outputs' consumers in sequence without extra syncs."""
        keep = self._bind_inputs(inputs)  # noqa: F841  (alive until execute_async_v3 is enqueued)
        outs = self._bind_outputs()
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise UserError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return tuple(outs)
