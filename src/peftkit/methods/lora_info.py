"""What `peftkit info` says about a LoRA adapter, from its files alone: rank, alpha, scaling, targets."""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import Tensor

from .lora_config import LoraConfig

_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")


def file_layers(keys: list[str]) -> list[str]:
    """The module paths that carry LoRA factors, from a file's layer keys (prefix removed), sorted."""
    return sorted(k.removesuffix(s) for k in keys for s in _A_SUFFIXES if k.endswith(s))


def describe_method(config: LoraConfig) -> str:
    return "DoRA" if config.use_dora else "rsLoRA" if config.use_rslora else "LoRA"


def describe(config: LoraConfig, tensors: dict[str, Tensor], modules: list[str]) -> dict[str, Any]:
    """LoRA's facts. The rank `r` is read from the tensors (what the adapter really is); `config_r` is
    what adapter_config.json says, and `rank_mismatches` lists the layers where the two disagree."""
    ranks = _tensor_ranks(tensors, modules)
    r = _main_rank(ranks, config)
    return {
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
        "method_note": " with rsLoRA scaling" if config.use_dora and config.use_rslora else "",
    }


def info_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    """LoRA's lines of the text report."""
    scaling_rule = "lora_alpha / sqrt(r)" if f["use_rslora"] else "lora_alpha / r"
    alpha = f"{f['lora_alpha']:g} (scaling {f['scaling']:g} = {scaling_rule})"
    if f["alpha_pattern"]:
        alpha += f", overrides {f['alpha_pattern']}"
    return [("rank", _rank_text(f)), ("lora_alpha", alpha)]


def _tensor_ranks(tensors: dict[str, Any], modules: list[str]) -> dict[str, int]:
    """Each LoRA module's rank: the first dimension of its A factor ((r, in) for linear layers,
    (r, in, k...) for convolutions, (r, vocab) for embeddings)."""
    ranks = {}
    for m in modules:
        key = next(k for s in _A_SUFFIXES if (k := f"base_model.model.{m}{s}") in tensors)
        ranks[m] = int(tensors[key].shape[0])
    return ranks


def _main_rank(ranks: dict[str, int], config: LoraConfig) -> int:
    """The rank most layers have, among those no rank_pattern entry overrides (config.r if none)."""
    plain = [rank for m, rank in ranks.items() if config.rank_and_alpha(m)[0] == config.r]
    counts = Counter(plain or ranks.values())
    return counts.most_common(1)[0][0] if counts else config.r


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
