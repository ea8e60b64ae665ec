"""The HF PEFT on-disk format: the only module that knows its file names, key names and config keys.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. Keys look like
`base_model.model.<module path>.lora_A.weight` (`lora_embedding_A` for embeddings), DoRA's magnitude
is `<module path>.lora_magnitude_vector`, a modules_to_save copy is `<module path>.<param>`, and
trained biases keep their wrapped names (`<path>.base_layer.bias`). peftkit's own facts (the base
model's fingerprint) go into the safetensors metadata, which PEFT and vLLM ignore.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import AdapterFileError, ConfigError, ShapeMismatchError
from ..io import building_dir, copy_entries, is_nonempty_dir, write_json_atomic
from ..methods.lora_config import LoraConfig
from .files import read_json, read_safetensors, refuse_pickle, write_safetensors

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_LORA_SUFFIX = {
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
    "lora_magnitude": "lora_magnitude_vector",
}
_EMBEDDING_SUFFIX = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

# PEFT config keys that carry no meaning for loading trained weights.
_IGNORED_KEYS = {
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "peft_version",
    "megatron_core",
    "fan_in_fan_out",  # peftkit reads the layout from the layer type (GPT-2 Conv1D is transposed)
    "qalora_group_size",
    "ensure_weight_tying",
    "eva_config",  # EVA only chooses the initial values, which the file overrides
}
# Initialisations that only choose starting values (the file's weights override them).
_INIT_ONLY = {"eva", "orthogonal"}


@dataclass
class AdapterFiles:
    """The contents of an adapter directory, read and checked but not yet applied to any model."""

    directory: Path
    config: dict[str, Any]
    tensors: dict[str, Tensor]
    metadata: dict[str, str]


def factor_key(module_name: str, kind_name: str, role: str) -> str:
    """The file key of one LoRA parameter (role: lora_A, lora_B or lora_magnitude)."""
    table = _EMBEDDING_SUFFIX if kind_name == "embedding" and role in _EMBEDDING_SUFFIX else _LORA_SUFFIX
    return f"{PREFIX}{module_name}.{table[role]}"


def lora_modules(keys: list[str] | dict[str, object]) -> list[str]:
    """The module paths that carry LoRA factors in a file's keys, sorted."""
    a_suffixes = ("." + _LORA_SUFFIX["lora_A"], "." + _EMBEDDING_SUFFIX["lora_A"])
    return sorted(
        k.removeprefix(PREFIX).removesuffix(suffix)
        for k in keys
        for suffix in a_suffixes
        if k.endswith(suffix)
    )


def saved_module_key(module_name: str, param_name: str) -> str:
    """The file key of a parameter of a modules_to_save copy."""
    return f"{PREFIX}{module_name}.{param_name}"


def bias_key(wrapped_param_name: str) -> str:
    """The file key of a trained bias, from its name in the wrapped model."""
    return f"{PREFIX}{wrapped_param_name}"


