"""The ONNX targets and the onnxruntime runners.

- ``onnx``: the TensorRT-legal Q/DQ graph (``model.onnx``), linted against TensorRT's rules and
  checked on onnxruntime against the torch fake-quant graph (reference mode: QDQ fusion disabled)
  and in fast mode (onnxruntime's fused int8 kernels).
- ``ort``: the same, plus ``model.ort.onnx`` lowered for onnxruntime's int8 CPU kernels
  (``backends.ort_int8``); on a CPU without VNNI the weights use 7 bits so those kernels cannot saturate.

Runners (``tools.bench``): ort-fp32, ort-int8 (our onnxruntime lowering), ort-int8-qdq (the Q/DQ
export with onnxruntime's QDQ fusion), ort-int8-ref (fusion disabled), and onnxruntime's own
quantizers as peers: ort-quant-static and ort-quant-dynamic.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from backends.registry import (
    ExportJob,
    Runner,
    StepOptions,
    Target,
    converter,
    file_bytes,
    median_ms,
    register_runner,
    register_target,
)
from core.errors import UserError
from core.numerics import max_abs_diff, max_rel_diff, min_sqnr_db, run_outputs
from core.progress import say


def export_model(gm, bundle, path: Path) -> Path:
    """The bundle's step graph as ONNX at ``path``, with its input/output names and dynamic shapes."""
    from backends.onnx_export import export_onnx

    return export_onnx(gm, bundle.extra.get("export_inputs", bundle.example_inputs), path,
                       input_names=bundle.input_names, output_names=bundle.output_names,
                       dynamic_shapes=bundle.extra.get("dynamic_shapes"))


@register_target
class OnnxTarget(Target):
    name = "onnx"
    summary = "ONNX with Q/DQ (TensorRT-legal), checked on onnxruntime"
    runs_on = "cpu"

    def unavailable(self) -> str | None:
        import importlib.util

        return None if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed"

    def export(self, job: ExportJob) -> dict:
        import onnx

        from backends.onnx_export import qdq_census
        from backends.ort_runner import cpu_has_vnni, make_session, run
        from backends.qdq_lint import lint
        from passes.dynamic_quant import simulation_only_reason

        if why := simulation_only_reason(job.gm):  # e.g. dtwq: per-token scales computed at run time
            raise UserError(why)
        job.say("[3/4] exporting ONNX")
        onnx_path = export_model(job.gm, job.bundle, job.out / "model.onnx")
        model_proto = onnx.load(str(onnx_path), load_external_data=False)
        census, lint_report = qdq_census(model_proto), lint(model_proto)
        inputs = job.bundle.example_inputs
        sess = make_session(onnx_path, "reference")
        ref, got = run_outputs(job.gm, inputs), [torch.as_tensor(g) for g in run(sess, inputs)]
        fast_session = make_session(onnx_path, "fast")
        fast = [torch.as_tensor(g) for g in run(fast_session, inputs)]
        ort_fast = {"max_rel_diff_vs_reference": max_rel_diff(got, fast), "cpu_vnni": cpu_has_vnni(),
                    "reduce_range": job.reduce_range}
        ort_fast.update(self.extra_models(job, onnx_path, got))
        return {"onnx": {
            "path": "model.onnx",
            "file_bytes": onnx_path.stat().st_size,
            "QuantizeLinear": census.get("QuantizeLinear", 0),
            "DequantizeLinear": census.get("DequantizeLinear", 0),
            "inputs": [i.name for i in sess.get_inputs()],
            "outputs": [o.name for o in sess.get_outputs()],
            "ort_reference_max_abs_diff": max_abs_diff(got, ref),
            # On trained models a value on a rounding boundary can take the neighbouring code in one
            # runtime and not the other (their LayerNorm/softmax differ in the last bit); the SQNR says
            # how small that is next to the quantization error itself.
            "ort_reference_sqnr_db": min_sqnr_db([r.float() for r in ref], [g.float() for g in got]),
            # fused int8 kernels: error relative to each output's largest magnitude, and the CPU kind
            "ort_fast": ort_fast,
            "tensorrt_lint": {"ok": lint_report.ok, "int8_gemms": lint_report.quantized_gemms,
                              "float_gemms": len(lint_report.float_gemms),
                              "violations": [str(v) for v in lint_report.violations]},
        }, "speed": {"onnxruntime fast mode (int8)": median_ms(lambda: run(fast_session, inputs))}}

    def extra_models(self, job: ExportJob, onnx_path: Path, reference: list[torch.Tensor]) -> dict:
        """Further models beside ``model.onnx`` and their report entries (none here)."""
        return {}

    def load_step(self, path: Path, bundle, device, options: StepOptions = StepOptions()):
        from backends.ort_runner import OrtStep

        file = path / "model.onnx" if path.is_dir() else path
        return OrtStep(file, options.ort_mode), f"onnxruntime ({options.ort_mode}) on {file}"

    def compiled_step(self, out: Path, gm, bundle, reduce_range: bool):
        from backends.ort_runner import OrtStep

        return OrtStep(out / "model.onnx", "reference"), "onnxruntime (Q/DQ reference)"


