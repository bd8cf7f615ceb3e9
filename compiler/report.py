"""Report helpers: fidelity of the quantized graph to FP, sizes, and report.json / report.md."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from core.numerics import run_outputs, sqnr_db


def fidelity(fp_gm, q_gm, batches: list[tuple]) -> dict:
    """Output SQNR (dB) and max abs error of the quantized graph against FP, per output, over batches."""
    per_output: list[list[float]] = []
    max_abs = 0.0
    with torch.no_grad():
        for inputs in batches:
            ref, got = run_outputs(fp_gm, inputs), run_outputs(q_gm, inputs)
            for i, (a, b) in enumerate(zip(ref, got, strict=True)):
                if len(per_output) <= i:
                    per_output.append([])
                per_output[i].append(sqnr_db(a, b))
                max_abs = max(max_abs, float((a - b).abs().max()))
    sqnr = [min(v) for v in per_output]
    return {"sqnr_db_per_output": sqnr, "min_sqnr_db": min(sqnr) if sqnr else float("inf"),
            "max_abs_err": max_abs, "batches": len(batches)}


def quantized_counts(ctx) -> dict[str, dict[str, int]]:
    """``{op kind: {precision: sites}}``: e.g. ``{"linear": {"W8A8": 4, "fp": 1}}`` (W: weight bits, A: input bits)."""
    counts: dict[str, dict[str, int]] = {}
    for name, site in ctx.sites.items():
        roles = {k.rsplit(".", 1)[1]: qp.bits for k, qp in ctx.qparams.items() if k.rsplit(".", 1)[0] == name}
        if not roles:
            precision = "fp"
        elif site.kind == "linear":
            precision = (f"W{roles['weight']}" if "weight" in roles else "Wfp") + (f"A{roles['input']}" if "input" in roles else "Afp")
        else:  # matmul: both operands are activations
            precision = "x".join(f"A{roles[r]}" if r in roles else "Afp" for r in ("a", "b"))
        kind = counts.setdefault(site.kind, {})
        kind[precision] = kind.get(precision, 0) + 1
    return counts


def _md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _calibration_md(cal: dict) -> list[str]:
    out = ["## Calibration", "", f"{cal['batches']} batches (steps) from {cal['source']}."]
    if "resample" in cal:
        rs = cal["resample"]
        out += ["", (f"Codebook resampling redrew {rs['reassigned']} of {rs['tokens']} tokens; every scale's code "
                    "counts now equal their targets floor(p̂·N) + largest remainders:"), "",
                _md_table(["scale", "tokens", "over-sampled codes", "under-sampled codes", "tokens redrawn",
                           "L1 to target before", "after"],
                          [[s["scale"], s["tokens"], s["over_codes"], s["under_codes"], s["reassigned"],
                            s["l1_before"], s["l1_after"]] for s in rs["per_scale"]])]
    if "dgc" in cal and cal["dgc"].get("method") == "none":
        out += ["", f"DGC: off (set by {cal['dgc'].get('origin', '?')}); the observers saw every generated sequence."]
    elif "dgc" in cal:
        d = cal["dgc"]
        of = f" of {d['candidates']} generated" if "candidates" in d else ""
        origin = f", set by {d['origin']}" if "origin" in d else ""
        out += ["", (f"DGC (`{d['method']}`{origin}) kept {d['kept_cond']} conditional and {d['kept_uncond']} "
                    f"unconditional{of} sequences ({cal.get('rows', '?')} batch rows over all steps): {d['reason']}."
                    + (f" Feature of a sequence: {d['feature']}." if "feature" in d else "")), ""]
        rows = [["cond", k["sample"], k["class"], f"{k['distance']:.4g}"] for k in d.get("kept_cond_samples", [])]
        rows += [["uncond", k["sample"], k["class"], f"{k['distance']:.4g}"] for k in d.get("kept_uncond_samples", [])]
        if rows:
            out.append(_md_table(["set", "sample", "class", "distance to its set"], rows))
    return out + [""]


def _quality_md(q: dict) -> list[str]:
    from compiler.quality import table_rows

    headers, rows = table_rows(q)
    what = (f"{q['images']} images (classes in turn, seed {q['seed']})" if "task" not in q else
            f"{q['images']} {q['task']['task']} edits of {q['task']['images']} (box {q['task']['box']}, seed {q['seed']}; "
            "PSNR kept: against the input's reconstruction where the input is kept)")
    out = ["## Image quality", "",
           (f"{what}, the same for every model, so each pairs "
            "with its FP twin. Fidelity columns compare with the FP row; MNIST-FID is against the 1,000 held-out "
            "digits (lower is better; with this few images it is biased upwards, compare rows, not papers)."), "",
           _md_table(headers, rows), ""]
    if "speed" in q:
        sp = q["speed"]
        out += [(f"onnxruntime int8 {sp['ort_int8_ms']:.2f} ms vs FP32 {sp['ort_fp32_ms']:.2f} ms per step: "
                 f"**{sp['int8_speedup']:.2f}x** (medians of {sp['repeats']} interleaved calls on this machine; "
                 f"files {sp['onnx_bytes']['fp32'] / 1e6:.2f} MB -> {sp['onnx_bytes']['int8'] / 1e6:.2f} MB)."), ""]
    for name, path in q.get("grids", {}).items():
        out += [f"**{name}**", "", f"![{name}]({path})", ""]
    return out


def render_markdown(r: dict) -> str:
    fid, size = r["fidelity"], r["size_bytes"]
    out = [f"# Quantization report: {r['model']}", "",
           f"- recipe: `{r['recipe']}` ({r['bits']}), target `{r['target']}`, family `{r['family']}`",
           f"- pipeline: `{r['pipeline']}`", ""]
    counts = r.get("quantized_counts", {})
    if counts:
        out += ["## What was quantized", "", _md_table(
            ["op", "precision", "sites"], [[k, p, n] for k, by in counts.items() for p, n in sorted(by.items())]), ""]
    if r.get("exclude"):
        out += ["## Exclusions (kept in full precision)", "", _md_table(
            ["pattern", "matched sites"], [[f"`{p}`", ", ".join(f"`{s}`" for s in sites)] for p, sites in r["exclude"].items()]), ""]
    out += _calibration_md(r["calibration"])
    if "quality" in r:
        out += _quality_md(r["quality"])
    out += ["## Fidelity to the FP model", "",
           _md_table(["output", "SQNR (dB, worst batch)"], [[i, f"{v:.1f}"] for i, v in enumerate(fid["sqnr_db_per_output"])]),
           "", f"Max abs error over {fid['batches']} batches: {fid['max_abs_err']:.3g}", "",
           "## Size", "", _md_table(["", "bytes"], [["FP", size["fp"]], ["quantized", size["quantized"]],
                                                     ["ratio", f"{size['fp'] / max(size['quantized'], 1):.2f}x"]])]
    if "speed" in r:
        sp = r["speed"]
        out += ["", "## Speed (one step on the example inputs, this machine; `python -m tools.bench` for real numbers)", "",
                _md_table(["", "ms (median of 5)"], [[k, f"{v:.2f}"] for k, v in sp.items()])]
    plots = r.get("plots", {})
    if plots:
        out += ["", "## Plots", ""]
        for title, path in plots.items():
            out += [f"### {title}", "", f"![{title}]({path})", ""]
    if "onnx" in r:
        o = r["onnx"]
        out += ["", "## ONNX", "",
                (f"`{o['path']}`: {o['file_bytes']} bytes, {o['QuantizeLinear']} QuantizeLinear, "
                f"{o['DequantizeLinear']} DequantizeLinear; inputs {o['inputs']}, outputs {o['outputs']}."),
                (f"onnxruntime (QDQ fusion disabled) vs torch fake-quant: max |diff| = {o['ort_reference_max_abs_diff']:.2e}, "
                 f"SQNR {o['ort_reference_sqnr_db']:.1f} dB (beyond float rounding, a difference means a value on a "
                 "rounding boundary took the neighbouring code in one runtime)"),
                (f"onnxruntime fast mode (fused int8) vs reference: max relative diff "
                 f"{o['ort_fast']['max_rel_diff_vs_reference']:.2e} (CPU VNNI: {'yes' if o['ort_fast']['cpu_vnni'] else 'no'}"
                 f"{'; 7-bit weights (reduce-range), because this CPU has no VNNI' if o['ort_fast'].get('reduce_range') else ''})"),
                *([(f"onnxruntime int8 model `{m['path']}`: {m['int8_gemms']} u8s8 + {m['u8u8_gemms']} u8u8 "
                    f"MatMulIntegerToFloat, {m['float_matmuls']} float MatMuls"
                    + (f", {m['row_gemms']} one-row linears as DynamicQuantizeMatMul" if m.get('row_gemms') else "")
                    + f"; max relative diff vs reference {m['max_rel_diff_vs_reference']:.2e}"
                    + (f" ({m['max_rel_diff_vs_reference_without_row_gemms']:.2e} with those in float)"
                       if 'max_rel_diff_vs_reference_without_row_gemms' in m else ""))]
                  if (m := o['ort_fast'].get('int8_model')) else []),
                "", (f"TensorRT Q/DQ lint: {'passes' if o['tensorrt_lint']['ok'] else 'FAILS'}; "
                f"int8 GEMMs: {', '.join(f'`{k}`' for k in o['tensorrt_lint']['int8_gemms']) or 'none'}; "
                f"{o['tensorrt_lint']['float_gemms']} float GEMMs")]
        out += [f"- {v}" for v in o["tensorrt_lint"]["violations"]]
    if "head" in r:  # the recipe's [head]: MAR's diffusion head as its own graph
        h, ho = r["head"], r["head"]["onnx"]
        out += ["", "## Diffusion head", "",
                (f"`{h['pipeline']}` at {h['bits']}, calibrated on {h['calibration_calls']} head calls (one denoising "
                 f"step in {h['denoising_stride']}); output SQNR vs FP {h['fidelity']['min_sqnr_db']:.1f} dB on "
                 f"{h['held_out_calls']} held-out calls. `{ho['path']}`: TensorRT Q/DQ lint "
                 f"{'passes' if ho['tensorrt_lint']['ok'] else 'FAILS'}, "
                 f"{sum(ho['tensorrt_lint']['int8_gemms'].values())} int8 GEMMs; onnxruntime vs torch max |diff| "
                 f"{ho['ort_reference_max_abs_diff']:.2e}."
                 + (f" The first {h['fp_steps']} denoising steps of every chain run the FP head ([head] fp_steps)."
                    if h.get("fp_steps") else "")), ""]
        if h["site_sqnr_db"]:
            out += [_md_table(["head site", "SQNR alone (dB)"],
                              [[f"`{k}`", f"{v:.1f}"] for k, v in sorted(h["site_sqnr_db"].items(), key=lambda kv: kv[1])])]
    out += ["", "## Passes", "", _md_table(
        ["#", "pass", "changed", "seconds", "probe SQNR vs previous (dB)", "dump"],
        [[p["index"], f"`{p['spec']}`", "skipped" if p.get("skipped") else ("yes" if p.get("modified") else "no"),
          p.get("seconds", ""), f"{p['probe_sqnr_db']:.1f}" if "probe_sqnr_db" in p else "", p.get("dump", "")]
         for p in r["passes"]])]
    site_sqnr = r.get("site_sqnr_db", {})
    out += ["", "## Sites", "", "SQNR: the model's output against FP with only this site quantized (example inputs).", "",
            _md_table(["site", "kind", "quantized", "excluded by", "SQNR alone (dB)"],
                      [[f"`{k}`", v["kind"], ", ".join(v["quantized"]) or "-", v["excluded_by"] or "",
                        f"{site_sqnr[k]:.1f}" if k in site_sqnr else ""] for k, v in r["sites"].items()])]
    if r["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(out) + "\n"


def write_reports(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(render_markdown(report))
