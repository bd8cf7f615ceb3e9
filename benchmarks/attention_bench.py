"""Attention over int8 KV caches (our Triton kernel) against SDPA over fp16 caches, at the step shapes.

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
        sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, kf, vf))
        expected = F.scaled_dot_product_attention(q.float(), kf.float(), vf.float())
        ours = ops.attention_int8(q, k, ks, v, vs, None, L, None)
        err = float((ours.float() - expected).norm() / expected.norm())
        autotuned = do_bench(lambda: ops.attention_int8(q, k, ks, v, vs, None, L, None))
        tiles = {}
        for c in kernels._prune_attention(kernels.ATTENTION_CONFIGS, {"T_BUCKET": kernels.triton.next_power_of_2(T)}):
            label = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
            try:
                tiles[label] = do_bench(lambda c=c: kernels.attention_int8(q, k, ks, v, vs, None, L, D ** -0.5,
                                                                         config=c))
            except Exception as e:  # noqa: BLE001  (a tile that does not fit is reported, not fatal)
                tiles[label] = f"{type(e).__name__}: {str(e)[:100]}"
        index = torch.arange(L - T, L, device="cuda")
        new = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.float16).permute(2, 0, 3, 1, 4)[1]
        write16 = do_bench(lambda: ops.kv_write(kf, index, new))
        write8 = do_bench(lambda: ops.kv_write_int8(k, ks, index, new))
        row = {"shape": name, "B": B, "H": H, "T": T, "L": L, "sdpa_fp16_ms": sdpa, "int8_ms": autotuned,
               "speedup": sdpa / autotuned, "rel_error_vs_float": err, "tiles_ms": tiles,
               "kv_write_fp16_ms": write16, "kv_write_int8_ms": write8}
        rows.append(row)
        print(f"{name:36s} SDPA fp16 {sdpa * 1e3:8.1f} us  int8 {autotuned * 1e3:8.1f} us ({sdpa / autotuned:.2f}x)"
              f"  err {err:.2e}  write {write16 * 1e3:.1f} -> {write8 * 1e3:.1f} us", flush=True)
        print("    tiles: " + ", ".join(f"{t} {ms * 1e3:.1f}" if isinstance(ms, float) else f"{t} {ms}"
                                    for t, ms in tiles.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": kernels.triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
