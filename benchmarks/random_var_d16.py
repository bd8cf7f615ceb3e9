"""Write VAR-d16 and its VQVAE (ch160v4096z32) with random weights, in the official layouts,
for timing ``tools.compile`` at real size without downloads:

    python benchmarks/random_var_d16.py /tmp/d16 && python -m tools.compile /tmp/d16/var_d16.pth \\
        --tokenizer /tmp/d16/vae_ch160v4096z32.pth --device cuda --calib-samples 128
"""
import sys
from pathlib import Path

import torch

from frontends.var import CONFIGS, VAR
from frontends.var_vqvae import VQVAE, VQVAE_CONFIGS

out = Path(sys.argv[1] if len(sys.argv) > 1 else "d16")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
torch.save(VAR(CONFIGS["d16"]).state_dict(), out / "var_d16.pth")
torch.save(VQVAE(VQVAE_CONFIGS["ch160v4096z32"]).state_dict(), out / "vae_ch160v4096z32.pth")
print(f"wrote {out}/var_d16.pth and {out}/vae_ch160v4096z32.pth")
