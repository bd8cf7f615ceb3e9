"""LlamaGen (FoundationVision/LlamaGen, class-conditional ``GPT-*``): model, step, driver, family.

Parameter names and shapes equal the official ``autoregressive/models/gpt.py`` checkpoints
(``c2i_B_256.pt``: 88 tensors), so they load strictly (models.md §2).

**The model is its own step module.** ``Transformer.forward`` is one generation step with every
piece of state explicit, so one fx graph serves the prefill and every decode step::

    forward(tokens [B,S] int64, input_pos [S] int64, attn_mask [S,L] float (0 / -inf),
            k_cache, v_cache [n_layer,B,H,L,hd], token_groups [S] int64)
        -> logits [B,S,V] float32, k_cache_out, v_cache_out

* ``tokens`` live in one id space, so the class condition needs no flag and no second graph:
  ``[0, V)`` image tokens, ``V + c`` class ``c`` (``V + num_classes`` is the null class of CFG),
  and for PAR ``V + num_classes + 1 + j`` its special token ``j``. Each table is a gather; the
  embeddings stay in full precision (method.md §4.5).
* The caches are fixed-size and written with ``index_copy`` at ``input_pos``; ``attn_mask`` holds
  the rows ``input_pos`` of ``attention_mask()``, additive so that no Where node reaches export.
* ``token_groups`` is the STWQ group of each token (``token_groups(input_pos)``); the FP math does
  not read it, quantization passes do.
* Attention is written as matmul -> softmax -> matmul (not SDPA) so passes can see and quantize
  each of them. Teacher forcing (``teacher_forcing``) is the same step over the whole sequence.

Sequence layout: position 0 holds the class token and the logits at position ``p`` predict image
token ``p``; LlamaGen feeds image token ``p - 1`` at position ``p`` (raster order). Faithful to the
official code: the RoPE rows of the class token are zero, so its q and k are zero.

``generate`` is the sampling driver (CFG, top-k/top-p, one torch.Generator per image) shared with
PAR: the family-specific parts (sequence layout, masks, schedule, token order) are model methods.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from frontends import vq16
from frontends.families import Family, register_family
from frontends.generic import ModelBundle, load_checkpoint, step_dynamic_shapes, strict_load
from frontends.sampling import check_probs, filter_top_k_top_p, image_generators, multinomial_rows, on_device

CLS_TOKEN_NUM = 1  # class-conditional models condition on one token


# ---------------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    dim: int
    vocab_size: int = 16384
    num_classes: int = 1000
    grid: int = 16  # image tokens per side: image_size / 16 (the official block_size is grid²)
    multiple_of: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    cfg_scale: float = 2.0  # default guidance of the released checkpoints (GETTING_STARTED.md)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


# Released c2i checkpoints: B and L at 256 px (also 384), XL / XXL / 3B at 384 px (grid 24); the
# official code also defines XXXL, 1B and 7B (no released c2i weights).
CONFIGS = {
    "GPT-B": GPTConfig(n_layer=12, n_head=12, dim=768),
    "GPT-L": GPTConfig(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": GPTConfig(n_layer=36, n_head=20, dim=1280, grid=24, cfg_scale=1.75),
    "GPT-XXL": GPTConfig(n_layer=48, n_head=24, dim=1536, grid=24, cfg_scale=1.75),
    "GPT-XXXL": GPTConfig(n_layer=48, n_head=40, dim=2560, grid=24),
    "GPT-1B": GPTConfig(n_layer=22, n_head=32, dim=2048, grid=24),
    "GPT-3B": GPTConfig(n_layer=24, n_head=32, dim=3200, grid=24, cfg_scale=1.65),  # head_dim 100
    "GPT-7B": GPTConfig(n_layer=32, n_head=32, dim=4096, grid=24),
    "tiny": GPTConfig(n_layer=2, n_head=2, dim=64, vocab_size=64, num_classes=10, grid=4, multiple_of=32),
    # The shipped MNIST model (frontends/embedded/gpt_mnist.pt): 32x32 digits as 8x8 tokens of vq16 "mnist".
    "GPT-mnist": GPTConfig(n_layer=4, n_head=4, dim=96, vocab_size=256, num_classes=10, grid=8, multiple_of=32,
                           cfg_scale=2.0),  # best class accuracy of the samples (MODEL_CARD.md)
}


# ------------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in float32 whatever the model dtype, as the official code
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_2d(grid: int, head_dim: int, base: float) -> torch.Tensor:
    """(cos, sin) of 2-D RoPE per grid cell, raster order: ``[grid², head_dim/2, 2]``.

    The first half of the rotation pairs turns with the row index, the second with the column.
    Created on the CPU explicitly so that a model built on the meta device still gets real values.
    """
    half = head_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half)
    angles = torch.outer(torch.arange(grid, device="cpu").float(), inv_freq)  # [grid, half/2]
    cells = torch.cat([angles[:, None].expand(-1, grid, -1), angles[None].expand(grid, -1, -1)], -1)
    return torch.stack([cells.cos(), cells.sin()], -1).flatten(0, 1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x [B,S,H,hd]`` by ``freqs [S,hd/2,2]``."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[:, None, :, 0], freqs[:, None, :, 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, freqs, attn_mask, k_cache, v_cache, input_pos):
        """``x [B,S,D]``; caches ``[B,H,L,hd]`` -> (output, caches with rows ``input_pos`` written)."""
        q, k, v = self.wqkv(x).unflatten(-1, (3, self.n_head, self.head_dim)).unbind(2)
        q = apply_rope(q, freqs).transpose(1, 2)
        k_cache = k_cache.index_copy(2, input_pos, apply_rope(k, freqs).transpose(1, 2))
        v_cache = v_cache.index_copy(2, input_pos, v.transpose(1, 2))
        scores = q @ k_cache.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)) + attn_mask
        out = F.softmax(scores, dim=-1) @ v_cache
        return self.wo(out.transpose(1, 2).flatten(2)), k_cache, v_cache


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, freqs, attn_mask, k_cache, v_cache, input_pos):
        a, k_cache, v_cache = self.attention(self.attention_norm(x), freqs, attn_mask, k_cache, v_cache, input_pos)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), k_cache, v_cache


class LabelEmbedder(nn.Module):
    """Class embeddings; the last row (index ``num_classes``) is the null class used by CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


