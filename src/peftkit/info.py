"""Facts about a saved adapter, from its files alone (`peftkit info`): no base model is loaded.

facts = adapter_info("out/demo/adapter-best")   # a JSON-ready dict
print(format_info(facts))                       # the text report
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .terminal import printable

# Projections of a transformer block in the order they run, so targets read naturally.
_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """What `peftkit info` reports, as a JSON-ready dict.

    The rank `r` is read from the tensors (what the adapter really is); `config_r` is what
    adapter_config.json says, and `rank_mismatches` lists the layers where the two disagree (such
    an adapter does not load)."""
    from .base.fingerprint import is_fingerprint, short_fingerprint
    from .formats import peft as fmt
    from .formats.files import dtype_name

    files = fmt.read_adapter(adapter_dir)
    config = fmt.config_from_peft(files.config, files.directory)
    targets = fmt.lora_modules(files.tensors)
    ranks = _tensor_ranks(files.tensors, targets)
    r = _main_rank(ranks, config)
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in targets}, key=_layer_order)
    fingerprint = files.metadata.get("peftkit_base_fingerprint", "")
    saved_by_peftkit = "peftkit_version" in files.metadata
    peft_version = files.config.get("peft_version")
    return {
        "path": str(files.directory),
        "method": "DoRA" if config.use_dora else "rsLoRA" if config.use_rslora else "LoRA",
        "r": r,
        "config_r": config.r,
        "rank_pattern": config.rank_pattern,
        "rank_mismatches": [
            {"module": m, "config": config.rank_and_alpha(m)[0], "tensors": rank}
            for m, rank in ranks.items()
            if rank != config.rank_and_alpha(m)[0]
        ],
        "lora_alpha": config.lora_alpha,
        "alpha_pattern": config.alpha_pattern,
        "scaling": config.scaling(r, config.lora_alpha),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "target_layers": len(targets),
        "target_suffixes": suffixes,
        "modules_to_save": list(config.modules_to_save or []),
        "parameters": sum(t.numel() for t in files.tensors.values()),
        "dtypes": sorted({dtype_name(t.dtype) for t in files.tensors.values()}),
        "size_bytes": (files.directory / fmt.WEIGHTS_FILE).stat().st_size,
        "base_model": files.config.get("base_model_name_or_path") or files.metadata.get("peftkit_base_model"),
        "base_fingerprint": fingerprint if is_fingerprint(fingerprint) else None,
        "base_fingerprint_short": short_fingerprint(fingerprint) if is_fingerprint(fingerprint) else None,
        "adapter_name": files.metadata.get("peftkit_adapter_name"),
        "saved_by": f"peftkit {files.metadata['peftkit_version']}"
        if saved_by_peftkit
        else f"HF PEFT {peft_version}"
        if peft_version
        else "unknown (no peftkit metadata)",
    }


def _tensor_ranks(tensors: dict[str, Any], modules: list[str]) -> dict[str, int]:
    """Each LoRA module's rank: the first dimension of its A factor ((r, in) for linear layers,
    (r, in, k...) for convolutions, (r, vocab) for embeddings)."""
    from .formats import peft as fmt

    ranks = {}
    for m in modules:
        key = next(
            k for kind in ("linear", "embedding") if (k := fmt.factor_key(m, kind, "lora_A")) in tensors
        )
        ranks[m] = int(tensors[key].shape[0])
    return ranks


def _main_rank(ranks: dict[str, int], config: Any) -> int:
    """The rank most layers have, among those no rank_pattern entry overrides (config.r if none)."""
    plain = [rank for m, rank in ranks.items() if config.rank_and_alpha(m)[0] == config.r]
    counts = Counter(plain or ranks.values())
    return counts.most_common(1)[0][0] if counts else config.r


def _layer_order(suffix: str) -> tuple[int, str]:
    return (_ORDER.index(suffix) if suffix in _ORDER else len(_ORDER), suffix)


def format_info(facts: dict[str, Any]) -> str:
    """`peftkit info`'s text report. Every value is made printable: names and metadata come from the
    files, and a terminal would run the escape sequences a file can hide in them."""
    f = facts
    scaling_rule = "lora_alpha / sqrt(r)" if f["use_rslora"] else "lora_alpha / r"
    alpha = f"{f['lora_alpha']:g} (scaling {f['scaling']:g} = {scaling_rule})"
    if f["alpha_pattern"]:
        alpha += f", overrides {f['alpha_pattern']}"
    fingerprint = f["base_fingerprint_short"] or (
        "unknown (saved by HF PEFT)" if f["saved_by"].startswith("HF PEFT") else "unknown"
    )
    rows = [
        ("adapter", f["path"] + (f"  (name {f['adapter_name']!r})" if f["adapter_name"] else "")),
        ("method", f["method"] + (" with rsLoRA scaling" if f["use_dora"] and f["use_rslora"] else "")),
        ("rank", _rank_text(f)),
        ("lora_alpha", alpha),
        ("targets", f"{', '.join(f['target_suffixes'])} ({f['target_layers']} layers)"),
        ("modules_to_save", ", ".join(f["modules_to_save"]) or "none"),
        ("parameters", f"{f['parameters']:,}"),
        ("dtype", ", ".join(f["dtypes"])),
        ("size on disk", f"{_human_bytes(f['size_bytes'])} (adapter_model.safetensors)"),
        ("base model", f["base_model"] or "unknown"),
        ("base fingerprint", fingerprint),
        ("saved by", f["saved_by"]),
    ]
    return "\n".join(f"{key:<17}{printable(str(value))}" for key, value in rows)


def _rank_text(f: dict[str, Any]) -> str:
    text = f"r = {f['r']}" + (f", overrides {f['rank_pattern']}" if f["rank_pattern"] else "")
    wrong = f["rank_mismatches"]
    if wrong:
        first = wrong[0]
        text += (
            f"; adapter_config.json disagrees for {len(wrong)} layer{'s' * (len(wrong) > 1)} (e.g. {first['module']}: "
            f"config r = {first['config']}, tensors r = {first['tensors']}), so the adapter will not load"
        )
    return text


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError
