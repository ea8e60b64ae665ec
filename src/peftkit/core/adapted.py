"""The adapted model: a base model with named adapters you can attach, load, save, switch, disable,
merge and mix per row of a batch. A user of HF PEFT's `PeftModel` should feel at home.

    model, tokenizer = peftkit.load_base("smollm2-135m")
    am = peftkit.AdaptedModel.attach(model, peftkit.LoraConfig(r=16, lora_alpha=32))
    am.save_adapter("out/my-adapter")
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import (
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    RequestError,
)
from ..formats import peft as fmt
from ..identity import AdapterIdentity
from ..methods import MethodSpec, is_adapter_layer, method_for, method_of_layer
from ..naming import adapter_name_problem
from ..version import __version__
from .checks import (
    bias_choice,
    check_adapter_file,
    check_mergeable,
    check_other_adapters,
    is_base_bias,
    saved_modules_of,
)
from .inject import Target, find_modules_to_save, find_targets, get_module, set_module
from .kv_prefix import generate_with_prefix, prefix_inputs, prefix_rows
from .layer_types import dense_copy, fast_decoding, is_quantized
from .rows import (
    AdapterState,
    RowRouting,
    as_kwargs,
    batch_rows,
    generate_expansion,
    one_name_per_row,
)
from .saved_modules import ModulesToSave
from .weights import AdapterChoice, activation, active_weights, row_choices

if TYPE_CHECKING:
    from ..base.facts import BaseFacts


class AdaptedModel(nn.Module):
    """A base model plus named adapters. Calls go to the base model (`am(input_ids=...)`,
    `am.generate(...)`), with `adapter_names=[...]` to choose an adapter per row of the batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.state = AdapterState()
        self.configs: dict[str, Any] = {}  # adapter name -> its method's config
        # Whole-model adapters (soft prompts, prefixes) by adapter name; layer adapters live in the layers.
        self.model_adapters = nn.ModuleDict()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # config, device, generation_config, ...

    # -- creating ---------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module, config: Any, name: str = "default") -> AdaptedModel:
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
        self, name: str, config: Any, *, trainable: bool = True, dtype: torch.dtype | None = None
    ) -> None:
        """Attach a new adapter of any registered method (its config says which: LoraConfig, IA3Config,
        ...). The first adapter becomes active; later ones wait for `set_adapter`.

        dtype: the adapter's parameter dtype (default: each base layer's dtype).
        """
        self._check_new_name(name)
        spec = method_for(config)
        targets = find_targets(self.model, config, spec, strict=True) if spec.wraps_layers else []
        if spec.model_expected_shapes is not None:
            spec.model_expected_shapes(self.model, config)  # a model it cannot act on fails here, unchanged
        find_modules_to_save(self.model, saved_modules_of(config))  # every entry must match something
        check_other_adapters(self, spec, config, targets)
        self._inject(name, spec, config, targets, trainable=trainable, dtype=dtype)

    def load_adapter(
        self,
        path: str | Path | fmt.AdapterFiles,
        name: str = "default",
        *,
        trainable: bool = False,
        check_base: bool = True,
        dtype: torch.dtype | None = None,
    ) -> str:
        """Load an adapter saved by peftkit or HF PEFT (its directory, or its files as `read_adapter` gave
        them). Everything is checked before anything changes: config, tensor names and shapes, and (when
        the file records it) the base model's fingerprint."""
        self._check_new_name(name)
        checked = check_adapter_file(self, path, check_base=check_base)
        files, spec, config, base_copies = checked.files, checked.spec, checked.config, checked.base_copies
        self._inject(name, spec, config, checked.targets, trainable=trainable, dtype=dtype)
        params = self.adapter_state_dict(name)
        whole_model = {k: v for k, v in files.tensors.items() if fmt.is_model_key(k)}
        if whole_model:  # a whole-model adapter takes its saved tensors itself (e.g. projected prefixes)
            self.model_adapters[name].load_tensors(whole_model)
        with torch.no_grad():
            for key, value in files.tensors.items():
                if key not in base_copies and key not in whole_model:
                    params[key].copy_(value)
        return name

    def save_adapter(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        dataset_hash: str | None = None,
        training: dict[str, Any] | None = None,
    ) -> Path:
        """Save one adapter in the HF PEFT format (adapter_config.json + adapter_model.safetensors),
        with its identity (`AdapterIdentity`) in the safetensors header.

        dataset_hash, training: what trained it (the data's hash, facts of the run), for the identity.
        """
        name = self._one_adapter(name)
        config, spec = self.configs[name], method_for(self.configs[name])
        layers = [(n, m) for n, m in self.adapter_layers() if name in m.specs]
        config_json = fmt.config_to_peft(
            spec,
            spec.config_to_file(config, layers)
            if spec.wraps_layers
            else spec.config_to_file(config, self.model_adapters[name]),
            base_model=self.base_model_name(),
            task_type=fmt.task_type_of(self.model),
        )
        identity = self.identity(name, dataset_hash=dataset_hash, training=training)
        return fmt.write_adapter(path, config_json, self.adapter_state_dict(name), identity.to_metadata())

    def identity(
        self,
        name: str | None = None,
        *,
        dataset_hash: str | None = None,
        training: dict[str, Any] | None = None,
    ) -> AdapterIdentity:
        """Adapter `name`'s identity record, as `save_adapter` writes it."""
        name = self._one_adapter(name)
        return AdapterIdentity(
            peftkit_version=__version__,
            method=method_for(self.configs[name]).name,
            adapter_name=name,
            base_model=self.base_model_name() or "",
            base_fingerprint=self.base_fingerprint(),
            base_quantization=self.base.quantization,
            dataset_hash=dataset_hash,
            training=AdapterIdentity.for_training(training or {}),
        )

    save_pretrained = save_adapter

    def _inject(
        self,
        name: str,
        spec: MethodSpec,
        config: Any,
        targets: list[Target],
        *,
        trainable: bool,
        dtype: torch.dtype | None,
    ) -> None:
        # A whole-model adapter is made first: making it can still fail (a prompt's init text), and a
        # refusal must leave the model as it was.
        made = spec.make_model_adapter(self.model, config) if spec.make_model_adapter is not None else None
        if not self.configs:  # the first adapter freezes the base (after its targets were validated)
            for p in self.model.parameters():
                p.requires_grad_(False)
        if bias_choice(config) != "none":
            self.base_fingerprint()  # before training changes the biases it covers
        for t in targets:
            layer = get_module(self.model, t.name)
            if not isinstance(layer, spec.layer_cls):
                assert spec.wrap is not None
                layer = spec.wrap(layer, t.kind, self.state).train(layer.training)
                set_module(self.model, t.name, layer)
            layer.add_adapter(name, config, t.name, dtype=dtype)
        if made is not None:
            self.model_adapters[name] = made.requires_grad_(trainable)
        for module_name, _ in find_modules_to_save(self.model, saved_modules_of(config), strict=False):
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

    def combine(
        self, adapters: list[str], weights: list[float], name: str, how: str = "svd", **options: Any
    ) -> Any:
        """Add adapter `name` combined from LoRA `adapters` (HF PEFT's `add_weighted_adapter`); how:
        linear, cat, svd, ties, dare_linear, dare_ties; options: density, rank (svd), seed (dare).
        Returns a `CombineResult` (for svd, the delta's relative reconstruction error)."""
        from ..methods.lora_combine import combine_adapters

        return combine_adapters(self, adapters, weights, name, how, **options)

    # -- the adapters ---------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """Names of all attached adapters, in the order they were added."""
        return list(self.configs)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names, in order (their weights: `active_weights`)."""
        return list(self.state.active)

    @property
    def active_weights(self) -> dict[str, float]:
        """{active adapter: its inference weight}; 1.0 for adapters activated by name."""
        return active_weights(self)

    def adapter_config(self, name: str | None = None) -> Any:
        return self.configs[self._one_adapter(name)]

    def set_adapter(self, names: str | list[str] | Mapping[str, float]) -> None:
        """Make `names` the active adapter(s); several active adapters add up. A {name: weight} mapping
        weights each one's change (y = base + Σ w·Δ; LoRA and rsLoRA, see `peftkit.core.weights`)."""
        self.state.activate(*activation(self, names))

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; layers left with no adapter get their plain module back.

        Deleting the only active adapter makes the first remaining adapter active (as HF PEFT does),
        with a warning that says which: running the base model instead would go unnoticed."""
        self.check_exists(name)
        if name in self.merged_adapters:
            raise AdapterStateError(
                f"adapter {name!r} is merged into the weights; unmerge() before deleting it"
            )
        for module_name, wrapper in list(self.wrappers()):
            wrapper.delete_adapter(name)
            if not wrapper.specs:
                set_module(self.model, module_name, _inner(wrapper))
        if name in self.model_adapters:
            del self.model_adapters[name]
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
        for _, layer in self.adapter_layers():
            names.update(dict.fromkeys(layer.merged))
        return list(names)

    def merge(self, names: str | list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights, each with the weight it is
        active with (`set_adapter({...})`; 1 otherwise). Idempotent; `unmerge` restores the exact
        original weights."""
        names = check_mergeable(self, names)
        layers = [m for _, m in self.adapter_layers() if any(n in m.specs for n in names)]
        for module_name, layer in self.adapter_layers():
            if layer in layers and is_quantized(layer.base_layer):
                raise AdapterStateError(
                    f"{module_name}'s base weight is 4-bit; merging into it would mean re-quantizing, which "
                    "loses almost all of a small update. Use merge_and_unload(), which merges into a "
                    "dequantized copy, or `peftkit merge --quantize nf4`"
                )
        for layer in layers:
            layer.merge(names)

    def unmerge(self) -> None:
        """Restore the exact pre-merge base weights."""
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, names: str | list[str] | None = None) -> nn.Module:
        """Merge adapters into the weights and return the plain base model (no adapter code left).

        A 4-bit base layer is first replaced by a dequantized copy (in its compute dtype), and the
        adapter merges into that: re-quantizing would keep only a sliver of a small update."""
        chosen = check_mergeable(self, names)  # checked before the first layer changes
        for _, layer in self.adapter_layers():
            if is_quantized(layer.base_layer) and any(n in layer.specs for n in chosen):
                layer.base_layer = dense_copy(layer.base_layer)
        self.merge(names)
        merged = self.merged_adapters
        for module_name, wrapper in list(self.wrappers()):
            if isinstance(wrapper, ModulesToSave):
                chosen = next((n for n in merged if n in wrapper.modules_to_save), None)
                plain = wrapper.modules_to_save[chosen] if chosen else wrapper.original_module
            else:
                wrapper.unmerged_weight = None
                if hasattr(wrapper, "unmerged_bias"):
                    wrapper.unmerged_bias = None
                plain = wrapper.base_layer
            set_module(self.model, module_name, plain)
        self.configs.clear()
        self.model_adapters.clear()
        self.state.active = ()
        if merged:  # the weights changed: this is no longer the base the fingerprint describes
            self.base.fingerprint = None
        return self.model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        self.unmerge()
        for module_name, wrapper in list(self.wrappers()):
            set_module(self.model, module_name, _inner(wrapper))
        self.configs.clear()
        self.model_adapters.clear()
        self.state.active = ()
        return self.model

    # -- running ----------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[AdapterChoice] | None = None, **kwargs: Any) -> Any:
        """The adapted forward: the base model's, with whole-model adapters (soft prompts, prefixes)
        fed in; `adapter_names` (one per row: a name, a {name: weight} mapping, None = base model) mixes
        adapters. Training, evaluation and generation all run through here (or `adapted_inputs`), so
        every method acts in all three."""
        if adapter_names is None:
            return self._forward(args, kwargs)
        with self.mixed_batch(adapter_names, batch_rows(args, kwargs)):
            return self._forward(args, kwargs)

    def _forward(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        rows = prefix_rows(self.state, self.model_adapters, self.model, batch_rows(args, kwargs))
        if rows is None:
            return self.model(*args, **kwargs)
        return self.model(**prefix_inputs(self.model, as_kwargs(args, kwargs), rows))

    def adapted_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's keyword arguments with the whole-model adapters that apply right now (a
        prefix cache, the longer attention mask, shifted positions); `kwargs` itself if none does.
        Also for calls into part of the model (training's fused loss runs the backbone alone)."""
        rows = prefix_rows(self.state, self.model_adapters, self.model, batch_rows((), kwargs))
        return kwargs if rows is None else prefix_inputs(self.model, kwargs, rows)

    def generate(self, *args: Any, adapter_names: list[AdapterChoice] | None = None, **kwargs: Any) -> Any:
        """The base model's `generate`, optionally with one adapter (or weighted set) per row of the batch."""
        if adapter_names is None:
            return self._generate(args, kwargs)
        expand, rows = generate_expansion(self.model, kwargs), batch_rows(args, kwargs)
        names = row_choices(self, adapter_names)
        if expand > 1 and rows is not None and len(names) == rows * expand:
            names = one_name_per_row(names, expand)
        with self.mixed_batch(names, rows, expand=expand):
            return self._generate(args, kwargs)

    def _generate(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        rows = prefix_rows(
            self.state, self.model_adapters, self.model, batch_rows(args, kwargs), generating=True
        )
        with fast_decoding(self.model):  # a 4-bit base decodes without dequantizing at every token
            if rows is None:
                return self.model.generate(*args, **kwargs)
            return generate_with_prefix(self.model, rows, **as_kwargs(args, kwargs))

    @contextmanager
    def mixed_batch(
        self, adapter_names: list[AdapterChoice], batch_size: int | None = None, *, expand: int = 1
    ) -> Iterator[None]:
        """Route row i of every batch inside this block through adapter_names[i]: an adapter, a weighted
        set {name: weight} (LoRA adapters), or None (the base model).

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
        rows = row_choices(self, adapter_names)
        if self.merged_adapters:
            raise AdapterStateError(
                f"adapters {self.merged_adapters} are merged; a mixed batch needs unmerged adapters (unmerge() first)"
            )
        before = self.state.rows
        self.state.rows = RowRouting.from_names(rows, expand=expand)
        try:
            yield
        finally:
            self.state.rows = before

    # -- the base model -----------------------------------------------------------------------------
    @property
    def base(self) -> BaseFacts:
        """What is known of the base model: its name, fingerprint (once computed), quantization and
        stored dtype (`peftkit.base.facts`); the same value `load_base` recorded on the model."""
        from ..base.facts import base_facts

        return base_facts(self.model)

    def base_model_name(self) -> str | None:
        name = self.base.name
        config = getattr(self.model, "config", None)
        return name or (getattr(config, "_name_or_path", None) or None)

    def base_fingerprint(self) -> str:
        """The base model's fingerprint (config + unmerged weights), computed once and cached."""
        cached = self.base.fingerprint
        if cached:
            return cached
        from ..base.fingerprint import fingerprint_tensors

        config = getattr(self.model, "config", None)
        fp = fingerprint_tensors(
            config.to_dict() if hasattr(config, "to_dict") else None, self.base_tensors()
        )
        self.base.fingerprint = fp
        return fp

    def base_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """The plain base model's state (names and original, unmerged weights), without adapters."""
        originals = {  # while an adapter is merged, the weights (and biases, for IA³) before it
            f"{n}.base_layer.{what}": getattr(m, f"unmerged_{what}")
            for n, m in self.adapter_layers()
            for what in ("weight", "bias")
            if getattr(m, f"unmerged_{what}", None) is not None
        }
        adapter_parts = {id(t) for _, t in self._adapter_parts()}
        for key, value in self.model.state_dict(keep_vars=True).items():
            if id(value) in adapter_parts or ".modules_to_save." in key:
                continue
            value = originals.get(key, value).detach()
            yield key.replace(".base_layer.", ".").replace(".original_module.", "."), value

    def parameter_roles(self) -> dict[int, tuple[MethodSpec, str]]:
        """{id(parameter): (its method, its role)} for every adapter parameter (the optimizer's groups)."""
        out: dict[int, tuple[MethodSpec, str]] = {}
        for _, layer in self.adapter_layers():
            spec = method_of_layer(layer)
            for name in layer.specs:
                out.update({id(p): (spec, role) for role, p in layer.adapter_tensors(name).items()})
        for name, adapter in self.model_adapters.items():
            spec = method_for(self.configs[name])
            out.update({id(p): (spec, role) for role, p in adapter.adapter_tensors().items()})
        return out

    def _adapter_parts(self) -> Iterator[tuple[str, Tensor]]:
        """Every adapter tensor inside the base model's modules (each layer's, for every adapter)."""
        for module_name, layer in self.adapter_layers():
            for name in layer.specs:
                for role, t in layer.adapter_tensors(name).items():
                    yield f"{module_name}.{role}", t

    # -- state dicts ----------------------------------------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, Tensor]:
        """Adapter `name`'s tensors under their PEFT file keys (live parameters, not copies)."""
        out: dict[str, Tensor] = {}
        for module_name, wrapper in self.wrappers():
            if is_adapter_layer(wrapper) and name in wrapper.specs:
                spec = method_of_layer(wrapper)
                for role, p in wrapper.adapter_tensors(name).items():
                    out[fmt.layer_key(module_name, spec.key_suffix(role, wrapper.kind))] = p
            elif isinstance(wrapper, ModulesToSave) and name in wrapper.modules_to_save:
                for pname, p in wrapper.modules_to_save[name].state_dict(keep_vars=True).items():
                    out[fmt.saved_module_key(module_name, pname)] = p
        if name in self.model_adapters:
            for role, p in self.model_adapters[name].adapter_tensors().items():
                out[fmt.model_key(role)] = p
        bias = bias_choice(self.configs[name]) if name in self.configs else "none"
        adapter_parts = {id(t) for _, t in self._adapter_parts()}
        for pname, p in self.model.named_parameters():
            if (
                id(p) not in adapter_parts
                and is_base_bias(pname)
                and (
                    bias == "all"
                    or (bias == "lora_only" and pname.endswith(".base_layer.bias") and self._has(pname, name))
                )
            ):
                out[fmt.bias_key(pname)] = p
        return out

    def wrappers(self) -> Iterator[tuple[str, Any]]:
        """(plain module name, wrapper) for every adapter layer and modules_to_save wrapper."""
        for name, module in self.model.named_modules():
            if getattr(module, "is_adapter_wrapper", False):
                yield _plain_name(name), module

    def adapter_layers(self) -> Iterator[tuple[str, Any]]:
        """(plain module name, layer) for every method's adapter layer."""
        for name, module in self.wrappers():
            if is_adapter_layer(module):
                yield name, module

    def _has(self, bias_name: str, adapter: str) -> bool:
        module = get_module(self.model, bias_name.removesuffix(".base_layer.bias"))
        return is_adapter_layer(module) and adapter in module.specs

    def _check_new_name(self, name: str) -> None:
        problem = adapter_name_problem(name, self.configs)
        if problem:
            fix = f", or delete_adapter({name!r}) first" if name in self.configs else ""
            raise ConfigError(f"adapter name {name!r} {problem}{fix}")

    def check_exists(self, name: str) -> None:
        """Raise AdapterNotFoundError (naming the attached ones) unless adapter `name` is attached."""
        if name not in self.configs:
            raise AdapterNotFoundError(
                f"no adapter named {name!r}; attached adapters: {self.adapters or 'none'}"
            )

    def _one_adapter(self, name: str | None) -> str:
        if name is not None:
            self.check_exists(name)
            return name
        if len(self.configs) == 1:
            return next(iter(self.configs))
        if self.state.active:
            return self.state.active[0]
        raise AdapterStateError(f"several adapters are attached ({self.adapters}); name the one you mean")


def _inner(wrapper: nn.Module) -> nn.Module:
    return wrapper.original_module if isinstance(wrapper, ModulesToSave) else wrapper.base_layer


def _plain_name(wrapped_name: str) -> str:
    """A module's name in the plain model, from its name in the wrapped one."""
    parts = [p for p in wrapped_name.split(".") if p not in ("base_layer", "original_module")]
    return ".".join(parts)
