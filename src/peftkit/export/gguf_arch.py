"""The model architectures the GGUF export writes, and what llama.cpp expects of each.

    arch = arch_of(model.config)                 # refuses what llama.cpp would not run the same way
    arch.tensor_name("model.layers.0.self_attn.q_proj.weight")     # "blk.0.attn_q.weight"
    arch.llama_rows("blk.0.attn_q.weight", w)    # q/k rows in llama.cpp's rotary order

Tensor names come from the `gguf` package's name map. One layout fact is not in that map: for the
`llama` architecture llama.cpp rotates adjacent pairs of each attention head's dimensions (x[2i],
x[2i+1]), while HF checkpoints rotate its two halves (x[i], x[i + d/2]). The same rotation over
reordered rows is the same attention, so q and k rows are reordered on export: row 2i of a head takes
HF row i and row 2i+1 takes HF row i + d/2. qwen2/qwen3 rotate halves in llama.cpp too (no reordering).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RequestError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # llama.cpp runs Mistral's dense models as llama
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
"""HF model class -> llama.cpp architecture: the classes the GGUF export writes."""

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class GgufArch:
    """One model's architecture as llama.cpp sees it, with the sizes the export needs."""

    name: str  # llama.cpp's architecture name (general.architecture)
    n_layers: int
    n_head: int
    n_kv_head: int
    head_dim: int
    config: Any  # the HF config it was read from

    def tensor_name(self, hf_name: str) -> str | None:
        """The GGUF name of an HF tensor ("model.norm.weight" -> "output_norm.weight"); None for a
        tensor llama.cpp does not load (rotary caches, a tied lm_head)."""
        return _name_map(self.name, self.n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def llama_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """`rows` (a q/k weight, bias or LoRA B: rows are output features) in llama.cpp's row order."""
        if self.name != "llama":
            return rows
        parts = gguf_name.split(".")  # blk.N.attn_q.weight
        heads = {"attn_q": self.n_head, "attn_k": self.n_kv_head}.get(parts[2] if len(parts) > 2 else "")
        if heads is None:
            return rows
        shape = rows.shape
        per_head = rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])  # (H, 2, d/2, ...)
        return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(shape)  # (H, d/2, 2, ...) flat

    def rope(self) -> dict[str, Any]:
        """The rotary settings: rope_theta, rope_type and its factors."""
        params = dict(getattr(self.config, "rope_parameters", None) or {})
        scaling = getattr(self.config, "rope_scaling", None) or {}
        params = {**scaling, **params}
        params.setdefault("rope_theta", getattr(self.config, "rope_theta", 10000.0))
        params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
        return params


@functools.cache
def _name_map(arch_name: str, n_layers: int) -> Any:
    """The `gguf` package's HF -> GGUF tensor name map of an architecture (built once: it is large)."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    return gguf.get_tensor_name_map(arch, n_layers)


def arch_of(config: Any) -> GgufArch:
    """The llama.cpp architecture of an HF config, or an error naming the supported ones."""
    classes = list(getattr(config, "architectures", None) or [])
    kind = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    kind |= {"qwen3": "Qwen3ForCausalLM"}
    name = next((ARCHITECTURES[c] for c in classes if c in ARCHITECTURES), None)
    if name is None and getattr(config, "model_type", None) in kind:
        name = ARCHITECTURES[kind[config.model_type]]
    if name is None:
        found = ", ".join(classes) or getattr(config, "model_type", None) or "an unknown architecture"
        raise RequestError(
            f"the GGUF export does not support {found}; it writes {', '.join(ARCHITECTURES)} "
            "(llama.cpp's llama, qwen2 and qwen3)"
        )
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    arch = GgufArch(
        name, config.num_hidden_layers, n_head, getattr(config, "num_key_value_heads", None) or n_head,
        head_dim, config,
    )  # fmt: skip
    rope = arch.rope()
    if rope["rope_type"] not in _ROPE_TYPES:
        raise RequestError(
            f"the GGUF export does not support rope_type {rope['rope_type']!r}; it writes "
            f"{', '.join(_ROPE_TYPES)}"
        )
    return arch


def write_hparams(writer: Any, arch: GgufArch, vocab_size: int) -> None:
    """The architecture's hyperparameters as GGUF metadata."""
    import gguf

    config = arch.config
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(arch.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_kv_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(arch.head_dim)
    if arch.head_dim * arch.n_head != config.hidden_size:  # e.g. Qwen3's 128-wide heads
        writer.add_key_length(arch.head_dim)
        writer.add_value_length(arch.head_dim)
    rope = arch.rope()
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def extra_tensors(arch: GgufArch) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the checkpoint has no weights for: Llama 3.1's rotary frequency
    factors (`rope_freqs.weight`, the divisor of each frequency under its "llama3" scaling)."""
    rope = arch.rope()
    if rope["rope_type"] != "llama3":
        return {}
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    divisors = []
    for i in range(0, arch.head_dim, 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (i / arch.head_dim)
        if wavelength < old_context / high:  # high frequencies: unchanged
            divisors.append(1.0)
        elif wavelength > old_context / low:  # low frequencies: stretched by the factor
            divisors.append(factor)
        else:  # in between: interpolated, as the HF and Meta implementations do
            smooth = (old_context / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.array(divisors, dtype=np.float32)}
