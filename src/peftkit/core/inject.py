"""Finding the layers an adapter targets and swapping modules in place.

Matching rules (the same as HF PEFT's, so one `adapter_config.json` means the same thing in both):
- a list of names matches a module whose full dotted name equals a name or ends with "." + name
  (never a bare substring: "proj" does not match "q_proj");
- a single string is a regex that must match the whole module name, except that a plain name (no
  regex syntax) that matches no whole name but is a dotted suffix, like "q_proj", is read as the
  list ["q_proj"] (a saved adapter_config.json lists the matched layers, so it means the same in PEFT);
- "all-linear" is every linear layer (nn.Linear, GPT-2 Conv1D) except the model's output head.

A new adapter (`strict=True`) is also held to what it asks for: every list entry must match a
module, and a rank above a layer's smaller dimension is warned about. Loading a saved adapter stays
as lenient as PEFT, whose files may list names for several architectures.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from torch import nn

from ..errors import TargetError, did_you_mean
from ..methods.spec import MethodSpec
from ..methods.targets import Targets
from .layer_types import ALL_LINEAR, WRAPPED_ATTRS, is_linear, unwrap  # noqa: F401 (WRAPPED_ATTRS: its old home)


@dataclass(frozen=True)
class Target:
    """One layer an adapter will sit on."""

    name: str  # full dotted module name in the plain (unwrapped) model
    module: nn.Module  # the plain layer (a wrapper's base layer if already wrapped)
    kind: Any  # what the method knows about this layer type (e.g. LoRA's LayerKind)


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


def name_matches(name: str, spec: tuple[str, ...] | str) -> bool:
    """Whether module `name` matches a target spec (list: exact or dotted suffix; str: full regex)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    parts = name.split(".")  # t matches when it is one of name's dotted suffixes, name itself included
    return not _name_set(tuple(spec)).isdisjoint(".".join(parts[i:]) for i in range(len(parts)))


@lru_cache(maxsize=256)
def _name_set(spec: tuple[str, ...]) -> frozenset[str]:
    # Saved configs list every adapted module (hundreds): a set makes each match a few lookups.
    return frozenset(spec)


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


def find_targets(
    model: nn.Module, config: Any, spec: MethodSpec | None = None, *, strict: bool = False
) -> list[Target]:
    """The layers `config` targets, in model order. Raises TargetError if none match or a matched
    layer has a type the method cannot wrap. With `strict` (a new adapter, not a loaded file), a
    target_modules or exclude_modules entry that matches no module is an error too, and the method
    may warn about what it was asked (e.g. LoRA ranks above a layer's smaller dimension).
    `spec` defaults to the method whose config `config` is."""
    if spec is None:
        from ..methods import method_for

        spec = method_for(config)
    head = output_head(model)
    modules = list(base_modules(model))
    names = [n for n, _ in modules]
    wanted: Targets = config.targets  # a layer method's config embeds its target fields as one value
    saved_names = [n for n, _ in find_modules_to_save(model, wanted.modules_to_save, strict=False)]
    target_spec = resolve_spec(wanted.target_modules, names)
    targets: list[Target] = []
    for name, module in modules:
        if target_spec == ALL_LINEAR:
            if not is_linear(module) or module is head or _inside(name, saved_names):
                continue
        elif not name_matches(name, target_spec):
            continue
        if _filtered_out(name, wanted):
            continue
        targets.append(Target(name, module, _wrappable_kind(name, module, spec)))
    if not targets:
        raise TargetError(_nothing_matched(model, wanted, spec, modules))
    for t in targets:
        if _inside(t.name, saved_names):
            raise TargetError(
                f"{t.name!r} is both a {spec.name} target and (inside) a modules_to_save entry; choose one"
            )
    if strict:
        _check_entries_used(model, wanted, names)
        spec.check_new_targets(config, targets)
    return targets


def resolve_spec(spec: tuple[str, ...] | str, names: list[str]) -> tuple[str, ...] | str:
    """`spec` as matching uses it: a plain name such as "q_proj" that matches no whole module name as
    a regex, but is a dotted suffix of some, becomes ("q_proj",) (what `--lora.target_modules q_proj`
    means); every other spec is returned as it is."""
    if isinstance(spec, str) and spec != ALL_LINEAR and _PLAIN_NAME.fullmatch(spec):
        as_regex = any(re.fullmatch(spec, n) for n in names)
        if not as_regex and any(name_matches(n, (spec,)) for n in names):
            return (spec,)
    return spec


_PLAIN_NAME = re.compile(r"[\w.\-]+")  # a module name or dotted path; "." is the only regex syntax


def _filtered_out(name: str, targets: Targets) -> bool:
    exclude = targets.exclude_modules
    if exclude is not None and name_matches(name, exclude):
        return True
    layers = targets.layers_to_transform
    return layers is not None and layer_index(name, targets.layers_pattern) not in layers


def _wrappable_kind(name: str, module: nn.Module, spec: MethodSpec) -> Any:
    assert spec.kind_of is not None
    kind = spec.kind_of(module)
    if kind is None:
        raise TargetError(
            f"target {name!r} is a {type(module).__name__}, which {spec.name} cannot wrap; "
            f"it wraps: {spec.wrappable}. Target its linear sub-layers instead."
        )
    reason = spec.unsupported_reason(module)
    if reason:
        raise TargetError(f"target {name!r} ({type(module).__name__}): {reason}")
    return kind


def _nothing_matched(
    model: nn.Module, targets: Targets, spec: MethodSpec, modules: list[tuple[str, nn.Module]]
) -> str:
    assert spec.kind_of is not None
    adaptable = sorted({n.rsplit(".", 1)[-1] for n, m in modules if spec.kind_of(m) is not None})
    hint = ""
    if isinstance(targets.target_modules, str) and targets.target_modules != ALL_LINEAR:
        hint = (
            r"; a single string is a regex over the full module name (start it with '.*\.' to match "
            "the end of names), a list matches names or dotted suffixes"
        )
    return (
        f"target_modules={_show(targets.target_modules)} matched no layer of {type(model).__name__}"
        f"{_filters(targets)}; layers that could be adapted end in: {', '.join(adaptable) or 'none'}{hint}"
    )


def _check_entries_used(model: nn.Module, targets: Targets, names: list[str]) -> None:
    """Every list entry of target_modules / exclude_modules must match some module: a misspelt one
    would otherwise be ignored while the others match (HF PEFT only errors when nothing matches)."""
    for key in ("target_modules", "exclude_modules"):
        spec = getattr(targets, key)
        if isinstance(spec, tuple):
            for entry in spec:
                if not any(name_matches(n, (entry,)) for n in names):
                    raise TargetError(
                        f"{key} entry {entry!r} matches no module of {type(model).__name__}"
                        f"{did_you_mean(entry, {n.rsplit('.', 1)[-1] for n in names})}; fix or remove it"
                    )
        elif key == "exclude_modules" and spec is not None and not any(re.fullmatch(spec, n) for n in names):
            plain = _PLAIN_NAME.fullmatch(spec) is not None
            raise TargetError(
                f"exclude_modules={spec!r} matches no module of {type(model).__name__}; a single string is "
                f"a regex over the full module name" + (f", did you mean [{spec!r}]?" if plain else "")
            )


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


def _filters(targets: Targets) -> str:
    parts = []
    if targets.exclude_modules is not None:
        parts.append(f"exclude_modules={_show(targets.exclude_modules)}")
    if targets.layers_to_transform is not None:
        parts.append(f"layers_to_transform={list(targets.layers_to_transform)}")
    return f" (with {', '.join(parts)})" if parts else ""
