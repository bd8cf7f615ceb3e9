"""The generic frontend: any traceable ``nn.Module`` (+ example inputs) or a ``.pt2`` program.

``load_model(spec)`` accepts:

* ``builtin:<name>``: a built-in example model (``frontends/examples.py``);
* ``path/to/file.py:factory`` or ``package.module:factory``: ``factory()`` returns a
  ``ModelBundle``, a ``(module, example_inputs)`` pair, or a module with an
  ``example_inputs`` attribute;
* ``model.pt2``: a ``torch.export`` program (``torch.export.save``);
* ``.pt``/``.pth``/``.bin`` checkpoints: read with ``weights_only=True``. A pickled whole
  module is refused unless ``allow_pickle`` (``--allow-pickle``): unpickling runs code.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import pickle
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from core.errors import UserError
from core.numerics import tensor_outputs

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass
class ModelBundle:
    """Everything the compiler needs from a frontend."""

    name: str
    module: torch.nn.Module
    example_inputs: tuple
    family: str = "generic"
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    calib_inputs: list[tuple] = field(default_factory=list)
    graph: fx.GraphModule | None = None  # already traced (a .pt2 program)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.input_names is None:
            self.input_names = _forward_arg_names(self.module, len(self.example_inputs))


# Which axes of the family step inputs vary (see each family's step module): batch leads the
# token and condition inputs and is axis 1 of the [depth, B, heads, L, head_dim] caches;
# the step's token count leads positions, masks and token groups.
_BATCH_TOKENS = {"x", "tokens", "input_ids"}
_BATCH = {"cond", "condition", "text", "text_bias"}  # text: Infinity's padded memory
_TOKENS = {"positions", "input_pos", "token_groups", "attn_bias", "attn_mask", "rope"}


def step_dynamic_shapes(input_names: list[str], max_tokens: int, *, tokens: bool = True) -> tuple:
    """torch.export dims of a family step: batch always, the token count if ``tokens``.

    One exported graph then serves every batch size and (with ``tokens``) every step. torch.export
    specialises a dimension whose example size is 1, so ``tokens`` needs an example with at
    least 2 tokens (a family whose steps all have one token passes ``tokens=False``).
    """
    batch = torch.export.Dim("batch", min=1, max=4096)
    tok = torch.export.Dim("tokens", min=1, max=max_tokens) if tokens else None
    spec = []
    for name in input_names:
        if "cache" in name:
            spec.append({1: batch})
        elif name in _BATCH_TOKENS:
            spec.append({0: batch, 1: tok} if tok else {0: batch})
        elif name in _BATCH:
            spec.append({0: batch})
        elif name in _TOKENS:
            spec.append({0: tok} if tok else None)
        else:
            raise ValueError(f"no dynamic-axis rule for step input {name!r}")
    return tuple(spec)


def widen_batch(inputs: tuple, input_names: list[str], batch: int) -> tuple:
    """The step inputs with their batch axis grown to ``batch`` rows (rows repeated cyclically).

    An export example whose batch equals its token count (RAR's prefill: 2 and 2) lets the
    exporter tie the two dims together, and the graph then fails on any other shape: measured
    as a 5.3 logit error at decode. Exporting from a batch that matches no other size avoids it.
    """
    out = []
    for name, t in zip(input_names, inputs, strict=True):
        axis = 1 if "cache" in name else 0 if name in _BATCH_TOKENS | _BATCH else None
        if axis is None:
            out.append(t)
        else:
            idx = torch.arange(batch) % t.shape[axis]
            out.append(t.index_select(axis, idx))
    return tuple(out)


def _forward_arg_names(module: torch.nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params][:n]
    except (TypeError, ValueError):
        names = []
    return names + [f"input_{i}" for i in range(len(names), n)]


def _as_bundle(obj: Any, name: str) -> ModelBundle:
    if isinstance(obj, ModelBundle):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], torch.nn.Module):
        module, inputs = obj
    elif isinstance(obj, torch.nn.Module) and hasattr(obj, "example_inputs"):
        module, inputs = obj, obj.example_inputs
    else:
        raise UserError(f"{name} must return a ModelBundle, a (module, example_inputs) pair, "
                        f"or a module with an example_inputs attribute; got {type(obj).__name__}")
    inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    return ModelBundle(name, module.eval(), inputs)


def _load_factory(spec: str) -> ModelBundle:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise UserError(f"model file not found: {path}")
        mod_name = f"_arvgq_user_{path.stem}"
        loader = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[mod_name] = module
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise UserError(f"cannot import {target!r} for model {spec!r}: {e}") from None
    if not hasattr(module, attr):
        raise UserError(f"{target} has no attribute {attr!r}")
    return _as_bundle(getattr(module, attr)(), spec)


def _listed(keys, limit: int = 10) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def state_dict_problems(module: torch.nn.Module, state_dict: dict) -> list[str]:
    """Missing, unexpected and mis-shaped keys of ``state_dict`` against ``module`` (works on meta modules)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in state_dict if k not in expected or k not in given]
    wrong = [f"{k} {given[k]} (expected {s})" for k, s in expected.items() if k in given and given[k] != s]
    named = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
    return [f"{label}: {_listed(keys)}" for label, keys in named if keys]


def strict_load(module: torch.nn.Module, state_dict: dict, what: str) -> torch.nn.Module:
    """``load_state_dict(strict=True, assign=True)`` with one UserError line listing every mismatch.

    ``assign`` lets a family build its model on the meta device and adopt the checkpoint's
    tensors, so a billion-parameter model is neither initialised nor copied.
    """
    problems = state_dict_problems(module, state_dict)
    if problems:
        raise UserError(f"{what} does not load strictly into {type(module).__name__}: {'; '.join(problems)}")
    check_finite(state_dict, what, parameters={name for name, _ in module.named_parameters()})
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module


def check_finite(tensors: dict, what: str, parameters: set[str] | None = None) -> None:
    """A NaN in any floating-point tensor of ``tensors``, or an Inf in one of its ``parameters`` (None: all),
    is a UserError naming the tensor, raised before any work. Buffers may hold infinities by design
    (attention masks of -inf); a weight may not."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.is_meta:
            continue
        bad = t.isnan() if parameters is not None and name not in parameters else ~torch.isfinite(t)
        if bool(bad.any()):
            values = t[bad]
            kinds = " and ".join(k for k, has in (("NaN", bool(values.isnan().any())), ("Inf", bool(values.isinf().any())))
                                 if has)
            raise UserError(f"{what}: tensor {name} holds {kinds} ({int(values.numel())} of {t.numel()} values); "
                            f"the checkpoint is damaged or was saved from a diverged run")


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` and errors a user can act on."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(e), re.IGNORECASE)
        if blocked:  # refused before anything ran: say what it would run, not that the file is damaged
            raise UserError(f"{path} holds pickled Python objects (it refers to {blocked.group(1)}; a whole module?), "
                            f"which were not loaded: loading them runs code from the file. Only if you trust it, "
                            f"pass --allow-pickle") from None
        raise UserError(f"cannot read {path}: corrupt or not a PyTorch checkpoint") from e
    except Exception as e:  # a damaged file fails deep inside the unpickler with any error type
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read {path}: corrupt or not a PyTorch checkpoint ({first})") from e


def _load_pt2(path: Path) -> ModelBundle:
    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # torch.export.load raises many types for bad archives
        raise UserError(f"cannot read {path}: not a torch.export program ({str(e).splitlines()[0]})") from None
    if ep.example_inputs is None:
        raise UserError(f"{path} was saved without example inputs; re-export it with torch.export.export(model, args)")
    args, _ = ep.example_inputs
    check_finite({**ep.state_dict, **ep.constants}, str(path), parameters=set(ep.graph_signature.parameters))
    gm = ep.module()
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    return ModelBundle(path.stem, gm, tuple(args), input_names=names, graph=gm)


def load_model(spec: str, *, allow_pickle: bool = False, family: str | None = None,
               tokenizer: str | None = None, **family_options: Any) -> ModelBundle:
    """Resolve a model argument of the command line into a ModelBundle (see module docstring).

    ``family`` overrides detection from a checkpoint's keys; ``tokenizer`` is the family's
    tokenizer checkpoint (VAR's VQVAE, LlamaGen's VQ-16, RAR's MaskGIT-VQ). ``family_options`` that
    are not None go to the family's builder (Infinity: ``text_encoder``, ``prompts``).
    """
    family_options = {k: v for k, v in family_options.items() if v is not None}
    if (family or tokenizer or family_options) and Path(spec).suffix not in CHECKPOINT_SUFFIXES:
        raise UserError("--family, --tokenizer, --text-encoder and --prompts apply to model checkpoints (.pt/.pth/.bin/.ckpt)")
    if spec.startswith("builtin:"):
        from frontends import examples

        return examples.load(spec.split(":", 1)[1])
    path = Path(spec)
    if path.suffix == ".pt2":
        if not path.exists():
            raise UserError(f"file not found: {path}")
        if not allow_pickle:  # torch.export.load unpickles parts of the archive: it can run code
            raise UserError(f"{path}: torch.export programs are loaded with pickle, which can run code from the "
                            f"file; pass --allow-pickle if you trust it")
        return _load_pt2(path)
    if path.suffix in CHECKPOINT_SUFFIXES:
        obj = load_checkpoint(path, allow_pickle=allow_pickle)
        if isinstance(obj, torch.nn.Module):
            check_finite(obj.state_dict(), str(path), parameters={name for name, _ in obj.named_parameters()})
            return _as_bundle(obj, str(path))
        if isinstance(obj, dict):
            from frontends import families

            return families.bundle_from_state_dict(obj, path, family, **({"tokenizer": tokenizer} if tokenizer else {}),
                                                 **family_options)
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict or module")
    if ":" in spec:
        return _load_factory(spec)
    raise UserError(f"cannot tell what {spec!r} is: give a checkpoint (.pt/.pth/.bin), a .pt2 program, "
                    f"builtin:<name>, or file.py:factory")


def _user_frame(tb) -> str:
    frames = [f for f in traceback.extract_tb(tb) if "/torch/" not in f.filename and "/frontends/generic.py" not in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({f.line})"


def trace(bundle: ModelBundle) -> fx.GraphModule:
    """Trace the bundle's module to a GraphModule, checked against eager on the example inputs."""
    if bundle.graph is not None:
        return copy.deepcopy(bundle.graph)
    # Passes rewrite parameters in place: trace a copy so the user's module stays intact.
    module = copy.deepcopy(bundle.module).eval()
    tracer = fx.Tracer()
    try:
        graph = tracer.trace(module)
    except Exception as e:
        stack = list(getattr(tracer, "module_stack", {}) or {})
        where = stack[-1] if stack and stack[-1] else type(module).__name__
        raise UserError(
            f"cannot trace module '{where}' at {_user_frame(e.__traceback__)}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Fix: make control flow independent of tensor values "
            f"(or move it out of forward), or export with torch.export and pass the .pt2") from None
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    # The example inputs live on the CPU; a driver may have moved the model to a GPU before tracing.
    device = next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))
    inputs = torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t,
                                          bundle.example_inputs)
    with torch.no_grad():
        try:
            ref, got = module(*inputs), gm(*inputs)
        except Exception as e:
            raise UserError(f"the traced graph of {bundle.name} fails on the example inputs: {type(e).__name__}: {e}") from None
    ref_l, got_l = tensor_outputs(ref), tensor_outputs(got)
    if len(ref_l) != len(got_l) or any(not torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ref_l, got_l)):
        raise UserError(f"the traced graph of {bundle.name} differs from eager on the example inputs: "
                        f"forward() has code that tracing froze (data-dependent branches?)")
    return gm
