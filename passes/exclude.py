"""``exclude``: keep chosen quantization sites in full precision.

A pattern is either a **module-path glob** matched with ``fnmatch`` (case-sensitive) against
the site names that ``canonicalize`` registers (``blocks.3.attn.mat_qkv``, ``head``,
``blocks.3.attn.matmul1``), e.g. ``blocks.*.ada_lin.1``, ``head``, ``blocks.0.*``; or an
**op-type selector** ``op:linear`` / ``op:matmul`` that matches every site of that kind.
Patterns name torch module paths, never ONNX node names (those do not exist yet).

The pass runs right after ``canonicalize`` (``tools.compile`` inserts it there when patterns
exist). It sets ``site.excluded_by`` to the first pattern that matches a site; the
quantization passes (``act-quant``, ``weight-quant``, ``stwq``) skip such sites and the
folding passes skip regions whose sinks are all excluded, so ``insert-qdq`` puts no Q/DQ on
them. Decisions an earlier pass already made for an excluded site are dropped.

Patterns come from ``ctx.config.exclude`` plus the pass option
``patterns`` (``exclude{patterns=[head;op:matmul]}``). Each pattern's matches go to the pass
stats and ``ctx.notes``; a pattern that matches nothing is a ``UserError`` (a silent no-op is
the most common complaint about exclusion lists), with the nearest site names as a hint.

Family defaults (``ModelBundle.extra['default_exclude']``, applied by ``tools.compile`` unless
``--no-default-exclude``): the condition / AdaLN linears that see **one token per image**,
VAR ``blocks.*.ada_lin.1`` + ``head_nm.ada_lin.1`` and RAR ``blocks.*.adaLN_modulation.1`` +
``adaln_before_head.adaLN_modulation.1`` (all are sites in the traced step graphs). Their GEMM
has M = batch rows, so INT8 gives no speedup and is fragile: ``torch._int_mm`` refuses
M <= 16 (reference/users.md, common errors) and tiny-M INT8 kernels are slower than FP16
(sglang PR#38040). Method.md §4.5 already keeps the AdaLN gating multiplies, norms and
embeddings in full precision (embeddings are never sites); keeping the modulation linears
that feed them in float as well costs nothing measurable. The reference code (method.md §6)
does quantize them (VAR ``ada_lin`` per-tensor, RAR ``adaLN_modulation`` token-aware):
``--no-default-exclude`` reproduces that. LlamaGen and PAR feed the class as a token, so they
have no such linear and an empty default list. A default that matches nothing in a variant
is skipped, not an error.
"""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping

from core.errors import UserError
from passes.infra import Pass, PassContext, PassResult, Site, format_pipeline, parse_pipeline, register

OP_KINDS = ("linear", "matmul")
_SHOWN = 8  # site names listed per pattern in notes and messages


def _names(names: list[str], limit: int = _SHOWN) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def pattern_matches(pattern: str, site: Site) -> bool:
    """True when ``pattern`` (glob on the module path, or ``op:<kind>``) selects ``site``."""
    if pattern.startswith("op:"):
        return site.kind == pattern[3:]
    return fnmatch.fnmatchcase(site.name, pattern)


def _check_pattern(pattern: str) -> None:
    if not isinstance(pattern, str) or not pattern.strip():
        raise UserError(f"exclude: empty pattern {pattern!r}")
    if pattern.startswith("op:") and pattern[3:] not in OP_KINDS:
        raise UserError(f"exclude: unknown op type in {pattern!r}; use one of {', '.join('op:' + k for k in OP_KINDS)}")


def _hint(pattern: str, sites: Mapping[str, Site]) -> str:
    names = list(sites)
    if not names:
        return "the graph has no quantization sites (does the pipeline run 'canonicalize' first?)"
    if not pattern.startswith("op:") and any(fnmatch.fnmatchcase(n, pattern + ".*") for n in names):
        return f"{pattern!r} is a module, not a site: use {pattern + '.*'!r} to exclude everything in it"
    close = difflib.get_close_matches(pattern, names, n=4, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(close)}? (sites are named by module path, e.g. {_names(names, 4)})"
    return f"sites are named by module path: {_names(names, 6)}"


def match_patterns(patterns: Iterable[str], sites: Mapping[str, Site], *, strict: bool = True) -> dict[str, list[str]]:
    """``{pattern: [site names it selects]}`` in site order, for every pattern (duplicates once).

    With ``strict`` a pattern that selects nothing raises a ``UserError`` naming the pattern and
    giving a hint; otherwise it maps to ``[]``. This is the one matching function: the pass uses
    it and ``tools.compile`` uses it to print the match table before calibrating.
    """
    result: dict[str, list[str]] = {}
    for pattern in patterns:
        _check_pattern(pattern)
        if pattern in result:
            continue
        result[pattern] = [name for name, site in sites.items() if pattern_matches(pattern, site)]
        if strict and not result[pattern]:
            raise UserError(f"exclude pattern {pattern!r} matches no quantization site; {_hint(pattern, sites)}")
    return result


def describe_matches(matches: Mapping[str, list[str]]) -> list[str]:
    """One line per pattern: ``exclude 'blocks.*.ada_lin.1' matched 16 sites: blocks.0.ada_lin.1, ...``."""
    return [f"exclude {p!r} matched {len(m)} site{'' if len(m) == 1 else 's'}: {_names(m) if m else '-'}"
            for p, m in matches.items()]


def with_exclude_pass(pipeline: str) -> str:
    """``pipeline`` with an ``exclude`` pass right after ``canonicalize`` if it has none.

    A pipeline without ``canonicalize`` has no sites to exclude and is returned unchanged.
    """
    passes = parse_pipeline(pipeline)
    names = [p.name for p in passes]
    if "exclude" in names or "canonicalize" not in names:
        return pipeline
    passes.insert(names.index("canonicalize") + 1, Exclude())
    return format_pipeline(passes)


@register
class Exclude(Pass):
    name = "exclude"
    preserves_numerics = True  # it only marks sites
    patterns: tuple = ()

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        patterns = [*ctx.config.exclude, *self.patterns]
        matches = match_patterns(patterns, ctx.sites)
        dropped = 0
        for name, site in ctx.sites.items():
            first = next((p for p, m in matches.items() if name in m), None)
            if first is None:
                continue
            if site.excluded_by is None:
                site.excluded_by = first
            for role in ("input", "weight", "a", "b"):  # decisions made before this pass
                dropped += ctx.qparams.pop(f"{name}.{role}", None) is not None
        ctx.notes.extend(describe_matches(matches))
        excluded = sorted(n for n, s in ctx.sites.items() if s.excluded_by)
        stats = {"excluded": len(excluded), "matches": {p: m for p, m in matches.items()}}
        if dropped:
            stats["dropped_qparams"] = dropped
        return PassResult(gm, False, stats)
