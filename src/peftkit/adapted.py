"""The adapted model: a base model with named adapters you can attach, load, save, switch, disable,
merge and mix per row of a batch. A user of HF PEFT's `PeftModel` should feel at home.

    model, tokenizer = peftkit.load_base("smollm2-135m")
    am = peftkit.AdaptedModel.attach(model, peftkit.LoraConfig(r=16, lora_alpha=32))
    am.save_adapter("out/my-adapter")
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .errors import (
    AdapterNotFoundError,
    AdapterStateError,
    BaseModelMismatchError,
    ConfigError,
    RequestError,
    TargetError,
    option,
)
from .formats import peft as fmt
from .inject import Target, find_modules_to_save, find_targets, get_module, set_module
from .methods import LoraConfig, LoraLayer, method_for
from .methods.lora import expected_shapes
from .methods.lora_kinds import GPT2_CONV1D
from .naming import adapter_name_problem
from .routing import BASE_NAMES, AdapterState, RowRouting, batch_rows, generate_expansion
from .saved_modules import ModulesToSave


class AdaptedModel(nn.Module):
    """A base model plus named adapters. Calls go to the base model (`am(input_ids=...)`,
    `am.generate(...)`), with `adapter_names=[...]` to choose an adapter per row of the batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.state = AdapterState()
        self.configs: dict[str, LoraConfig] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # config, device, generation_config, ...

    # -- creating ---------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, config: LoraConfig, name: str = "default") -> AdaptedModel:
        """Wrap `model` and attach a new trainable adapter (HF PEFT's `get_peft_model`)."""
        am = model if isinstance(model, AdaptedModel) else cls(model)
        am.add_adapter(name, config)
        return am

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str | Path, name: str = "default", **kwargs: Any
    ) -> AdaptedModel:
        """Wrap `model` and load a saved adapter (HF PEFT's `PeftModel.from_pretrained`)."""
        am = cls(model)
        am.load_adapter(path, name, **kwargs)
        return am

    def add_adapter(
        self, name: str, config: LoraConfig, *, trainable: bool = True, dtype: torch.dtype | None = None
    ) -> None:
        """Attach a new adapter. The first adapter becomes active; later ones wait for `set_adapter`.

        dtype: the adapter's parameter dtype (default: each base layer's dtype).
        """
        self._check_new_name(name)
        method_for(config)
        targets = find_targets(self.model, config, strict=True)
        find_modules_to_save(self.model, config.modules_to_save)  # every entry must match something
        self._check_other_adapters(config, targets)
        self._inject(name, config, targets, trainable=trainable, dtype=dtype)

    def load_adapter(
        self,
        path: str | Path,
        name: str = "default",
        *,
        trainable: bool = False,
        check_base: bool = True,
        dtype: torch.dtype | None = None,
    ) -> str:
        """Load an adapter saved by peftkit or HF PEFT. Everything is checked before anything changes:
        config, tensor names and shapes, and (when the file records it) the base model's fingerprint."""
        self._check_new_name(name)
        files = fmt.read_adapter(path)
        config = fmt.config_from_peft(files.config, files.directory)
        if check_base:
            self._check_base(files.metadata, files.directory)
        targets = find_targets(self.model, config)
        self._check_other_adapters(config, targets)
        expected, base_copies = self._expected(config, targets, files.tensors)
        fmt.check_tensors(expected, files.tensors, files.directory)
        self._check_base_copies({k: files.tensors[k] for k in base_copies}, files.directory)
        self._inject(name, config, targets, trainable=trainable, dtype=dtype)
        params = self.adapter_state_dict(name)
        with torch.no_grad():
            for key, value in files.tensors.items():
                if key not in base_copies:
                    params[key].copy_(value)
        return name

    def save_adapter(
        self, path: str | Path, name: str | None = None, *, metadata: dict[str, str] | None = None
    ) -> Path:
        """Save one adapter in the HF PEFT format (adapter_config.json + adapter_model.safetensors).

        metadata: extra string facts for the safetensors header (e.g. the training data's hash).
        """
        name = self._one_adapter(name)
        config = self.configs[name]
        layers = [(n, m) for n, m in self._wrappers(LoraLayer) if name in m.specs]
        config_json = fmt.config_to_peft(
            config,
            [n for n, _ in layers],
            fan_in_fan_out=any(m.kind is GPT2_CONV1D for _, m in layers),
            base_model=self.base_model_name(),
            task_type=fmt.task_type_of(self.model),
        )
        metadata = {
            "peftkit_version": __version__,
            "peftkit_base_fingerprint": self.base_fingerprint(),
            "peftkit_base_model": self.base_model_name() or "",
            "peftkit_adapter_name": name,
            **(metadata or {}),
        }
        return fmt.write_adapter(path, config_json, self.adapter_state_dict(name), metadata)

    save_pretrained = save_adapter

    def _inject(
        self,
        name: str,
        config: LoraConfig,
        targets: list[Target],
        *,
        trainable: bool,
        dtype: torch.dtype | None,
    ) -> None:
        if not self.configs:  # the first adapter freezes the base (after its targets were validated)
            for p in self.model.parameters():
                p.requires_grad_(False)
        if config.bias != "none":
            self.base_fingerprint()  # before training changes the biases it covers
        for t in targets:
            layer = get_module(self.model, t.name)
            if not isinstance(layer, LoraLayer):
                layer = LoraLayer(layer, t.kind, self.state).train(layer.training)
                set_module(self.model, t.name, layer)
            layer.add_adapter(name, config, t.name, dtype=dtype)
        for module_name, _ in find_modules_to_save(self.model, config.modules_to_save, strict=False):
            wrapper = get_module(self.model, module_name)
            if not isinstance(wrapper, ModulesToSave):
                wrapper = ModulesToSave(wrapper, self.state).train(wrapper.training)
                set_module(self.model, module_name, wrapper)
            wrapper.add_adapter(name)
        self.configs[name] = config
        for p in self.adapter_state_dict(name).values():
            p.requires_grad_(trainable)
        if not self.state.active:
            self.state.active = (name,)

    # -- the adapters ---------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """Names of all attached adapters, in the order they were added."""
        return list(self.configs)

    @property
    def active_adapters(self) -> list[str]:
        return list(self.state.active)

    def adapter_config(self, name: str | None = None) -> LoraConfig:
        return self.configs[self._one_adapter(name)]

    def set_adapter(self, names: str | list[str]) -> None:
        """Make `names` the active adapter(s); several active adapters add up."""
        if names is None or isinstance(names, bytes) or not isinstance(names, (str, Iterable)):
            raise RequestError(
                f"set_adapter takes an adapter name or a list of names, not {names!r}; to run the base "
                "model alone, use `with am.disable_adapters():`"
            )
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            # An empty list would quietly run the base model; that has its own, reversible switch.
            raise RequestError(
                "set_adapter([]) names no adapter; to run the base model alone, use "
                "`with am.disable_adapters():`"
            )
        for n in names:
            self._check_exists(n)
        if len(set(names)) < len(names):
            raise RequestError(f"set_adapter({names}) names an adapter twice; name each once")
        self.state.active = tuple(names)

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; layers left with no adapter get their plain module back.

        Deleting the only active adapter makes the first remaining adapter active (as HF PEFT does),
        with a warning that says which: running the base model instead would go unnoticed."""
        self._check_exists(name)
        if name in self.merged_adapters:
            raise AdapterStateError(
                f"adapter {name!r} is merged into the weights; unmerge() before deleting it"
            )
        for module_name, wrapper in list(self._wrappers()):
            wrapper.delete_adapter(name)
            if not wrapper.specs:
                set_module(self.model, module_name, _inner(wrapper))
        del self.configs[name]
        was_active = name in self.state.active
        self.state.active = tuple(n for n in self.state.active if n != name)
        if was_active and not self.state.active and self.configs:
            self.state.active = (self.adapters[0],)
            warnings.warn(
                f"deleted the active adapter {name!r}; adapter {self.adapters[0]!r} is active now "
                "(set_adapter() chooses another, disable_adapters() runs the base model)",
                stacklevel=2,
            )

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model alone inside this block (adapters must not be merged)."""
        if self.merged_adapters:
            raise AdapterStateError(
                f"adapters {self.merged_adapters} are merged into the weights, so they cannot be switched "
                "off; unmerge() first"
            )
        before = self.state.disabled
        self.state.disabled = True
        try:
            yield
        finally:
            self.state.disabled = before

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; shared (tied) tensors count once."""
        params = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- merging ----------------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        names: dict[str, None] = {}
        for _, layer in self._wrappers(LoraLayer):
            names.update(dict.fromkeys(layer.merged))
        return list(names)

    def merge(self, names: str | list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights. Idempotent; `unmerge`
        restores the exact original weights."""
        names = (
            list(self.state.active) if names is None else [names] if isinstance(names, str) else list(names)
        )
        for n in names:
            self._check_exists(n)
            if not method_for(self.configs[n]).supports_merge:
                raise AdapterStateError(f"adapter {n!r} cannot be merged")
        tied = self._tied_weights()
        layers = [(mn, m) for mn, m in self._wrappers(LoraLayer) if any(n in m.specs for n in names)]
        for module_name, layer in layers:
            others = tied.get(layer.base_layer.weight.data_ptr(), [])
            if len(others) > 1:
                raise AdapterStateError(
                    f"{module_name}'s weight is shared with {[o for o in others if not o.startswith(module_name)]}"
                    " (tied weights); merging would change both. Keep the adapter unmerged, or untie the weights"
                )
        for _, layer in layers:
            layer.merge(names)

    def unmerge(self) -> None:
        """Restore the exact pre-merge base weights."""
        for _, layer in self._wrappers(LoraLayer):
            layer.unmerge()

    def merge_and_unload(self, names: str | list[str] | None = None) -> nn.Module:
        """Merge adapters into the weights and return the plain base model (no adapter code left)."""
        self.merge(names)
        merged = self.merged_adapters
        for module_name, wrapper in list(self._wrappers()):
            if isinstance(wrapper, ModulesToSave):
                chosen = next((n for n in merged if n in wrapper.modules_to_save), None)
                plain = wrapper.modules_to_save[chosen] if chosen else wrapper.original_module
            else:
                wrapper.unmerged_weight = None
                plain = wrapper.base_layer
            set_module(self.model, module_name, plain)
        self.configs.clear()
        self.state.active = ()
        if merged:  # the weights changed: this is no longer the base the fingerprint describes
            self.model.__dict__.pop("_peftkit_fingerprint", None)
        return self.model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        self.unmerge()
        for module_name, wrapper in list(self._wrappers()):
            set_module(self.model, module_name, _inner(wrapper))
        self.configs.clear()
        self.state.active = ()
        return self.model

    # -- running ----------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str | None] | None = None, **kwargs: Any) -> Any:
        """The base model's forward; `adapter_names` (one per row, None = base model) mixes adapters."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_batch(adapter_names, batch_rows(args, kwargs)):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str | None] | None = None, **kwargs: Any) -> Any:
        """The base model's `generate`, optionally with one adapter per row of the batch."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        expand, rows = generate_expansion(self.model, kwargs), batch_rows(args, kwargs)
        names = list(adapter_names)
        if expand > 1 and rows is not None and len(names) == rows * expand:
            names = _one_name_per_row(names, expand)
        with self.mixed_batch(names, rows, expand=expand):
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def mixed_batch(
        self, adapter_names: list[str | None], batch_size: int | None = None, *, expand: int = 1
    ) -> Iterator[None]:
        """Route row i of every batch inside this block through adapter_names[i] (None: base model).

        batch_size: the rows the names are for, checked here (layers check every batch too).
        expand: inside `generate`, each row is repeated this many times (beams, returned sequences)
            after the encoder ran; layers accept batches of len(adapter_names) * expand rows too.
        """
        if batch_size is not None and len(adapter_names) != batch_size:
            repeats = " (generate repeats each row's adapter for its beams)" if expand > 1 else ""
            raise RequestError(
                f"adapter_names has {len(adapter_names)} entries for a batch of {batch_size} rows; "
                f"give one per row{repeats}"
            )
        for n in adapter_names:
            if n not in BASE_NAMES:
                self._check_exists(n)
        if self.merged_adapters:
            raise AdapterStateError(
                f"adapters {self.merged_adapters} are merged; a mixed batch needs unmerged adapters (unmerge() first)"
            )
        before = self.state.rows
        self.state.rows = RowRouting.from_names(adapter_names, expand=expand)
        try:
            yield
        finally:
            self.state.rows = before

    # -- the base model -----------------------------------------------------------------------------
    def base_model_name(self) -> str | None:
        name = getattr(self.model, "_peftkit_base_name", None)
        config = getattr(self.model, "config", None)
        return name or (getattr(config, "_name_or_path", None) or None)

    def base_fingerprint(self) -> str:
        """The base model's fingerprint (config + unmerged weights), computed once and cached."""
        cached = self.model.__dict__.get("_peftkit_fingerprint")
        if cached:
            return cached
        from .base.fingerprint import fingerprint_tensors

        config = getattr(self.model, "config", None)
        fp = fingerprint_tensors(
            config.to_dict() if hasattr(config, "to_dict") else None, self.base_tensors()
        )
        self.model._peftkit_fingerprint = fp
        return fp

    def base_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """The plain base model's state (names and original, unmerged weights), without adapters."""
        originals = {
            f"{n}.base_layer.weight": m.unmerged_weight
            for n, m in self._wrappers(LoraLayer)
            if m.unmerged_weight is not None
        }
        for key, value in self.model.state_dict().items():
            if ".lora_" in key or ".modules_to_save." in key:
                continue
            value = originals.get(key, value)
            yield key.replace(".base_layer.", ".").replace(".original_module.", "."), value

    # -- state dicts ----------------------------------------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, Tensor]:
        """Adapter `name`'s tensors under their PEFT file keys (live parameters, not copies)."""
        out: dict[str, Tensor] = {}
        for module_name, wrapper in self._wrappers():
            if isinstance(wrapper, LoraLayer) and name in wrapper.specs:
                for role, p in wrapper.adapter_tensors(name).items():
                    out[fmt.factor_key(module_name, wrapper.kind.name, role)] = p
            elif isinstance(wrapper, ModulesToSave) and name in wrapper.modules_to_save:
                for pname, p in wrapper.modules_to_save[name].state_dict(keep_vars=True).items():
                    out[fmt.saved_module_key(module_name, pname)] = p
        bias = self.configs[name].bias if name in self.configs else "none"
        for pname, p in self.model.named_parameters():
            if _is_bias(pname) and (
                bias == "all"
                or (bias == "lora_only" and pname.endswith(".base_layer.bias") and self._has(pname, name))
            ):
                out[fmt.bias_key(pname)] = p
        return out

    def _expected(
        self, config: LoraConfig, targets: list[Target], found: dict[str, Tensor]
    ) -> tuple[dict[str, tuple[tuple[int, ...], str]], list[str]]:
        """The tensors an adapter file for `config` must hold ({key: (shape, what)}), and the keys
        that are full copies of base weights."""
        expected: dict[str, tuple[tuple[int, ...], str]] = {}
        for t in targets:
            for role, shape in expected_shapes(t.module, t.kind, config, t.name).items():
                expected[fmt.factor_key(t.name, t.kind.name, role)] = (shape, f"{t.name} ({role})")
        for module_name, module in find_modules_to_save(self.model, config.modules_to_save, strict=False):
            for pname, value in module.state_dict().items():
                expected[fmt.saved_module_key(module_name, pname)] = (
                    tuple(value.shape),
                    f"{module_name}.{pname}",
                )
        # Keys naming plain base tensors: trained biases (bias="all"/"lora_only"), and the full embedding
        # weights HF PEFT saves when embeddings are targeted (save_embedding_layers), checked on load.
        plain = dict(self.base_tensors())
        base_copies: list[str] = []
        for key in found:
            name = key.removeprefix(fmt.PREFIX).replace(".base_layer.", ".")
            if key in expected or name not in plain or (_is_bias(name) and config.bias == "none"):
                continue
            expected[key] = (tuple(plain[name].shape), name)
            if not _is_bias(name):
                base_copies.append(key)
        return expected, base_copies

    # -- helpers -----------------------------------------------------------------------------------
    def _wrappers(
        self, cls: type | tuple[type, ...] = (LoraLayer, ModulesToSave)
    ) -> Iterator[tuple[str, Any]]:
        for name, module in self.model.named_modules():
            if isinstance(module, cls):
                yield name, module

    def _has(self, bias_name: str, adapter: str) -> bool:
        module = get_module(self.model, bias_name.removesuffix(".base_layer.bias"))
        return isinstance(module, LoraLayer) and adapter in module.specs

    def _tied_weights(self) -> dict[int, list[str]]:
        by_ptr: dict[int, list[str]] = {}
        for pname, p in self.model.named_parameters(remove_duplicate=False):
            by_ptr.setdefault(p.data_ptr(), []).append(pname)
        return by_ptr

    def _check_new_name(self, name: str) -> None:
        problem = adapter_name_problem(name, self.configs)
        if problem:
            fix = f", or delete_adapter({name!r}) first" if name in self.configs else ""
            raise ConfigError(f"adapter name {name!r} {problem}{fix}")

    def _check_other_adapters(self, config: LoraConfig, targets: list[Target]) -> None:
        """A module carries LoRA layers or whole copies (modules_to_save), never both, and copies do
        not nest: a copy made of a wrapped module would carry the other adapter's layers inside it
        (wrong outputs, wrong file keys), and LoRA cannot wrap a copy. Checked before anything changes."""
        lora = {n: list(m.specs) for n, m in self._wrappers(LoraLayer)}
        copies = {n: list(m.modules_to_save) for n, m in self._wrappers(ModulesToSave)}
        saved = [n for n, _ in find_modules_to_save(self.model, config.modules_to_save, strict=False)]
        clashes = [  # (this adapter's module, the other module, what the other is, its adapters)
            *((t.name, c, "a whole copy (modules_to_save)", o) for t in targets for c, o in copies.items()),
            *((s, n, "LoRA layers", o) for s in saved for n, o in lora.items()),
            *((s, c, "a whole copy", o) for s in saved for c, o in copies.items() if c != s),
        ]
        for mine, other, what, owners in clashes:
            if _within(mine, other) or _within(other, mine):
                kind = "LoRA target" if any(t.name == mine for t in targets) else "modules_to_save entry"
                inside = "which holds it" if _within(mine, other) else "inside it"
                where = "there" if mine == other else f"on {other!r}, {inside}"
                raise TargetError(
                    f"{kind} {mine!r}: adapter {owners[0]!r} already has {what} {where}. A module takes LoRA "
                    "layers or whole copies, not both, and copies cannot nest; give the adapters separate "
                    f"modules, or delete_adapter({owners[0]!r}) first"
                )

    def _check_exists(self, name: str) -> None:
        if name not in self.configs:
            raise AdapterNotFoundError(
                f"no adapter named {name!r}; attached adapters: {self.adapters or 'none'}"
            )

    def _one_adapter(self, name: str | None) -> str:
        if name is not None:
            self._check_exists(name)
            return name
        if len(self.configs) == 1:
            return next(iter(self.configs))
        if self.state.active:
            return self.state.active[0]
        raise AdapterStateError(f"several adapters are attached ({self.adapters}); name the one you mean")

    def _check_base_copies(self, tensors: dict[str, Tensor], source: Path) -> None:
        """A full base weight inside an adapter must equal ours: peftkit never overwrites the base
        model from an adapter file (other adapters share it)."""
        plain = dict(self.base_tensors())
        for key, value in tensors.items():
            name = key.removeprefix(fmt.PREFIX).replace(".base_layer.", ".")
            if not torch.equal(value.to(plain[name].dtype), plain[name]):
                raise BaseModelMismatchError(
                    f"{source} carries its own copy of the base weight {name} (HF PEFT's save_embedding_layers), "
                    "and it differs from this base model's (e.g. a resized vocabulary). peftkit does not overwrite "
                    "base weights from an adapter: load the base model it was trained with"
                )

    def _check_base(self, metadata: dict[str, str], source: Path) -> None:
        recorded = metadata.get("peftkit_base_fingerprint")
        if not recorded:
            return  # written by HF PEFT or another tool: the shape checks still apply
        current = self.base_fingerprint()
        if recorded != current:
            trained_on = metadata.get("peftkit_base_model") or "another model"
            raise BaseModelMismatchError(
                f"{source} was trained on base model {trained_on!r} (fingerprint {recorded[7:19]}), but this base "
                f"model's fingerprint is {current[7:19]}. Load the adapter into the base it was trained on, or "
                f"pass {option('check_base', False)} to load it anyway"
            )


def _one_name_per_row(names: list[str | None], expand: int) -> list[str | None]:
    """Names given per beam (rows x beams) as one per row. A row's beams share its adapter: beam
    search reorders the beams of a row, so a different adapter per beam would have no meaning."""
    groups = [names[i : i + expand] for i in range(0, len(names), expand)]
    for row, group in enumerate(groups):
        if len(set(group)) > 1:
            raise RequestError(
                f"adapter_names for the {expand} beams of row {row} differ ({group}); a row's beams share "
                "one adapter: give one name per row, or the same name for each of its beams"
            )
    return [group[0] for group in groups]


def _inner(wrapper: nn.Module) -> nn.Module:
    return wrapper.base_layer if isinstance(wrapper, LoraLayer) else wrapper.original_module


def _within(name: str, outer: str) -> bool:
    """Whether module `name` is `outer` or inside it."""
    return name == outer or name.startswith(outer + ".")


def _is_bias(param_name: str) -> bool:
    adapter_part = any(part in param_name for part in (".lora_", ".modules_to_save.", ".original_module."))
    return param_name.rsplit(".", 1)[-1] == "bias" and not adapter_part
