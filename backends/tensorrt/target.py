"""``--target trt``: the ONNX target's model and checks, then a strongly typed TensorRT engine
(``model.engine``, its sidecar JSON, an inspector summary). Without TensorRT or a GPU the ONNX
model is still written and the report says why no engine was built."""
from __future__ import annotations

from pathlib import Path

from backends.onnx_target import OnnxTarget
from backends.registry import ExportJob, StepOptions, register_target


@register_target
class TrtTarget(OnnxTarget):
    name = "trt"
    summary = "TensorRT engine from the Q/DQ ONNX model (needs TensorRT and a GPU)"
    runs_on = "cuda"

    def runs_on_for(self, path: Path) -> str:
        return "cpu" if path.is_dir() else "cuda"  # a compile directory runs its ONNX model on onnxruntime

    def missing(self) -> str | None:
        from backends.tensorrt import availability

        reason = availability()
        return f"no TensorRT engine can be built here ({reason}); the ONNX model will still be written" if reason else None

    def precision_blocker(self, precision) -> str | None:
        if precision.group:
            return (f"--bits {precision.name}: TensorRT's INT8 GEMMs take one weight scale per output channel and "
                    f"one activation scale per tensor, not groups of {precision.group} channels; "
                    "use --target onnx or --target torch")
        return None

    def export(self, job: ExportJob) -> dict:
        sections = super().export(job)
        sections["tensorrt"] = self.build(job, sections["onnx"]["inputs"])
        if not sections["tensorrt"]["built"]:  # after the rename: the ONNX stays for another machine
            sections["incomplete"] = {"reason": f"no TensorRT engine built: {sections['tensorrt']['reason']}",
                                      "kept": "the ONNX model", "file": "model.onnx"}
        return sections

    def build(self, job: ExportJob, input_names: list[str]) -> dict:
        from backends.tensorrt import availability

        reason = availability()
        if reason is not None:
            return {"built": False, "reason": reason}
        from backends.tensorrt.builder import build_engine, profiles_from_bundle
        from backends.tensorrt.inspect import inspect_engine

        job.say("[3/4] building the TensorRT engine")
        bundle, out = job.bundle, job.out
        profiles = profiles_from_bundle(input_names, bundle.example_inputs, bundle.extra.get("dynamic_shapes"))
        meta = build_engine(out / "model.onnx", out / "model.engine", profiles=profiles, timing_cache=out / "timing.cache",
                            progress=lambda phase, done, total: job.say(f"  TensorRT: {phase}") if done == 0 else None)
        return {"built": True, "engine": "model.engine", "sidecar": meta,
                "inspector": inspect_engine(out / "model.engine", out / "model.onnx")}

    def load_step(self, path: Path, bundle, device, options: StepOptions = StepOptions()):
        if path.is_dir():  # a compile output directory: its ONNX model, as for --target onnx
            return super().load_step(path, bundle, device, options)
        from backends.tensorrt.runner import TrtStep

        return TrtStep(path), f"TensorRT engine {path}"