@register_target
class OrtTarget(OnnxTarget):
    name = "ort"
    summary = "onnxruntime int8 CPU kernels (model.ort.onnx) beside the Q/DQ model"

    def precision_blocker(self, precision) -> str | None:
        if precision.group:
            return (f"--bits {precision.name}: onnxruntime's int8 kernels (MatMulIntegerToFloat) take one weight "
                    f"scale per output channel, not one per group of {precision.group} input channels; "
                    "use --target onnx (Q/DQ, onnxruntime reference mode) or --target torch")
        return None

    def weight_reduce_range(self) -> bool:
        from backends.ort_runner import cpu_has_vnni

        # onnxruntime's u8 x s8 kernels saturate with full-range weights on x86 without VNNI
        return not cpu_has_vnni()

    def attention_sites(self) -> str:
        from backends.ort_runner import cpu_has_vnni

        # q @ k^T on the u8 x s8 kernel: faster than float and keeps the tokens (BENCHMARKS.md, issue #17);
        # without VNNI its activation B operand would take the slower u8u8 kernel, not measured on the whole step
        return "*.matmul1" if cpu_has_vnni() else ""

    def extra_models(self, job: ExportJob, onnx_path: Path, reference: list[torch.Tensor]) -> dict:
        from backends.ort_int8 import write_ort_int8
        from backends.ort_runner import make_session, run

        def diff(path: Path) -> float:
            got = [torch.as_tensor(g) for g in run(make_session(path, "fast"), job.bundle.example_inputs)]
            return max_rel_diff(reference, got)

        # the one-row linears the family keeps float by default; one a user excluded stays float
        gemms = write_ort_int8(onnx_path, job.out / "model.ort.onnx", row_gemms=job.bundle.extra.get("default_exclude", ()))
        entry = {"path": "model.ort.onnx", **gemms, "max_rel_diff_vs_reference": diff(job.out / "model.ort.onnx")}
        if gemms["row_gemms"]:  # they add their own (dynamic) quantization: the rest must still equal the reference
            with tempfile.TemporaryDirectory() as tmp:
                write_ort_int8(onnx_path, Path(tmp) / "exact.onnx", row_gemms=())
                entry["max_rel_diff_vs_reference_without_row_gemms"] = diff(Path(tmp) / "exact.onnx")
        return {"int8_model": entry}

    def compiled_step(self, out: Path, gm, bundle, reduce_range: bool):
        from backends.ort_runner import OrtStep

        weights = " (7-bit weights: no VNNI)" if reduce_range else ""
        return OrtStep(out / "model.ort.onnx", "fast"), f"onnxruntime int8{weights}"

    def quality_speed(self, bundle, fp_gm, out: Path, workdir: Path) -> dict:
        """onnxruntime int8 (the compiled model) against onnxruntime FP32 on the example step, timed
        interleaved in one process; a ratio, not an absolute claim."""
        import statistics

        from backends.ort_runner import make_session, run
        from backends.registry import measure

        say("timing onnxruntime int8 against FP32 (interleaved)")
        fp = prepare_ort("ort-fp32", fp_gm, None, workdir, bundle)
        int8_path = out / "model.ort.onnx"
        sess = make_session(int8_path, "fast", spin=False)
        q = Runner("ort-int8", lambda x: run(sess, x), fp.convert, int8_path.stat().st_size, "cpu", torch.float32)
        for r in (fp, q):
            r.inputs = r.convert(bundle.example_inputs)
        measure([fp, q], warmup=3, repeats=30)
        fp_ms, q_ms = statistics.median(fp.times) * 1e3, statistics.median(q.times) * 1e3
        return {"ort_fp32_ms": fp_ms, "ort_int8_ms": q_ms, "int8_speedup": fp_ms / q_ms, "repeats": 30,
                "onnx_bytes": {"fp32": fp.size_bytes, "int8": q.size_bytes}}


