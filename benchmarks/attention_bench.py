"""Our attention kernel's cache formats and products against SDPA over fp16 caches, at the step shapes.

    python benchmarks/attention_bench.py [--json FILE]

Per shape (``B`` rows with CFG, heads, queries ``T``, cached keys ``L``, head dim 64): cuDNN/flash SDPA over
the visible keys of fp16 caches (what ``cached_attention`` runs), our ``attention_int8`` over int8 caches with
a scale per row, every tile of ``kernels.ATTENTION_CONFIGS`` that fits the query count, and the cache writes
(``kv_write`` fp16 vs ``kv_write_int8``) of the step's new rows. The error column is the int8 result against
SDPA over the float caches it was quantized from. Times: ``triton.testing.do_bench`` medians.
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


# (label, k_mode, v_mode): ``kernels.attention``'s modes; e4m3 values are cached transposed ([B, H, D, L], so the
# FP8 product reads the keys' axis contiguous)
VARIANTS = [("fp16", 0, 0), ("int8 caches, dequantized", 1, 1), ("int8 q.k, fp16 v", 2, 0),
            ("int8 q.k, int8 v dequantized", 2, 1), ("int8 q.k, e4m3 p.v", 2, 2), ("e4m3 q.k, e4m3 p.v", 3, 2),
            ("fp16 q.k, e4m3 p.v", 0, 2)]


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
        caches = {0: (kf, None), 1: ref.kv_quantize(kf), 2: ref.kv_quantize(kf), 3: ref.kv_quantize(kf, fp8=True)}
        v8 = ref.kv_quantize(vf, fp8=True)
        vals = {0: (vf, None), 1: ref.kv_quantize(vf), 2: (v8[0].transpose(2, 3).contiguous().transpose(2, 3), v8[1])}
        sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, kf, vf))
        sdpa_contiguous = do_bench(lambda: F.scaled_dot_product_attention(q.contiguous(), kf, vf))
        expected = F.scaled_dot_product_attention(q.float(), kf.float(), vf.float())
        row = {"shape": name, "B": B, "H": H, "T": T, "L": L, "sdpa_fp16_ms": sdpa,
               "sdpa_fp16_contiguous_q_ms": sdpa_contiguous, "ours": {}}
        print(f"{name:36s} SDPA fp16 {sdpa * 1e3:8.1f} us (q contiguous {sdpa_contiguous * 1e3:.1f} us)", flush=True)
        for label, km, vm in VARIANTS:
            (k, ks), (v, vs) = caches[km], vals[vm]

            def run(config=None):
                return kernels.attention(q, k, ks, v, vs, None, L, D ** -0.5, k_mode=km, v_mode=vm, config=config)

            try:
                err = float((run().float() - expected).norm() / expected.norm())
                tuned = do_bench(run)
            except Exception as e:  # noqa: BLE001  (a variant that does not compile is reported, not fatal)
                row["ours"][label] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"    {label:32s} {row['ours'][label]}", flush=True)
                continue
            tiles = {}
            for c in kernels._prune_attention(kernels.ATTENTION_CONFIGS, {"T_BUCKET": kernels.triton.next_power_of_2(T)}):
                tile = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                try:
                    tiles[tile] = do_bench(lambda c=c: run(c))
                except Exception as e:  # noqa: BLE001
                    tiles[tile] = f"{type(e).__name__}: {str(e)[:100]}"
            row["ours"][label] = {"ms": tuned, "vs_sdpa": sdpa / tuned, "rel_error_vs_float": err, "tiles_ms": tiles}
            print(f"    {label:32s} {tuned * 1e3:8.1f} us ({sdpa / tuned:.2f}x SDPA)  err {err:.2e}  tiles: "
                  + ", ".join(f"{t} {ms * 1e3:.1f}" if isinstance(ms, float) else f"{t} {ms}" for t, ms in tiles.items()),
                  flush=True)
        index = torch.arange(L - T, L, device="cuda")
        new = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.float16).permute(2, 0, 3, 1, 4)[1]
        k8, ks8 = caches[1]
        row["kv_write_fp16_ms"] = do_bench(lambda: ops.kv_write(kf, index, new))
        row["kv_write_int8_ms"] = do_bench(lambda: ops.kv_write_int8(k8, ks8, index, new))
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": kernels.triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
