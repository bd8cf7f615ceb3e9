"""PAR (YuqingWang1029/PAR): LlamaGen that predicts n image tokens per step (models.md §4).

Everything but the sequence layout is LlamaGen's (``frontends/llamagen.py``): same blocks, step
signature, driver and loading. What PAR changes, as hooks of the LlamaGen model:

* token order: the grid is cut into n = s² regions and the sequence visits one token of every
  region at a time (``token_order``); ``generate`` returns raster order for the tokenizer;
* the sequence is ``[cls, t_0 .. t_{n-1}, spe_0 .. spe_{n-2}, t_n .. t_{N-1}]``: the n-1 learned
  special embeddings (``spe_tok_embeddings``, the only extra weights) fill the first parallel
  group; position p still predicts token p, and special / class positions get zero RoPE rows;
* attention is causal and bidirectional inside each group ``[n + i·n, 2n + i·n)``;
* schedule: the class token, n-1 single tokens, then n positions per step (576 tokens, 4x: 147 steps);
* STWQ groups by position (method.md §4.2): ``[0] .. [n-1]`` one each, ``[n, 2n)``, ``[2n, ..)``;
  for n = 4 the six groups ``[0] [1] [2] [3] [4:8] [8:]``.

PAR and LlamaGen checkpoints differ by the ``spe_tok_embeddings.special_embeddings.weight`` key
(its rows, n-1, give n), so ``detect`` tells them apart by keys alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from frontends.families import Family, register_family
from frontends.llamagen import (
    CONFIGS,
    GPTConfig,
    Transformer,
    base_config,
    build_family,
    generate,
    unwrap_state_dict,
)

__all__ = ["PAR_CONFIGS", "PARConfig", "PARStep", "PARTransformer", "build", "detect", "generate"]


@dataclass(frozen=True)
class PARConfig(GPTConfig):
    grid: int = 24  # every released PAR model is a 384 px model
    ar_token_num: int = 4  # n: tokens predicted per parallel step (n - 1 special tokens)

    @property
    def spe_token_num(self) -> int:
        return self.ar_token_num - 1


def _par_config(base: GPTConfig, n: int, cfg_scale: float) -> PARConfig:
    fields = {k: v for k, v in base.__dict__.items() if k != "grid"}
    return PARConfig(**{**fields, "ar_token_num": n, "cfg_scale": cfg_scale})


# Guidance scales of the README's sampling commands; other sizes default to 1.5.
_RELEASED_CFG = {("XL", 4): 1.5, ("XXL", 4): 1.435, ("3B", 4): 1.345, ("3B", 16): 1.5}
PAR_CONFIGS = {
    f"PAR-{name[4:]}-{n}x": _par_config(c, n, _RELEASED_CFG.get((name[4:], n), 1.5))
    for name, c in CONFIGS.items() if name != "tiny" for n in (4, 16)
}
PAR_CONFIGS["tiny"] = PARConfig(**{**CONFIGS["tiny"].__dict__, "cfg_scale": 1.5})


class SpecialTokenEmbedding(nn.Module):
    def __init__(self, num_special_tokens: int, dim: int):
        super().__init__()
        self.special_embeddings = nn.Embedding(num_special_tokens, dim)


class PARTransformer(Transformer):
    """PAR model: LlamaGen's step with PAR's layout hooks (module docstring)."""

    family = "par"

    def __init__(self, cfg: PARConfig):
        super().__init__(cfg)
        self.spe_tok_embeddings = SpecialTokenEmbedding(cfg.spe_token_num, cfg.dim)

    def token_order(self) -> torch.Tensor:
        s = round(self.config.ar_token_num ** 0.5)
        g = self.config.grid
        # raster index = (r1·g/s + a)·g + r2·g/s + b, visited in the order (a, b, r1, r2)
        return torch.arange(g * g, device="cpu").view(s, g // s, s, g // s).permute(1, 3, 0, 2).flatten()

    def arrange_rope(self, rope: torch.Tensor) -> torch.Tensor:
        n = self.config.ar_token_num
        zeros = rope.new_zeros(1, *rope.shape[1:])
        return torch.cat([zeros, rope[:n], zeros.expand(n - 1, *rope.shape[1:]), rope[n:]])

    def sequence_ids(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, first_special = self.config.ar_token_num, self.config.vocab_size + self.config.num_classes + 1
        special = torch.arange(first_special, first_special + n - 1, device=tokens.device).expand(tokens.shape[0], -1)
        return torch.cat([self.class_ids(labels), tokens[:, :n], special, tokens[:, n:]], 1)

    def attention_allowed(self) -> torch.Tensor:
        n, pos = self.config.ar_token_num, torch.arange(self.seq_len)
        group = torch.where(pos >= n, (pos - n) // n, -1 - pos)  # a unique negative id per lone position
        return super().attention_allowed() | (group[:, None] == group[None, :])

    def token_groups(self, input_pos: torch.Tensor) -> torch.Tensor:
        n = self.config.ar_token_num
        return torch.where(input_pos < 2 * n, input_pos.clamp(max=n), n + 1)

    def schedule(self) -> list[torch.Tensor]:
        n, pos = self.config.ar_token_num, torch.arange(self.config.num_tokens)
        return list(pos[:n].split(1)) + list(pos[n:].split(n))

    def embedding_tables(self) -> list[nn.Embedding]:
        return super().embedding_tables() + [self.spe_tok_embeddings.special_embeddings]


PARStep = PARTransformer  # the traced unit is the model itself (see frontends/llamagen.py)


def detect(state_dict: dict) -> str | None:
    """PAR config name (``PAR-<size>-<n>x`` / ``tiny``) from the layer shapes and the special tokens."""
    weights = unwrap_state_dict(state_dict)
    special = weights.get("spe_tok_embeddings.special_embeddings.weight")
    base = base_config(weights)
    if special is None or base is None:
        return None
    n = special.shape[0] + 1
    name = "tiny" if base == "tiny" else f"PAR-{base[4:]}-{n}x"
    return name if name in PAR_CONFIGS and PAR_CONFIGS[name].ar_token_num == n else None


build = partial(build_family, PARTransformer, PAR_CONFIGS)

register_family(Family("par", detect, build))
