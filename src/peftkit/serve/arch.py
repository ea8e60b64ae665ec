"""The architectures the engine serves, as a table: HF `model_type` -> where the engine finds a
decoder's parts (layers, norms, rotary embedding, the projections of each block) and its attention
geometry. The engine's forward (model.py) is its own; it reads the HF modules through an entry.

Every entry today is a Llama-family decoder (pre-norm, rotary, grouped-query attention, gated MLP);
another one of that shape is one more entry. An architecture not in the table is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..errors import RequestError


@dataclass(frozen=True)
class Geometry:
    """Attention's shape: query heads, key/value heads, each head's width, and the score scale."""

    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


@dataclass(frozen=True)
class Architecture:
    """Where a causal LM keeps what the engine reads, by attribute name. The decoder (`model.decoder`)
    holds embeddings, layers, final norm and rotary embedding; each layer an attention block and an
    MLP block, whose projections are named by the part they play in the engine's forward."""

    decoder: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    rotary: str = "rotary_emb"
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")  # before attention, MLP
    attention: str = "self_attn"
    qkv: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")  # read the same input: one product
    out: str = "o_proj"
    mlp: str = "mlp"
    gate_up: tuple[str, str] = ("gate_proj", "up_proj")  # read the same input: one product
    down: str = "down_proj"
    act: str = "act_fn"  # the MLP's activation, on the gate
    head_norms: tuple[str, str] | None = None  # per-head norms of queries and keys before rotary

    def projections(self) -> dict[str, tuple[str, ...]]:
        """Block attribute -> its served linears, in the order the engine lists them."""
        return {self.attention: (*self.qkv, self.out), self.mlp: (*self.gate_up, self.down)}

    def geometry(self, model: nn.Module) -> Geometry:
        """The attention geometry as the HF modules have it (head width and scale from the layer)."""
        attn = getattr(getattr(self.inner(model), self.layers)[0], self.attention)
        config = model.config
        return Geometry(config.num_attention_heads, config.num_key_value_heads, attn.head_dim, attn.scaling)

    def inner(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.decoder)

    def shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one layer, from the config alone."""
        d = head_dim(config)
        q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
        h, m = config.hidden_size, config.intermediate_size
        (q_name, k_name, v_name), (gate, up) = self.qkv, self.gate_up
        return {q_name: (h, q), k_name: (h, kv), v_name: (h, kv), self.out: (q, h),
                gate: (h, m), up: (h, m), self.down: (m, h)}  # fmt: skip


LLAMA = Architecture()
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": replace(LLAMA, head_norms=("q_norm", "k_norm")),  # normalises each head's queries and keys
}


def architecture(config: Any) -> Architecture:
    """The table's entry for a model's config, or a RequestError naming what the engine runs."""
    entry = ARCHITECTURES.get(getattr(config, "model_type", None))
    if entry is None:
        raise RequestError(
            f"the server's engine runs {', '.join(ARCHITECTURES)} models, not {config.model_type!r}"
        )
    return entry


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
