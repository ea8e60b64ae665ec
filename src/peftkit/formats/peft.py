"""The HF PEFT on-disk format: the only module that knows its file names, key names and config keys.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. A layer adapter's
keys are `base_model.model.<module path>.<suffix>`, the suffix given by its method for each role
(LoRA: `lora_A.weight`); a whole-model adapter's are bare (`prompt_embeddings`); a modules_to_save
copy is `<module path>.<param>`, and trained biases keep their wrapped names (`<path>.base_layer.bias`). peftkit's own facts (the base
model's fingerprint) go into the safetensors metadata, which PEFT and vLLM ignore.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import AdapterFileError, ShapeMismatchError
from ..io import building_dir, copy_entries, is_nonempty_dir, write_json_atomic
from ..methods.spec import MethodSpec
from .files import read_json, read_safetensors, refuse_pickle, write_safetensors

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# adapter_config.json keys every method's file may carry that say nothing about its weights.
_GENERIC_KEYS = {
    "peft_type",
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "peft_version",
}


@dataclass
class AdapterFiles:
    """The contents of an adapter directory, read and checked but not yet applied to any model."""

    directory: Path
    config: dict[str, Any]
    tensors: dict[str, Tensor]
    metadata: dict[str, str]


def layer_key(module_name: str, suffix: str) -> str:
    """The file key of a layer adapter's tensor: the module path, then the method's suffix for its role."""
    return f"{PREFIX}{module_name}.{suffix}"


def layer_keys(tensors: dict[str, object]) -> list[str]:
    """A file's keys under the layer prefix, with the prefix removed (whole-model keys left out)."""
    return [k.removeprefix(PREFIX) for k in tensors if k.startswith(PREFIX)]


def model_key(suffix: str) -> str:
    """The file key of a whole-model adapter's tensor (a soft prompt): HF PEFT stores these bare."""
    return suffix


def is_model_key(key: str) -> bool:
    """A whole-model adapter's key: everything else is under the module prefix."""
    return not key.startswith(PREFIX)


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
    spec: MethodSpec, method_part: dict[str, Any], *, base_model: str | None, task_type: str | None
) -> dict[str, Any]:
    """The adapter_config.json: the method's own fields, then the keys every PEFT file has."""
    return {
        **method_part,
        "peft_type": spec.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
    }


def method_of(data: dict[str, Any], source: Path) -> MethodSpec:
    """The registered method an adapter_config.json is for (files without peft_type are LoRA, as in
    the oldest PEFT releases)."""
    from ..methods import METHODS

    peft_type = data.get("peft_type", "LORA")
    for spec in METHODS.values():
        if spec.peft_type == peft_type:
            return spec
    readable = ", ".join(spec.peft_type for spec in METHODS.values())
    raise AdapterFileError(f"{source}: peft_type is {peft_type!r}; peftkit reads {readable} adapters")


def config_from_peft(data: dict[str, Any], source: Path) -> tuple[MethodSpec, Any]:
    """The method and its config from an adapter_config.json written by peftkit or HF PEFT."""
    spec = method_of(data, source)
    assert spec.config_from_file is not None
    return spec, spec.config_from_file({k: v for k, v in data.items() if k not in _GENERIC_KEYS}, source)


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
    check_adapter_out(directory)
    with building_dir(directory, if_exists="replace") as tmp:
        if directory.is_dir():  # (empty when it is the directory a training save is building)
            copy_entries(directory, tmp, skip={WEIGHTS_FILE, CONFIG_FILE})
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt", **metadata})
        write_json_atomic(tmp / CONFIG_FILE, config)
    return directory


def check_adapter_out(directory: Path) -> None:
    """Refuse, before any work, a place `write_adapter` may not write: a file, the working directory
    or one above it, a non-empty directory that holds no adapter."""
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
