"""Our attention kernel against cuDNN SDPA over fp16 caches, at the step shapes, alone and with the output
projection's input quantization.

    python benchmarks/attention_bench.py [--json FILE]

Per shape (``B`` rows with CFG, heads, queries ``T``, cached keys ``L``, head dim 64):
- ``sdpa``: cuDNN/flash SDPA over the visible keys of fp16 caches (what ``cached_attention`` runs), and
  ``sdpa_quant``: the same followed by the quantize kernel of the projection's input (``act_quant``, three token
  groups), what a step ran before ``attention_into_codes``;
- ``ours``: ``ops.attention`` over the fp16 caches, float out, and ``ours_codes``: writing the codes itself (what
  ``cached_attention_codes`` runs), with every tile of ``kernels.ATTENTION_CONFIGS`` that fits the query count;
- ``int8``/``int8_codes``: the same over int8 caches with a scale per row;
- the cache writes (``kv_write`` fp16 vs ``kv_write_int8``) of the step's new rows.
The error columns are against SDPA in float32 over the float caches. Times: ``triton.testing.do_bench`` medians.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backends.cuda import kernels, ops  # noqa: E402
from backends.cuda import reference as ref  # noqa: E402

SHAPES = [  # name, B (CFG rows), H, T, L
    ("var-d16 last scale, batch 64", 128, 16, 256, 680),
    ("var-d16 last scale, batch 16", 32, 16, 256, 680),
    ("var-d16 scale 9 (13x13), batch 64", 128, 16, 169, 424),
    ("gpt-b decode, batch 64", 128, 12, 1, 257),
    ("gpt-l decode, batch 64", 128, 20, 1, 257),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, B, H, T, L in SHAPES:
        D = 64
        q = torch.randn(B, T, H, D, device="cuda", dtype=torch.float16).transpose(1, 2)  # the step's layout
        kf = torch.randn(B, H, L, D, device="cuda", dtype=torch.float16)
        vf = torch.randn(B, H, L, D, device="cuda", dtype=torch.float16)
        (k, ks), (v, vs) = ref.kv_quantize(kf), ref.kv_quantize(vf)
        groups = torch.arange(T, device="cuda") % 3
        grid = {"out_inv_scale": torch.tensor([40.0, 60.0, 80.0], device="cuda"),
                "out_zero": torch.tensor([0.0, 2.0, -1.0], device="cuda"), "groups": groups}
        expected = F.scaled_dot_product_attention(q.float(), kf.float(), vf.float()).transpose(1, 2)

        def sdpa_quant():
            out = F.scaled_dot_product_attention(q, kf, vf).transpose(1, 2).flatten(2).reshape(B * T, H * D)
            return ops.act_quant(out, act="none", inv_scale=grid["out_inv_scale"], zero=grid["out_zero"],
                                 groups=groups, tokens=T)

        runs = {"sdpa": lambda: F.scaled_dot_product_attention(q, kf, vf), "sdpa_quant": sdpa_quant,
                "ours": lambda: ops.attention(q, kf, vf, None, L, None),
                "ours_codes": lambda: ops.attention(q, kf, vf, None, L, None, **grid),
                "int8": lambda: ops.attention(q, k, v, None, L, None, k_scale=ks, v_scale=vs),
                "int8_codes": lambda: ops.attention(q, k, v, None, L, None, k_scale=ks, v_scale=vs, **grid)}
        row = {"shape": name, "B": B, "H": H, "T": T, "L": L}
        for key, fn in runs.items():
            row[f"{key}_ms"] = do_bench(fn)
        for key in ("ours", "int8"):
            out = runs[key]()
            row[f"{key}_rel_error"] = float((out.float() - expected).norm() / expected.norm())
        tiles = {}
        for c in kernels._prune_attention(kernels.ATTENTION_CONFIGS, {"T": T}):
            label = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
            try:
                tiles[label] = do_bench(lambda c=c: kernels.attention(q, kf, vf, None, L, D ** -0.5, **grid, config=c))
            except Exception as e:  # noqa: BLE001  (a tile that does not fit is reported, not fatal)
                tiles[label] = f"{type(e).__name__}: {str(e)[:100]}"
        row["ours_codes_tiles_ms"] = tiles
        index = torch.arange(L - T, L, device="cuda")
        new = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.float16).permute(2, 0, 3, 1, 4)[1]
        row["kv_write_fp16_ms"] = do_bench(lambda: ops.kv_write(kf, index, new))
        row["kv_write_int8_ms"] = do_bench(lambda: ops.kv_write_int8(k, ks, index, new))
        rows.append(row)
        us = {key: row[f"{key}_ms"] * 1e3 for key in runs}
        print(f"{name:36s} " + "  ".join(f"{key} {t:7.1f} us" for key, t in us.items())
              + f"  codes vs sdpa+quant {us['sdpa_quant'] / us['ours_codes']:.2f}x", flush=True)
        print("    ours_codes tiles: " + ", ".join(f"{t} {ms * 1e3:.1f}" if isinstance(ms, float) else f"{t} {ms}"
                                              for t, ms in tiles.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": kernels.triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
