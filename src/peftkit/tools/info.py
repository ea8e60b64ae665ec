"""Facts about a saved adapter, from its files alone (`peftkit info`): no base model is loaded.

facts = adapter_info("out/demo/adapter-best")   # a JSON-ready dict
print(format_info(facts))                       # the text report
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..terminal import printable

# Projections of a transformer block in the order they run, so targets read naturally.
_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_info(adapter_dir: str | Path, registry: str | None = None) -> dict[str, Any]:
    """What `peftkit info` reports, as a JSON-ready dict: the facts every adapter has, then its
    method's own (for LoRA: `r` read from the tensors, `config_r` from adapter_config.json, and
    `rank_mismatches` where the two disagree, which keeps such an adapter from loading)."""
    from ..base.fingerprint import is_fingerprint, short_fingerprint
    from ..formats import peft as fmt
    from ..formats.files import dtype_name
    from ..identity import AdapterIdentity
    from ..registry.paths import adapter_path

    files = fmt.read_adapter(adapter_path(adapter_dir, registry))  # a directory, or a registry reference
    spec, config = fmt.config_from_peft(files.config, files.directory)
    identity = AdapterIdentity.from_metadata(files.metadata)
    modules = spec.file_layers(fmt.layer_keys(files.tensors)) if spec.wraps_layers else []
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in modules}, key=_layer_order)
    fingerprint = identity.base_fingerprint or ""
    peft_version = files.config.get("peft_version")
    return {
        "path": str(files.directory),
        "method": spec.describe_method(config) if spec.describe_method else spec.label,
        "method_name": spec.name,
        **(spec.describe(config, files.tensors, modules) if spec.describe else {}),
        "target_layers": len(modules),
        "target_suffixes": suffixes,
        "modules_to_save": list(getattr(config, "modules_to_save", None) or []),
        "parameters": sum(t.numel() for t in files.tensors.values()),
        "dtypes": sorted({dtype_name(t.dtype) for t in files.tensors.values()}),
        "size_bytes": (files.directory / fmt.WEIGHTS_FILE).stat().st_size,
        "base_model": files.config.get("base_model_name_or_path") or identity.base_model,
        "base_fingerprint": fingerprint if is_fingerprint(fingerprint) else None,
        "base_fingerprint_short": short_fingerprint(fingerprint) if is_fingerprint(fingerprint) else None,
        "base_quantization": identity.base_quantization,
        "adapter_name": identity.adapter_name,
        "saved_by": f"peftkit {identity.peftkit_version}"
        if identity.saved_by_peftkit
        else f"HF PEFT {peft_version}"
        if peft_version
        else "unknown (no peftkit metadata)",
    }


def _layer_order(suffix: str) -> tuple[int, str]:
    return (_ORDER.index(suffix) if suffix in _ORDER else len(_ORDER), suffix)


def format_info(facts: dict[str, Any]) -> str:
    """`peftkit info`'s text report. Every value is made printable: names and metadata come from the
    files, and a terminal would run the escape sequences a file can hide in them."""
    from ..methods import METHODS

    f = facts
    spec = METHODS[f["method_name"]]
    fingerprint = f["base_fingerprint_short"] or (
        "unknown (saved by HF PEFT)" if f["saved_by"].startswith("HF PEFT") else "unknown"
    )
    targets = (
        f"{', '.join(f['target_suffixes'])} ({f['target_layers']} layers)" if f["target_layers"] else None
    )
    base = f["base_model"] or "unknown"
    if f["base_quantization"]:
        base += f" (trained on its {f['base_quantization']} 4-bit form)"
    rows = [
        ("adapter", f["path"] + (f"  (name {f['adapter_name']!r})" if f["adapter_name"] else "")),
        ("method", f["method"] + f.get("method_note", "")),
        *(spec.info_rows(f) if spec.info_rows else []),
        *([("targets", targets)] if targets else []),
        ("modules_to_save", ", ".join(f["modules_to_save"]) or "none"),
        ("parameters", f"{f['parameters']:,}"),
        ("dtype", ", ".join(f["dtypes"])),
        ("size on disk", f"{_human_bytes(f['size_bytes'])} (adapter_model.safetensors)"),
        ("base model", base),
        ("base fingerprint", fingerprint),
        ("saved by", f["saved_by"]),
    ]
    return "\n".join(f"{key:<17}{printable(str(value))}" for key, value in rows)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError
