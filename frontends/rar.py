"""RAR (bytedance/1d-tokenizer, ``modeling/rar.py``): the model, its one-step graph and its sampler.

RAR is a decoder-only transformer with DiT-style adaLN whose condition depends on the position:
block inputs are ``x = [cls, class token, image tokens...]`` and every position ``p`` is modulated
by ``SiLU(embeddings(class) + timesteps_embeddings[p])``. At inference it generates the 256
tokens in raster order: one step feeds the 2 prefix tokens (cls + class condition), each later
step feeds the token just sampled.

* ``RAR`` holds the parameters under the names of the official ``rar_b.bin`` (strict load) and
  its ``forward`` is the teacher-forced pass in raster order.
* ``RARStep`` is one generation step with explicit, fixed-size state, traceable by torch.fx:
  ``(input_ids, condition, positions, attn_mask, k_cache, v_cache, token_groups) ->
  (logits, k_cache, v_cache)``. Prefill (T=2) and decode (T=1) are the same graph. Positional
  tables and the per-position adaLN input are gathered by ``positions`` inside the graph.
* ``generate`` is the Python driver (CFG with the official cosine-power schedule, temperature,
  multinomial sampling); it calls any callable with ``RARStep.forward``'s signature.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UserError
from frontends.families import Family, register_family
from frontends.generic import ModelBundle, step_dynamic_shapes, widen_batch
from frontends.maskgit_vq import count_indexed, load_strict, load_tokenizer
from frontends.sampling import check_probs, image_generators, multinomial_rows, on_device


@dataclass(frozen=True)
class RARConfig:
    hidden_size: int
    depth: int
    num_heads: int
    intermediate_size: int
    image_seq_len: int = 256
    codebook_size: int = 1024
    num_classes: int = 1000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def cache_len(self) -> int:
        """Slots a generation writes: cls, class token and every image token but the last."""
        return self.image_seq_len + 1

    @property
    def mask_token_id(self) -> int:
        """Id fed at position 0, where the graph substitutes the cls token (any valid id would do)."""
        return self.codebook_size

    def condition_id(self, labels: torch.Tensor) -> torch.Tensor:
        """Class label -> token id: ids are [codebook | mask | classes | null class]."""
        return labels + self.codebook_size + 1

    @property
    def none_condition_id(self) -> int:
        return self.codebook_size + self.num_classes + 1


CONFIGS = {
    "rar_b": RARConfig(768, 24, 16, 3072),
    "rar_l": RARConfig(1024, 24, 16, 4096),
    "rar_xl": RARConfig(1280, 32, 16, 5120),
    "rar_xxl": RARConfig(1408, 40, 16, 6144),
    "tiny": RARConfig(64, 2, 2, 256, image_seq_len=16, codebook_size=64, num_classes=10),
}


@dataclass(frozen=True)
class Sampling:
    """Defaults: the README demo (constant CFG 4). Named configs: the settings of the paper's FIDs."""

    guidance_scale: float = 4.0
    guidance_scale_pow: float = 0.0
    temperature: float = 1.0


SAMPLING = {
    "rar_b": Sampling(16.0, 2.75, 1.0),
    "rar_l": Sampling(15.5, 2.5, 1.02),
    "rar_xl": Sampling(6.9, 1.5, 1.02),
    "rar_xxl": Sampling(8.0, 1.2, 1.02),
}

STEP_INPUT_NAMES = ["input_ids", "condition", "positions", "attn_mask", "k_cache", "v_cache", "token_groups"]
STEP_OUTPUT_NAMES = ["logits", "k_cache_out", "v_cache_out"]  # ONNX forbids an output named like an input
IMAGE_GROUP = 2  # STWQ token groups (method.md 4.2): 0 = cls, 1 = class token, 2 = image tokens


def modulate(x, shift, scale):
    """Kept literally ``x * (1 + scale) + shift``: the GPS pass folds its scales into this form."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """qkv with bias, LayerNorm on q and k per head, explicit matmuls (quantization sites
    ``attn.matmul1/2`` as in the reference code), cache written at ``positions``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask, k_cache, v_cache, positions):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        k_cache = k_cache.index_copy(2, positions, k)
        v_cache = v_cache.index_copy(2, positions, v)
        scores = torch.matmul(q, k_cache.transpose(-2, -1)) * self.scale + attn_mask
        out = torch.matmul(scores.softmax(-1), v_cache)
        return self.proj(out.transpose(1, 2).flatten(2)), k_cache, v_cache


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, attn_mask, k_cache, v_cache, positions):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h, k_cache, v_cache = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask, k_cache, v_cache,
                                        positions)
        x = x + gate_msa * h
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, k_cache, v_cache


class FinalLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)  # (scale, shift): the reverse of the blocks
        return modulate(self.norm_final(x), shift, scale)


class RAR(nn.Module):
    """The official parameter layout (names, shapes and order of ``rar_*.bin``)."""

    def __init__(self, config: RARConfig):
        super().__init__()
        self.config = config
        d, s = config.hidden_size, config.image_seq_len
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, s + 1024, d))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, s + 1024, d))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, s + 100, d))
        self.blocks = nn.ModuleList(Block(d, config.num_heads, config.intermediate_size) for _ in range(config.depth))
        self.embeddings = nn.Embedding(config.codebook_size + 1 + config.num_classes + 1, d)
        self.adaln_before_head = FinalLayer(d)
        self.lm_head = nn.Linear(d, config.codebook_size)

    def forward(self, input_ids, condition):
        """Teacher-forced pass in raster order (official ``forward_fn`` at inference).

        ``input_ids [B, n]`` image tokens, ``condition [B]`` class token ids. Returns logits
        ``[B, 1 + n, V]`` (the cls position dropped): row j predicts image token j.
        """
        length = input_ids.shape[1] + 2
        ids = torch.cat([prefix_ids(self.config, condition), input_ids], 1)
        positions = torch.arange(length)
        cache = empty_cache(self.config, input_ids.shape[0], length)
        logits, _, _ = step_forward(self, ids, condition, positions, causal_mask(positions, length), cache, cache)
        return logits[:, 1:]


class RARStep(nn.Module):
    """One generation step of a RAR, as a graph with explicit inputs.

    It shares the model's parameters under the same names (no ``model.`` prefix), so traced
    graphs, quantization sites and scale buffers speak the checkpoint's names. To export one
    ONNX graph for prefill and decode, give the token axis T a dynamic dim and export from a
    prefill (T=2) example: torch.export specializes dims of size 1.
    """

    def __init__(self, model: RAR):
        super().__init__()
        self.config = model.config
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, child in model.named_children():
            self.add_module(name, child)

    def forward(self, input_ids, condition, positions, attn_mask, k_cache, v_cache, token_groups):
        """``input_ids [B, T]`` (position 0 is replaced by the cls token), ``condition [B]`` class
        token ids, ``positions [T]``, additive ``attn_mask [T, cache_len]``, caches
        ``[depth, B, heads, cache_len, head_dim]``, ``token_groups [T]`` (STWQ group of each
        token; not used by the float math, the quantized graph indexes its scales with it).
        Returns ``logits [B, T, V]`` and the caches with slots ``positions`` written."""
        return step_forward(self, input_ids, condition, positions, attn_mask, k_cache, v_cache)


def embed(m, input_ids, condition, positions):
    """Block input ``x`` and adaLN condition ``c``, both ``[B, T, D]``, for the given positions.

    Official: ``x = [cls, emb(class), emb(tokens)] + pos_embed + target-aware embedding``, where
    input p >= 1 gets the target-aware row of the position it predicts (``target_aware[p + 1]``)
    and the cls and the position after the last image token get zero; ``c = emb(class) +
    timesteps_embeddings[p]``.
    """
    s = m.config.image_seq_len
    x = torch.where((positions == 0).unsqueeze(-1), m.cls_token, m.embeddings(input_ids))
    target_aware = F.pad(m.target_aware_pos_embed[0, 2:2 + s], (0, 0, 1, 1))
    x = x + m.pos_embed[0].index_select(0, positions) + target_aware.index_select(0, positions)
    c = m.embeddings(condition).unsqueeze(1) + m.timesteps_embeddings[0].index_select(0, positions)
    return x, c


def step_forward(m, input_ids, condition, positions, attn_mask, k_cache, v_cache):
    """The RAR computation on ``m``, a module holding RAR's parameters under their official names."""
    x, c = embed(m, input_ids, condition, positions)
    ks, vs = [], []
    for i, block in enumerate(m.blocks):
        x, k, v = block(x, c, attn_mask, k_cache[i], v_cache[i], positions)
        ks.append(k)
        vs.append(v)
    logits = m.lm_head(m.adaln_before_head(x, c))
    return logits, torch.stack(ks), torch.stack(vs)


# ----------------------------------------------------------------------------- driver


def causal_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Additive ``[T, length]`` mask: the query at position p sees cache slots 0..p."""
    hidden = torch.arange(length).unsqueeze(0) > positions.unsqueeze(1)
    return torch.zeros(hidden.shape).masked_fill(hidden, float("-inf"))


def empty_cache(config: RARConfig, batch: int, length: int | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(config.depth, batch, config.num_heads, length or config.cache_len, config.head_dim,
                       device=device)


def prefix_ids(config: RARConfig, condition: torch.Tensor) -> torch.Tensor:
    """Ids of the 2 prefix positions: a placeholder for the cls token, then the class token."""
    return torch.stack([torch.full_like(condition, config.mask_token_id), condition], 1)


def position_inputs(config: RARConfig, positions: torch.Tensor) -> tuple:
    """``(positions, their mask rows, their token groups)``: the step inputs that follow from the positions."""
    groups = positions.clamp(max=IMAGE_GROUP)  # position 0 = cls, 1 = class token, >= 2 image tokens
    return positions, causal_mask(positions, config.cache_len), groups


def step_inputs(config: RARConfig, input_ids, condition, start: int, k_cache, v_cache) -> tuple:
    """Arguments of ``RARStep.forward`` for tokens placed at positions ``start, start + 1, ...``."""
    positions, mask, groups = position_inputs(config, torch.arange(start, start + input_ids.shape[1]))
    return input_ids, condition, positions, mask, k_cache, v_cache, groups


def cfg_scale(step: int, seq_len: int, guidance_scale: float, guidance_scale_pow: float) -> torch.Tensor:
    """Official cosine-power CFG schedule, from 1 at step 0 up to ``guidance_scale`` (``pow=0``:
    constant). Computed with the same float32 tensor ops as the official code, for equal logits."""
    power = torch.full((1,), float(guidance_scale_pow))
    ramp = (1 - torch.cos((step / seq_len) ** power * math.pi)) / 2
    return (guidance_scale - 1) * ramp + 1


def sample(logits: torch.Tensor, generators: list[torch.Generator], bad: list | None = None) -> torch.Tensor:
    probs = logits.softmax(-1)
    return multinomial_rows(probs, generators, bad=bad)


@torch.no_grad()
def generate(model: RAR, labels, *, guidance_scale: float, guidance_scale_pow: float, temperature: float = 1.0,
             seed: int = 0, step=None) -> torch.Tensor:
    """Class-conditional sampling as the official ``RAR.generate`` (raster order, no top-k/p).

    ``step`` is any callable with ``RARStep.forward``'s signature returning torch tensors (a
    traced or quantized GraphModule, an onnxruntime wrapper); default: the eager step.
    ``guidance_scale == 0`` disables CFG as in the official code. Returns ids ``[B, seq_len]``.
    """
    cfg = model.config
    step = RARStep(model).eval() if step is None else step
    device = model.pos_embed.device  # a model moved to a GPU samples there, as VAR's driver
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
    n = labels.numel()
    condition = cfg.condition_id(labels)
    if guidance_scale != 0:
        condition = torch.cat([condition, torch.full_like(condition, cfg.none_condition_id)])
    generators = image_generators(seed, n, device)
    k_cache, v_cache = empty_cache(cfg, len(condition), device=device), empty_cache(cfg, len(condition), device=device)
    # every step's positions, mask rows, groups and CFG scale reach the device at once, and the draws' checks are
    # read at the end: no host sync between tokens. The prefix step places 2 positions, every later one 1.
    sizes = [2] + [1] * (cfg.image_seq_len - 1)
    positions, masks, groups = (t.to(device).split(sizes) for t in position_inputs(cfg, torch.arange(sum(sizes))))
    scales = torch.cat([cfg_scale(i, cfg.image_seq_len, guidance_scale, guidance_scale_pow)
                        for i in range(cfg.image_seq_len)]).to(device)
    ids, tokens, bad = prefix_ids(cfg, condition), [], []
    for i in range(cfg.image_seq_len):
        logits, k_cache, v_cache = step(*on_device(device, ids, condition, positions[i], masks[i], k_cache, v_cache,
                                                   groups[i]))
        logits = logits[:, -1]
        if guidance_scale != 0:
            cond, uncond = logits[:n], logits[n:]
            logits = uncond + (cond - uncond) * scales[i : i + 1]
        tokens.append(sample(logits / temperature, generators, bad=bad))
        ids = tokens[-1].repeat(len(condition) // n).unsqueeze(1)
    check_probs(bad)
    return torch.stack(tokens, 1)


@torch.no_grad()
def example_inputs(step: RARStep, label: int = 0, filled: int = 4) -> tuple:
    """A CFG decode step (batch 2: the class and the null class) at position ``filled``, whose
    cache slots ``0..filled-1`` were written by real steps fed with greedy tokens."""
    cfg = step.config
    filled = min(filled, cfg.cache_len - 1)
    condition = torch.tensor([cfg.condition_id(label), cfg.none_condition_id])
    cache = empty_cache(cfg, 2)
    inputs = step_inputs(cfg, prefix_ids(cfg, condition), condition, 0, cache, cache)
    for start in range(2, filled + 1):
        logits, k_cache, v_cache = step(*inputs)
        token = logits[0, -1].argmax().repeat(2, 1)
        inputs = step_inputs(cfg, token, condition, start, k_cache, v_cache)
    return inputs


def random_rar(config: RARConfig | str = "tiny", seed: int = 0) -> RAR:
    """A RAR with random weights that exercise every path, for tests and speed benchmarks. (The
    official adaLN-zero init makes every block the identity and the logits a constant.)"""
    model = RAR(CONFIGS[config] if isinstance(config, str) else config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith(".weight") else 0.1 * noise)
            elif name.endswith(".weight") and name != "embeddings.weight":
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.5 * noise)
    return model.eval()


# ----------------------------------------------------------------------------- family

_SIGNATURE_KEYS = ("adaln_before_head.adaLN_modulation.1.weight", "blocks.0.adaLN_modulation.1.weight",
                   "timesteps_embeddings", "target_aware_pos_embed")


def infer_config(state_dict: dict) -> RARConfig:
    """The architecture read from tensor shapes (heads from the q-norm width)."""
    needed = ("cls_token", "embeddings.weight", "lm_head.weight", "timesteps_embeddings",
              "blocks.0.attn.q_norm.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise UserError(f"RAR checkpoint lacks {', '.join(missing)}: cannot read the model size")
    dim = state_dict["cls_token"].shape[-1]
    codebook = state_dict["lm_head.weight"].shape[0]
    return RARConfig(
        hidden_size=dim,
        depth=count_indexed(state_dict, "blocks.{}.adaLN_modulation.1.weight"),
        num_heads=dim // state_dict["blocks.0.attn.q_norm.weight"].shape[0],
        intermediate_size=state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        image_seq_len=state_dict["timesteps_embeddings"].shape[1] - 100,
        codebook_size=codebook,
        num_classes=state_dict["embeddings.weight"].shape[0] - codebook - 2,
    )


def detect(state_dict: dict) -> str | None:
    """``rar_b``/``rar_l``/``rar_xl``/``rar_xxl``/``tiny`` by shapes, ``custom`` for another RAR size."""
    if not all(k in state_dict for k in _SIGNATURE_KEYS):
        return None
    config = infer_config(state_dict)
    return next((name for name, c in CONFIGS.items() if c == config), "custom")


def load_rar(state_dict: dict, config: RARConfig, what: str = "RAR checkpoint") -> RAR:
    with torch.device("meta"):
        model = RAR(config)
    return load_strict(model, state_dict, what)


def build(state_dict: dict, path=None, config: str | None = None, tokenizer=None, **options) -> ModelBundle:
    """Strict-load a RAR checkpoint (and optionally the MaskGIT-VQGAN file ``tokenizer``)."""
    if options:
        raise UserError(f"the rar frontend has no option {', '.join(sorted(options))}")
    arch = CONFIGS[config] if config in CONFIGS else infer_config(state_dict)
    model = load_rar(state_dict, arch, f"RAR checkpoint {path or ''}".strip())
    vq = load_tokenizer(tokenizer) if tokenizer is not None else None
    if vq is not None and vq.config.codebook_size != arch.codebook_size:
        raise UserError(f"tokenizer {tokenizer} has {vq.config.codebook_size} codes, the RAR model predicts "
                        f"{arch.codebook_size}")
    sampling = asdict(SAMPLING.get(config, Sampling()))
    step = RARStep(model).eval()

    def generate_fn(labels, seed: int = 0, step=None) -> torch.Tensor:
        return generate(model, labels, seed=seed, step=step, **sampling)

    return ModelBundle(
        name=Path(path).stem if path else f"rar-{config}",
        module=step,
        example_inputs=example_inputs(step),
        family="rar",
        input_names=list(STEP_INPUT_NAMES),
        output_names=list(STEP_OUTPUT_NAMES),
        calib_inputs=[],
        extra={"model": model, "tokenizer": vq, "generate": generate_fn, "group_maps": {}, "sampling": sampling,
               "default_exclude": ["blocks.*.adaLN_modulation.1", "adaln_before_head.adaLN_modulation.1"],  # passes/exclude.py
               # export from the prefill (2 tokens): torch.export would freeze the decode's 1-token
               # axis; at batch 3, so the batch dim is not tied to the token dim (also 2)
               "export_inputs": widen_batch(example_inputs(step, label=0, filled=1), STEP_INPUT_NAMES, 3),
               "dynamic_shapes": step_dynamic_shapes(STEP_INPUT_NAMES, arch.cache_len)},
    )


register_family(Family("rar", detect, build))
