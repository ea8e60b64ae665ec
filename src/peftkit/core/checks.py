"""What `AdaptedModel` checks before an adapter is attached or loaded, so a refusal changes nothing:
which tensors a file must hold, modules another adapter already claims, and the base model."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import AdapterStateError, BaseModelMismatchError, RequestError, TargetError, option
from ..formats import peft as fmt
from ..identity import AdapterIdentity
from ..methods import MethodSpec, method_for, method_of_layer
from .inject import Target, find_modules_to_save, find_targets
from .layer_types import is_quantized
from .saved_modules import ModulesToSave

if TYPE_CHECKING:
    from .adapted import AdaptedModel


@dataclass
class CheckedAdapter:
    """An adapter file read and checked against a model, nothing attached yet: what `load_adapter`
    injects, or what the server turns into slot tensors without attaching anything."""

    files: fmt.AdapterFiles
    spec: MethodSpec
    config: Any
    targets: list[Target]  # the layers it adapts (none for a whole-model method)
    base_copies: list[str]  # keys that are full copies of base weights (checked equal, not loaded)


def check_adapter_file(
    am: AdaptedModel, path: str | Path | fmt.AdapterFiles, *, check_base: bool = True
) -> CheckedAdapter:
    """Read an adapter (or take its files, read already) and check everything a load depends on: its
    config, the base model it was trained on, the layers it targets, and every tensor's name and shape."""
    files = path if isinstance(path, fmt.AdapterFiles) else fmt.read_adapter(path)
    spec, config = fmt.config_from_peft(files.config, files.directory)
    identity = AdapterIdentity.from_metadata(files.metadata)
    if check_base:
        check_base_fingerprint(am, identity, files.directory)
    note_quantization(am, identity, files.directory)
    targets = find_targets(am.model, config, spec) if spec.wraps_layers else []
    check_other_adapters(am, spec, config, targets)
    expected, base_copies = expected_tensors(am, spec, config, targets, files.tensors)
    fmt.check_tensors(expected, files.tensors, files.directory)
    check_base_copies(am, {k: files.tensors[k] for k in base_copies}, files.directory)
    return CheckedAdapter(files, spec, config, targets, base_copies)


def expected_tensors(
    am: AdaptedModel, spec: MethodSpec, config: Any, targets: list[Target], found: dict[str, Tensor]
) -> tuple[dict[str, tuple[tuple[int, ...], str]], list[str]]:
    """The tensors an adapter file for `config` must hold ({key: (shape, what)}), and the keys
    that are full copies of base weights."""
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    for t in targets:
        assert spec.expected_shapes is not None
        for role, shape in spec.expected_shapes(t.module, t.kind, config, t.name).items():
            expected[fmt.layer_key(t.name, spec.key_suffix(role, t.kind))] = (shape, f"{t.name} ({role})")
    if spec.model_expected_shapes is not None:
        for role, shape in spec.model_expected_shapes(am.model, config).items():
            expected[fmt.model_key(role)] = (shape, f"the {spec.name} adapter ({role})")
    for module_name, module in find_modules_to_save(am.model, saved_modules_of(config), strict=False):
        for pname, value in module.state_dict().items():
            expected[fmt.saved_module_key(module_name, pname)] = (
                tuple(value.shape),
                f"{module_name}.{pname}",
            )
    # Keys naming plain base tensors: trained biases (bias="all"/"lora_only"), and the full embedding
    # weights HF PEFT saves when embeddings are targeted (save_embedding_layers), checked on load.
    plain = dict(am.base_tensors())
    base_copies: list[str] = []
    for key in found:
        name = key.removeprefix(fmt.PREFIX).replace(".base_layer.", ".")
        if key in expected or name not in plain or (is_base_bias(name) and bias_choice(config) == "none"):
            continue
        expected[key] = (tuple(plain[name].shape), name)
        if not is_base_bias(name):
            base_copies.append(key)
    return expected, base_copies


# -- helpers -----------------------------------------------------------------------------------
def check_other_adapters(am: AdaptedModel, spec: MethodSpec, config: Any, targets: list[Target]) -> None:
    """A module carries one method's adapter layers or whole copies (modules_to_save), never both,
    and copies do not nest: a copy made of a wrapped module would carry the other adapter's layers
    inside it (wrong outputs, wrong file keys), and no method wraps a copy. Two methods never wrap
    one module (whose merge, whose base weight?). Checked before anything changes."""
    layers = {n: m for n, m in am.adapter_layers()}
    copies = {n: list(m.modules_to_save) for n, m in am.wrappers() if isinstance(m, ModulesToSave)}
    saved = [n for n, _ in find_modules_to_save(am.model, saved_modules_of(config), strict=False)]
    for t in targets:
        other = layers.get(t.name)
        if other is not None and not isinstance(other, spec.layer_cls):
            theirs = method_of_layer(other)
            raise TargetError(
                f"{spec.label} target {t.name!r} already has {theirs.label} layers (adapter "
                f"{list(other.specs)[0]!r}); two methods cannot wrap one module. Target other modules, "
                f"or delete_adapter({list(other.specs)[0]!r}) first"
            )
    clashes = [  # (this adapter's module, the other module, what the other is, its adapters)
        *((t.name, c, "a whole copy (modules_to_save)", o) for t in targets for c, o in copies.items()),
        *(
            (s, n, f"{method_of_layer(m).label} layers", list(m.specs))
            for s in saved
            for n, m in layers.items()
        ),
        *((s, c, "a whole copy", o) for s in saved for c, o in copies.items() if c != s),
    ]
    for mine, other, what, owners in clashes:
        if _within(mine, other) or _within(other, mine):
            kind = f"{spec.label} target" if any(t.name == mine for t in targets) else "modules_to_save entry"
            inside = "which holds it" if _within(mine, other) else "inside it"
            where = "there" if mine == other else f"on {other!r}, {inside}"
            raise TargetError(
                f"{kind} {mine!r}: adapter {owners[0]!r} already has {what} {where}. A module takes adapter "
                "layers or whole copies, not both, and copies cannot nest; give the adapters separate "
                f"modules, or delete_adapter({owners[0]!r}) first"
            )