# ------------------------------------------------------------------------------------ the model

class Transformer(nn.Module):
    """LlamaGen c2i GPT with the official names; ``forward`` is one step (module docstring)."""

    family = "llamagen"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        rope = rope_2d(cfg.grid, cfg.head_dim, cfg.rope_base)[self.token_order()]
        self.register_buffer("freqs_cis", self.arrange_rope(rope), persistent=False)

    # -- family hooks (PAR overrides these) --

    def token_order(self) -> torch.Tensor:
        """Raster index of the j-th generated image token (LlamaGen: raster order)."""
        return torch.arange(self.config.num_tokens, device="cpu")

    def arrange_rope(self, rope: torch.Tensor) -> torch.Tensor:
        """RoPE rows of every sequence position from the rows of the image tokens."""
        return torch.cat([rope.new_zeros(CLS_TOKEN_NUM, *rope.shape[1:]), rope])

    def sequence_ids(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Step-input ids of the whole teacher-forced sequence: ``[B, seq_len]``."""
        return torch.cat([self.class_ids(labels), tokens], 1)

    def attention_allowed(self) -> torch.Tensor:
        """``[seq_len, seq_len]`` bool: which positions each position may attend to (causal)."""
        return torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril()

    def token_groups(self, input_pos: torch.Tensor) -> torch.Tensor:
        """STWQ group per position: 0 = class token, 1 = image tokens."""
        return input_pos.clamp(max=1)

    def schedule(self) -> list[torch.Tensor]:
        """Positions fed at each generation step: the class token, then one token at a time."""
        return list(torch.arange(self.config.num_tokens).split(1))

    def embedding_tables(self) -> list[nn.Embedding]:
        """Embedding tables in id-space order (module docstring)."""
        return [self.tok_embeddings, self.cls_embedding.embedding_table]

    # -- derived --

    @property
    def seq_len(self) -> int:
        return self.freqs_cis.shape[0]

    def class_ids(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels + self.config.vocab_size).view(-1, 1)

    def to_raster(self, tokens: torch.Tensor) -> torch.Tensor:
        """Generated tokens ``[B, N]`` (model order) -> raster order, as the tokenizer wants."""
        return tokens[:, torch.argsort(self.token_order()).to(tokens.device)]

    def attention_mask(self) -> torch.Tensor:
        """Additive ``[seq_len, seq_len]`` mask (0 / -inf); a step takes its rows ``input_pos``."""
        allowed = self.attention_allowed()
        return torch.zeros(allowed.shape, dtype=self.freqs_cis.dtype).masked_fill(~allowed, float("-inf"))

    def empty_cache(self, batch: int, length: int | None = None,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        length = self.seq_len if length is None else length
        shape = (self.config.n_layer, batch, self.config.n_head, length, self.config.head_dim)
        dtype = self.output.weight.dtype
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Look ``ids`` up in the table their range selects; every table is read (no branches)."""
        tables = self.embedding_tables()
        h, start = tables[0](ids.clamp(max=tables[0].num_embeddings - 1)), tables[0].num_embeddings
        for table in tables[1:]:
            rows = table((ids - start).clamp(0, table.num_embeddings - 1))
            h = torch.where((ids >= start).unsqueeze(-1), rows, h)
            start += table.num_embeddings
        return h

    # -- compute --

    def forward(self, tokens, input_pos, attn_mask, k_cache, v_cache, token_groups):
        """One generation step (module docstring). ``token_groups`` is for quantization passes."""
        h = self.embed(tokens)
        freqs = self.freqs_cis[input_pos]
        k_out, v_out = [], []
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, freqs, attn_mask, k_cache[i], v_cache[i], input_pos)
            k_out.append(k)
            v_out.append(v)
        return self.output(self.norm(h)).float(), torch.stack(k_out), torch.stack(v_out)

    def teacher_forcing(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits of every position of the sequence of ``tokens [B, N]`` (model order) in one step."""
        ids = self.sequence_ids(tokens, labels)
        pos = torch.arange(ids.shape[1])
        k, v = self.empty_cache(ids.shape[0], ids.shape[1])
        mask = self.attention_mask()[: ids.shape[1], : ids.shape[1]]
        return self(ids, pos, mask, k, v, self.token_groups(pos))[0]


LlamaGenStep = Transformer  # the traced step module is the model itself (module docstring)


# ------------------------------------------------------------------------------------ sampling

def sample(logits: torch.Tensor, generators: list[torch.Generator], temperature: float, top_k: int,
           top_p: float, bad: list | None = None) -> torch.Tensor:
    """One token per position: ``logits [B,S,V]`` -> ``[B,S]``, image b drawn from ``generators[b]``
    (``bad``: see ``multinomial_rows``)."""
    probs = F.softmax(filter_top_k_top_p(logits / max(temperature, 1e-5), top_k, top_p, rule="hf"), dim=-1)
    return multinomial_rows(probs, generators, bad=bad)


@torch.no_grad()
def generate(model: Transformer, labels, *, cfg_scale: float, top_k: int = 0, top_p: float = 1.0,
             temperature: float = 1.0, seed: int = 0, step: Callable | None = None) -> torch.Tensor:
    """Sample image tokens ``[B, N]`` in raster order for class ``labels``, as the official driver.

    With ``cfg_scale > 1`` the batch is doubled with the null class and the logits mixed as
    ``uncond + (cond - uncond) * cfg_scale``; both halves are fed the same sampled tokens.
    ``step`` is any callable with ``model.forward``'s signature (a traced or quantized graph,
    an onnxruntime session wrapper); the model's own forward by default.
    """
    step = model if step is None else step
    device = model.output.weight.device  # a model moved to a GPU samples there, as VAR's driver
    labels = torch.as_tensor(labels, dtype=torch.long).view(-1).to(device)
    batch, guided = labels.shape[0], cfg_scale > 1.0
    cond = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if guided else labels
    generators = image_generators(seed, batch, device)  # per image: independent of the batch
    tokens = torch.zeros(cond.shape[0], model.config.num_tokens, dtype=torch.long, device=device)
    k_cache, v_cache = model.empty_cache(cond.shape[0], device=device)
    # every step's positions and mask rows reach the device at once, and the draws' checks are read at the end:
    # no host sync between steps, so the GPU is never left waiting for the next step's launches
    schedule = model.schedule()
    order, sizes = torch.cat(schedule), [len(p) for p in schedule]
    steps = zip(order.to(device).split(sizes), model.attention_mask()[order].to(device).split(sizes))
    bad = []
    for pos, mask in steps:
        ids = model.sequence_ids(tokens, cond)[:, pos]
        logits, k_cache, v_cache = step(*on_device(device, ids, pos, mask, k_cache, v_cache, model.token_groups(pos)))
        if guided:
            c, u = logits.chunk(2)
            logits = u + (c - u) * cfg_scale
        new = sample(logits, generators, temperature, top_k, top_p, bad=bad)
        tokens[:, pos] = new.repeat(2, 1) if guided else new
    check_probs(bad)
    return model.to_raster(tokens[:batch])


# ------------------------------------------------------------------------- checkpoints & family

def unwrap_state_dict(obj: dict) -> dict:
    """The weights of an official checkpoint: under ``model`` (DDP) / ``module`` / ``state_dict``,
    or the dict itself (FSDP). Runtime-only entries (``freqs_cis``, ``*.kv_cache.*``) are dropped."""
    for key in ("model", "module", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if k != "freqs_cis" and ".kv_cache." not in k}


def base_config(state_dict: dict) -> str | None:
    """Name of the GPT size whose (layers, width) the weights have; None if not a LlamaGen layout."""
    tok = state_dict.get("tok_embeddings.weight")
    if tok is None or "cls_embedding.embedding_table.weight" not in state_dict:
        return None
    n_layer = sum(1 for k in state_dict if k.endswith(".attention.wqkv.weight"))
    return next((name for name, c in CONFIGS.items() if (c.n_layer, c.dim) == (n_layer, tok.shape[1])), None)


def detect(state_dict: dict) -> str | None:
    """LlamaGen config name; None for other families (PAR checkpoints carry ``spe_tok_embeddings``)."""
    weights = unwrap_state_dict(state_dict)
    if any(k.startswith("spe_tok_embeddings.") for k in weights):
        return None
    return base_config(weights)


def checkpoint_config(cfg: GPTConfig, weights: dict, path: Path | None, image_size: int | None) -> GPTConfig:
    """``cfg`` with the vocabulary and classes of the weights and the image size.

    The image size does not show in the weights: take ``image_size``, else a 256/384/512 in the
    file name (``c2i_B_384.pt``), else the config's default (the released checkpoint's).
    """
    if image_size is None and path is not None:
        found = re.search(r"(?<!\d)(256|384|512)(?!\d)", Path(path).stem)
        image_size = int(found.group(1)) if found else None
    grid = cfg.grid if image_size is None else image_size // vq16.VQConfig().downsample
    return replace(cfg, grid=grid, vocab_size=weights["tok_embeddings.weight"].shape[0],
                   num_classes=weights["cls_embedding.embedding_table.weight"].shape[0] - 1)


def load_tokenizer(path: str | Path, vocab_size: int) -> vq16.VQModel:
    """The VQ tokenizer of ``path`` (official layout, weights under ``model``), strictly loaded."""
    weights = unwrap_state_dict(load_checkpoint(path))
    name = vq16.detect_vq(weights)
    if name is None:
        raise UserError(f"{path} is not a LlamaGen VQ tokenizer (no encoder.conv_in / quantize.embedding of a known width)")
    vq = vq16.VQModel(vq16.vq_config(name, weights))
    strict_load(vq, weights, str(path))
    if vq.config.codebook_size != vocab_size:
        raise UserError(f"tokenizer {path} has {vq.config.codebook_size} codes but the model predicts {vocab_size} tokens")
    return vq.float().eval()


def example_step(model: Transformer, seed: int = 0) -> tuple:
    """Inputs of a decode step at batch 2 (one image + its CFG twin) after a filled prefix.

    The step is the first one of full width after the prefill (PAR: its parallel steps), and
    the cache holds the prefix the model itself wrote.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([int(torch.randint(model.config.num_classes, (1,), generator=g)), model.config.num_classes])
    ids = model.sequence_ids(torch.randint(model.config.vocab_size, (2, model.config.num_tokens), generator=g), labels)
    steps = model.schedule()
    pos = next(p for p in steps[1:] if len(p) == max(len(s) for s in steps))
    prefix = torch.arange(int(pos[0]))
    mask = model.attention_mask()
    k, v = model.empty_cache(2)
    with torch.no_grad():
        _, k, v = model(ids[:, prefix], prefix, mask[prefix], k, v, model.token_groups(prefix))
    return ids[:, pos], pos, mask[pos], k, v, model.token_groups(pos)