def task_type_of(model: object) -> str | None:
    """PEFT's task_type for a transformers model class (it picks PEFT's model wrapper on load)."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        return None
    name = type(model).__name__
    tasks = {
        "CAUSAL_LM": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "SEQ_CLS": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "TOKEN_CLS": auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "SEQ_2_SEQ_LM": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        "QUESTION_ANS": auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    }
    for task, mapping in tasks.items():
        if any(name == v or (isinstance(v, tuple) and name in v) for v in mapping.values()):
            return task
    return None


def config_to_peft(
    config: LoraConfig,
    targets: list[str],
    *,
    fan_in_fan_out: bool,
    base_model: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    """The adapter_config.json for `config`, with target_modules resolved to the matched layers."""
    data = config.to_dict()
    data["target_modules"] = sorted(targets)
    data.update(
        peft_type="LORA",
        task_type=task_type,
        base_model_name_or_path=base_model,
        revision=None,
        inference_mode=True,
        fan_in_fan_out=fan_in_fan_out,
        lora_bias=False,
    )
    return data


def config_from_peft(data: dict[str, Any], source: Path) -> LoraConfig:
    """A LoraConfig from an adapter_config.json written by peftkit or HF PEFT (any recent version)."""
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterFileError(f"{source}: peft_type is {peft_type!r}; peftkit reads LORA adapters")
    known = set(LoraConfig.defaults())
    ours: dict[str, Any] = {}
    for key, value in data.items():
        if key in known:
            ours[key] = value
        elif key not in _IGNORED_KEYS and key != "peft_type" and value not in (None, False, {}, [], ""):
            raise AdapterFileError(
                f"{source}: the adapter uses {key}={value!r}, a PEFT feature peftkit does not support; "
                "load it with HF PEFT, or re-train without that option"
            )
    init = ours.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in _INIT_ONLY:
        ours["init_lora_weights"] = True
    elif isinstance(init, str) and init != "gaussian":
        raise AdapterFileError(
            f"{source}: init_lora_weights={init!r} changes the base model's weights (PiSSA/OLoRA/LoftQ/...); "
            "convert it to a plain LoRA with HF PEFT first (save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    if ours.get("layers_pattern") == []:
        ours["layers_pattern"] = None
    try:
        return LoraConfig.from_dict(ours)
    except ConfigError as e:
        raise AdapterFileError(f"{source}: {e}") from None


def read_adapter(path: str | Path) -> AdapterFiles:
    """Read an adapter directory (or its safetensors file), refusing pickles and corrupt files."""
    path = Path(path)
    refuse_pickle(path)
    directory = path.parent if path.is_file() else path
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory not found: {directory}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            refuse_pickle(directory / pickles[0])
        present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise AdapterFileError(f"no {WEIGHTS_FILE} in {directory} (it holds: {present})")
    config = read_json(directory / CONFIG_FILE, "adapter config")
    tensors, metadata = read_safetensors(weights)
    return AdapterFiles(directory, config, tensors, metadata)


def write_adapter(
    directory: str | Path, config: dict[str, Any], tensors: dict[str, Tensor], metadata: dict[str, str]
) -> Path:
    """Write an adapter directory: a new or empty one, or one that holds an adapter, replaced whole.

    The new directory is built beside the old one and swapped in (`io.replace_dir`), so a reader or
    a crash sees the complete old adapter or the complete new one, never new weights beside an old
    config. Other files of an existing adapter directory (a README, training sidecars) are carried
    over. Any other non-empty directory is refused: replacing it would move all of it (a project's
    `.git` included) for the sake of two files.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"cannot save the adapter to {directory}: it exists and is not a directory")
    cwd = Path.cwd().resolve()
    if directory.resolve() in (cwd, *cwd.parents):  # replacing it would leave the shell in a deleted one
        raise AdapterFileError(
            f"cannot save the adapter to {directory}: it is or holds the current working directory; "
            "save into a directory of its own, e.g. adapters/mine"
        )
    if is_nonempty_dir(directory) and not any((directory / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE)):
        held = sorted(p.name for p in directory.iterdir())
        raise AdapterFileError(
            f"cannot save the adapter to {directory}: it is a directory that holds other files "
            f"({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}) and no adapter; save into an "
            "empty directory or an adapter directory"
        )
    with building_dir(directory, if_exists="replace") as tmp:
        if directory.is_dir():  # (empty when it is the directory a training save is building)
            copy_entries(directory, tmp, skip={WEIGHTS_FILE, CONFIG_FILE})
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt", **metadata})
        write_json_atomic(tmp / CONFIG_FILE, config)
    return directory


def check_tensors(
    expected: dict[str, tuple[tuple[int, ...], str]], found: dict[str, Tensor], source: Path
) -> None:
    """Every expected key present with its shape, and nothing else: else an error naming the module.

    `expected` maps each key to (shape, a description such as "model.layers.0.q_proj (lora_A)").
    """
    for key, (shape, what) in expected.items():
        if key not in found:
            raise AdapterFileError(
                f"{source / WEIGHTS_FILE} has no weights for {what} (key {key!r}); "
                "the file is incomplete or its adapter_config.json does not match it"
            )
        if tuple(found[key].shape) != tuple(shape):
            raise ShapeMismatchError(
                f"{what}: this base model needs shape {tuple(shape)}, the adapter has {tuple(found[key].shape)} "
                f"(from {source}); the adapter was trained on a different base model or its config is wrong"
            )
    extra = [k for k in found if k not in expected]
    if extra:
        raise AdapterFileError(
            f"{source / WEIGHTS_FILE} holds {len(extra)} tensor(s) that match no targeted layer of this base "
            f"model, e.g. {extra[0]!r}; the adapter was made for a different model architecture"
        )