# -- runners -------------------------------------------------------------------------------------

_NOTES = {"ort-int8-qdq": "Q/DQ export, onnxruntime QDQ fusion", "ort-int8-ref": "Q/DQ, fusion disabled",
          "ort-quant-static": "onnxruntime quantize_static", "ort-quant-dynamic": "onnxruntime quantize_dynamic"}


def prepare_ort(name: str, fp_gm, q_gm, workdir: Path, bundle) -> Runner:
    from backends.ort_runner import cpu_has_vnni, make_session, run

    path = _ort_model(name, fp_gm, q_gm, workdir, bundle)
    mode = "reference" if name.endswith("-ref") else "fast"
    sess = make_session(path, mode, spin=False)  # spinning workers would steal the next backend's cores
    note = (f"u8s8 MatMulIntegerToFloat{'' if cpu_has_vnni() else ', 7-bit weights (no VNNI)'}"
            if name == "ort-int8" else _NOTES.get(name, ""))
    return Runner(name, lambda x: tuple(torch.from_numpy(o) for o in run(sess, x)), converter("cpu", torch.float32),
                  file_bytes(path), "cpu", torch.float32, note=note, onnx=(path, mode))


for _name, _quantized in (("ort-fp32", False), ("ort-int8", True), ("ort-int8-qdq", True), ("ort-int8-ref", True),
                          ("ort-quant-static", True), ("ort-quant-dynamic", True)):
    # peers quantize the FP export themselves: they take no 7-bit weights of ours
    register_runner(_name, target="ort" if _name.startswith("ort-int8") else "onnx", quantized=_quantized)(
        lambda fp_gm, q_gm, workdir, bundle, _n=_name: prepare_ort(_n, fp_gm, q_gm, workdir, bundle))


def _ort_model(name: str, fp_gm, q_gm, workdir: Path, bundle) -> Path:
    """The ONNX file runner ``name`` runs, exported once per graph into ``workdir``."""
    from backends.ort_runner import cpu_has_vnni

    def export(gm, stem: str) -> Path:
        path = workdir / f"{stem}.onnx"
        if not path.exists():
            say(f"exporting {stem}.onnx")
            export_model(copy.deepcopy(gm), bundle, path)
        return path

    if name == "ort-fp32":
        return export(fp_gm, "fp32")
    if name in ("ort-int8-qdq", "ort-int8-ref"):
        return export(q_gm, "qdq")
    if name == "ort-int8":
        from backends.ort_int8 import write_ort_int8

        path = workdir / "ort_int8.onnx"
        counts = write_ort_int8(export(q_gm, "qdq"), path, row_gemms=bundle.extra.get("default_exclude", ()))
        say(f"ort-int8: {counts['int8_gemms']} u8s8 + {counts['u8u8_gemms']} u8u8 int8 GEMMs, "
            f"{counts['float_matmuls']} MatMuls in float, {counts['row_gemms']} one-row linears dynamically quantized")
        return path
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src, path = export(fp_gm, "fp32"), workdir / f"{name}.onnx"
    if name == "ort-quant-dynamic":
        say("onnxruntime quantize_dynamic")
        quantize_dynamic(src, path, weight_type=QuantType.QInt8, reduce_range=not cpu_has_vnni())
        return path
    if name != "ort-quant-static":
        raise UserError(f"unknown onnxruntime runner {name!r}")
    names = bundle.input_names or [f"input_{i}" for i in range(len(bundle.example_inputs))]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(bundle.calib_inputs or [bundle.example_inputs])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {n: t.numpy() for n, t in zip(names, batch)}

    say("onnxruntime quantize_static (MatMul sites, min-max calibration)")
    # MatMuls only, like our linears: calibrating every tensor of a d16 model takes many GB
    quantize_static(src, path, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, reduce_range=not cpu_has_vnni(), activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return path