INPUT_NAMES = ["tokens", "input_pos", "attn_mask", "k_cache", "v_cache", "token_groups"]
# Distinct from the input names: an ONNX graph cannot have an input and an output of one name.
OUTPUT_NAMES = ["logits", "k_cache_out", "v_cache_out"]


def build_family(model_cls: type[Transformer], configs: dict, state_dict: dict, path: Path | None = None,
                 config: str | None = None, tokenizer: str | Path | None = None, *, image_size: int | None = None,
                 cfg_scale: float | None = None, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                 **_other_families_options) -> ModelBundle:
    """ModelBundle of a checkpoint of ``model_cls``'s family, strictly loaded in float32.

    Sampling options are bound into ``extra["generate"]``; the defaults are the official FID
    settings (top-k 0, top-p 1, temperature 1) with the config's guidance scale.
    """
    weights = unwrap_state_dict(state_dict)
    what = str(path) if path is not None else "the checkpoint"
    if config not in configs:
        raise UserError(f"cannot tell which {model_cls.family} config {what} is (known: {', '.join(configs)})")
    cfg = checkpoint_config(configs[config], weights, path, image_size)
    with torch.device("meta"):  # no init of weights that the checkpoint replaces
        model = model_cls(cfg)
    strict_load(model, weights, what)
    model = model.float().eval().requires_grad_(False)
    vq = load_tokenizer(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    scale = cfg.cfg_scale if cfg_scale is None else cfg_scale

    def generate_tokens(labels, seed: int = 0, step: Callable | None = None) -> torch.Tensor:
        return generate(model, labels, cfg_scale=scale, top_k=top_k, top_p=top_p, temperature=temperature,
                        seed=seed, step=step)

    name = Path(path).stem if path is not None else f"{model_cls.family}-{config}"
    example = example_step(model)
    # LlamaGen steps all have one token (static); PAR's have 1 or n, and its example has n.
    dims = step_dynamic_shapes(INPUT_NAMES, model.seq_len, tokens=example[0].shape[1] > 1)
    return ModelBundle(name, module=model, example_inputs=example, family=model_cls.family,
                       input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), calib_inputs=[],
                       extra={"model": model, "tokenizer": vq, "generate": generate_tokens, "group_maps": {},
                              "default_exclude": [],  # no per-image linears are sites (passes/exclude.py)
                              "dynamic_shapes": dims})


build = partial(build_family, Transformer, CONFIGS)

register_family(Family("llamagen", detect, build))
