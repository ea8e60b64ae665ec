"""An adapter's identity: which method, which base (name, fingerprint, quantization), which data, which
training run, which peftkit. Written into and read from one place: the safetensors header of
`adapter_model.safetensors`, as `peftkit_*` text entries (HF PEFT and vLLM ignore them).

    identity = AdapterIdentity.from_metadata(files.metadata)
    identity.base_fingerprint, identity.base_quantization, identity.training.get("step")
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_PREFIX = "peftkit_"
# Header keys of the typed fields (their names stay as the first peftkit release wrote them).
_KEYS = {
    "peftkit_version": "version",
    "method": "method",
    "adapter_name": "adapter_name",
    "base_model": "base_model",
    "base_fingerprint": "base_fingerprint",
    "base_quantization": "base_quantization",
    "dataset_hash": "dataset_hash",
}


@dataclass(frozen=True)
class AdapterIdentity:
    """What an adapter is and where it came from. Every field is None for a file another tool wrote."""

    peftkit_version: str | None = None  # the peftkit that saved it
    method: str | None = None  # the registered method's name ("lora", "ia3", ...)
    adapter_name: str | None = None
    base_model: str | None = None  # the base's name as loaded (a built-in name, a path, a hub id)
    base_fingerprint: str | None = None  # of the checkpoint, before any quantization
    base_quantization: str | None = None  # "nf4" when trained on a 4-bit base, else None
    dataset_hash: str | None = None  # the training data's hash, when trained by `peftkit train`
    training: dict[str, str] = field(default_factory=dict)  # other facts of the run (step, dataset, ...)

    @property
    def saved_by_peftkit(self) -> bool:
        return self.peftkit_version is not None

    def to_metadata(self) -> dict[str, str]:
        """The safetensors header entries (text only, as the format requires)."""
        out = {f"{_PREFIX}{k}": str(v) for k, v in self.training.items()}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "training" and value is not None:
                out[f"{_PREFIX}{_KEYS[f.name]}"] = str(value)
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> AdapterIdentity:
        """The identity in a safetensors header; unknown `peftkit_*` entries are training facts."""
        by_key = {key: field_name for field_name, key in _KEYS.items()}
        values: dict[str, Any] = {}
        training: dict[str, str] = {}
        for key, value in metadata.items():
            if not key.startswith(_PREFIX):
                continue
            short = key.removeprefix(_PREFIX)
            name = by_key.get(short)
            if name is not None:
                values[name] = value or None
            else:
                training[short] = value
        return cls(**values, training=training)

    @classmethod
    def for_training(cls, facts: dict[str, Any]) -> dict[str, str]:
        """A training run's facts as the `training` mapping: plain values only, as text."""
        skip = {"base_fingerprint", "dataset_hash", "base_quantization"}
        return {k: str(v) for k, v in facts.items() if k not in skip and not isinstance(v, (dict, list))}
