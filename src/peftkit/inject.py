"""Finding the layers an adapter targets and swapping modules in place.

Matching rules (the same as HF PEFT's, so one `adapter_config.json` means the same thing in both):
- a list of names matches a module whose full dotted name equals a name or ends with "." + name
  (never a bare substring: "proj" does not match "q_proj");
- a single string is a regex that must match the whole module name;
- "all-linear" is every linear layer (nn.Linear, GPT-2 Conv1D) except the model's output head.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .errors import TargetError
from .methods.lora_config import ALL_LINEAR, LoraConfig
from .methods.lora_kinds import GPT2_CONV1D, LINEAR, SUPPORTED_TYPES, LayerKind, kind_of, unsupported_reason

# Names of the attributes our wrappers use for what they wrap (PEFT's names, so bias keys line up).
WRAPPED_ATTRS = ("base_layer", "original_module")


@dataclass(frozen=True)
class Target:
    """One layer an adapter will sit on."""

    name: str  # full dotted module name in the plain (unwrapped) model
    module: nn.Module  # the plain layer (a wrapper's base layer if already wrapped)
    kind: LayerKind


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module of the plain model: wrappers are seen through, and the
    adapter parts inside them (factors, saved copies) are skipped."""
    yield from _walk(model, "")


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        inner = unwrap(child)
        yield name, inner
        yield from _walk(inner, f"{name}.")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside an adapter wrapper (or the module itself)."""
    while getattr(module, "is_adapter_wrapper", False):
        module = next(module._modules[a] for a in WRAPPED_ATTRS if a in module._modules)
    return module


def name_matches(name: str, spec: tuple[str, ...] | str) -> bool:
    """Whether module `name` matches a target spec (list: exact or dotted suffix; str: full regex)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    """The layer number in a module name: after a `layers_pattern` component if given, else the last
    numeric component that has a parent and a child (as PEFT reads `layers_to_transform`)."""
    parts = name.split(".")
    if layers_pattern:
        for i in range(len(parts) - 1, 0, -1):
            if parts[i].isdigit() and parts[i - 1] in layers_pattern and i < len(parts) - 1:
                return int(parts[i])
        return None
    for i in range(len(parts) - 2, 1, -1):
        if parts[i].isdigit():
            return int(parts[i])
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    """The module producing the model's output logits, which "all-linear" leaves alone."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return unwrap(head) if head is not None else None


def find_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The layers `config` targets, in model order. Raises TargetError if none match or a matched
    layer has a type LoRA cannot adapt."""
    head = output_head(model)
    saved_names = [n for n, _ in find_modules_to_save(model, config.modules_to_save, strict=False)]
    targets: list[Target] = []
    adaptable: set[str] = set()
    for name, module in base_modules(model):
        kind = kind_of(module)
        if kind is not None:
            adaptable.add(name.rsplit(".", 1)[-1])
        if config.target_modules == ALL_LINEAR:
            if kind not in (LINEAR, GPT2_CONV1D) or module is head or _inside(name, saved_names):
                continue
        elif not name_matches(name, config.target_modules):
            continue
        if config.exclude_modules is not None and name_matches(name, config.exclude_modules):
            continue
        layers = config.layers_to_transform
        if layers is not None and layer_index(name, config.layers_pattern) not in layers:
            continue
        if kind is None:
            raise TargetError(
                f"target {name!r} is a {type(module).__name__}, which LoRA cannot adapt; "
                f"supported layer types: {SUPPORTED_TYPES}. Target its linear sub-layers instead."
            )
        reason = unsupported_reason(module)
        if reason:
            raise TargetError(f"target {name!r} ({type(module).__name__}): {reason}")
        targets.append(Target(name, module, kind))
    if not targets:
        raise TargetError(
            f"target_modules={_show(config.target_modules)} matched no layer of {type(model).__name__}"
            f"{_filters(config)}; layers that could be adapted end in: {', '.join(sorted(adaptable)) or 'none'}"
        )
    for t in targets:
        if _inside(t.name, saved_names):
            raise TargetError(
                f"{t.name!r} is both a LoRA target and (inside) a modules_to_save entry; choose one"
            )
    return targets


def find_modules_to_save(
    model: nn.Module, names: tuple[str, ...] | None, *, strict: bool = True
) -> list[tuple[str, nn.Module]]:
    """The modules `modules_to_save` names (dotted-suffix match). With `strict`, each name must match
    something; files from HF PEFT list both "classifier" and "score" for any classification model, so
    loading is lenient."""
    if not names:
        return []
    found = [(n, m) for n, m in base_modules(model) if name_matches(n, names)]
    missing = [t for t in names if not any(name_matches(n, (t,)) for n, _ in found)]
    if missing and strict:
        raise TargetError(f"modules_to_save entry {missing[0]!r} matches no module of {type(model).__name__}")
    # A match inside another match (e.g. "classifier" and "classifier.dense") keeps only the outer one.
    outer = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
    return outer


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module currently at dotted path `name` (a wrapper if one sits there)."""
    module = model
    for part in name.split("."):
        children = unwrap(module)._modules
        if part not in children:
            raise TargetError(f"{type(model).__name__} has no module {name!r}")
        module = children[part]
    return module


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` (through any wrappers on the way)."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    setattr(unwrap(parent), child, new)


def _inside(name: str, outer_names: list[str]) -> bool:
    return any(name == o or name.startswith(o + ".") for o in outer_names)


def _show(spec: tuple[str, ...] | str) -> str:
    return repr(spec) if isinstance(spec, str) else repr(list(spec))


def _filters(config: LoraConfig) -> str:
    parts = []
    if config.exclude_modules is not None:
        parts.append(f"exclude_modules={_show(config.exclude_modules)}")
    if config.layers_to_transform is not None:
        parts.append(f"layers_to_transform={list(config.layers_to_transform)}")
    return f" (with {', '.join(parts)})" if parts else ""