def check_base_copies(am: AdaptedModel, tensors: dict[str, Tensor], source: Path) -> None:
    """A full base weight inside an adapter must equal ours: peftkit never overwrites the base
    model from an adapter file (other adapters share it)."""
    plain = dict(am.base_tensors())
    for key, value in tensors.items():
        name = key.removeprefix(fmt.PREFIX).replace(".base_layer.", ".")
        if not torch.equal(value.to(plain[name].dtype), plain[name]):
            raise BaseModelMismatchError(
                f"{source} carries its own copy of the base weight {name} (HF PEFT's save_embedding_layers), "
                "and it differs from this base model's (e.g. a resized vocabulary). peftkit does not overwrite "
                "base weights from an adapter: load the base model it was trained with"
            )


def check_base_fingerprint(am: AdaptedModel, identity: AdapterIdentity, source: Path) -> None:
    recorded = identity.base_fingerprint
    if not recorded:
        return  # written by HF PEFT or another tool: the shape checks still apply
    current = am.base_fingerprint()
    if recorded != current:
        trained_on = identity.base_model or "another model"
        raise BaseModelMismatchError(
            f"{source} was trained on base model {trained_on!r} (fingerprint {recorded[7:19]}), but this base "
            f"model's fingerprint is {current[7:19]}. Load the adapter into the base it was trained on, or "
            f"pass {option('check_base', False)} to load it anyway"
        )


def saved_modules_of(config: Any) -> tuple[str, ...] | None:
    return getattr(config, "modules_to_save", None)


def bias_choice(config: Any) -> str:
    return getattr(config, "bias", "none")


def _within(name: str, outer: str) -> bool:
    """Whether module `name` is `outer` or inside it."""
    return name == outer or name.startswith(outer + ".")


def is_base_bias(param_name: str) -> bool:
    """A base layer's bias (not one inside a modules_to_save copy, whose copies train whole)."""
    copies = any(part in param_name for part in (".modules_to_save.", ".original_module."))
    return param_name.rsplit(".", 1)[-1] == "bias" and not copies


def note_quantization(am: AdaptedModel, identity: AdapterIdentity, source: Path) -> None:
    """An adapter trained on the 4-bit form of this base loads onto the full-precision one, and the
    reverse (the fingerprint is the checkpoint's, before quantization), with a note that says so."""
    if not identity.saved_by_peftkit:
        return
    trained, here = identity.base_quantization, am.base.quantization
    if trained != here:
        warnings.warn(
            f"{source} was trained on the {_form(trained)} form of this base model and is loaded onto its "
            f"{_form(here)} form: the same checkpoint, so it applies, but outputs differ by the "
            "quantization error, which is not small on small models (measure it on your task, or load "
            "the base in the form the adapter trained on)",
            stacklevel=3,
        )


def _form(quantization: str | None) -> str:
    return f"{quantization} (4-bit)" if quantization else "full-precision"


def check_can_share_a_batch(am: AdaptedModel, names: list[str | None]) -> None:
    """Rows may use different adapters (or none) only if every method involved routes per row."""
    if len(set(names)) < 2:
        return
    for n in dict.fromkeys(n for n in names if n is not None):
        spec = method_for(am.configs[n])
        if not spec.supports_mixed_batch:
            raise RequestError(
                f"adapter {n!r} is a {spec.label} adapter, which cannot share a batch with other "
                "adapters; run its rows in a batch of their own"
            )


def check_mergeable(am: AdaptedModel, names: str | list[str] | None) -> list[str]:
    """The adapters a merge means (default: the active ones), checked: each exists, its method can
    merge, and no layer it would change shares its weight with another (tied weights)."""
    names = list(am.state.active) if names is None else [names] if isinstance(names, str) else list(names)
    for n in names:
        am.check_exists(n)
        spec = method_for(am.configs[n])
        if not spec.supports_merge:
            raise AdapterStateError(
                f"adapter {n!r} ({spec.name}) cannot be merged into the weights: {spec.description}"
            )
    tied = _tied_weights(am.model)
    for module_name, layer in am.adapter_layers():
        if not any(n in layer.specs for n in names) or is_quantized(layer.base_layer):
            continue
        others = tied.get(layer.base_layer.weight.data_ptr(), [])
        if len(others) > 1:
            raise AdapterStateError(
                f"{module_name}'s weight is shared with {[o for o in others if not o.startswith(module_name)]}"
                " (tied weights); merging would change both. Keep the adapter unmerged, or untie the weights"
            )
    return names


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """Parameter names by storage: a storage with several names is a tied weight."""
    by_ptr: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(p.data_ptr(), []).append(pname)
    return by_ptr
