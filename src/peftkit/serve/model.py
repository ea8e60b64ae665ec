"""The base model as the engine runs it: one forward over a step's tokens (decode tokens of many
sequences plus one prefill chunk), a preallocated KV cache with one row per running sequence, and
served linear layers that route each token to its adapter's slot.

It reuses the HF model's weights and modules (embeddings, norms, rotary embedding, MLP activation)
but not its forward: no HF cache objects, no padding, no per-step Python beyond one call per layer.
Llama-family decoders (llama, mistral, qwen2: pre-norm, rotary, grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import RequestError
from .slots import FusedLinears, ServedLinear, StepSlots, packed_product

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


@dataclass
class StepLayout:
    """Where a step's tokens go: `decode_rows[i]` is decode token i's cache row and `decode_lens[i]`
    its sequence length including that token; after the decode tokens come prefill chunks, each
    (row, start, length): `length` prompt tokens of the sequence in `row`, from position `start`."""

    decode_rows: Tensor  # (d,) long
    decode_lens: Tensor  # (d,) long
    prefill: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def chunk(self) -> int:
        return sum(length for _, _, length in self.prefill)


def rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotary embedding: x·cos + rotate_half(x)·sin, as x·cos + roll(x)·(−sin₁, sin₂), which is the
    same numbers in one op fewer than rotate_half's slices, negation and concatenation."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """An HF Llama-family RMSNorm through torch's fused kernel: the same numbers as its forward (which
    is eight ops), computed in fp32 and rounded back before the weight, as HF does."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        return norm(x)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * norm.weight


class ServedModel(nn.Module):
    """A causal LM's decoder layers with served linears and a KV cache of `rows` sequences of up
    to `max_len` tokens."""

    def __init__(self, model: nn.Module, rows: int, max_len: int, capacity: int, max_rank: int) -> None:
        super().__init__()
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED:
            raise RequestError(
                f"the server's engine runs {', '.join(SUPPORTED)} models, not {config.model_type!r}"
            )
        window = getattr(config, "sliding_window", None)
        if window is not None and max_len > window:
            raise RequestError(
                f"this model attends over a sliding window of {window} tokens and the engine attends over "
                f"the whole sequence: start the server with max_len at most {window}"
            )
        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.lm_head = packed_product(model.lm_head.weight)  # no bias in these models' heads
        self.linears: dict[str, ServedLinear] = {}  # module name in the HF model -> served layer
        self.layers = []
        for i, layer in enumerate(inner.layers):
            served = {}
            for block, names in PROJECTIONS.items():
                for name in names:
                    linear = ServedLinear(getattr(getattr(layer, block), name), capacity, max_rank)
                    self.linears[f"model.layers.{i}.{block}.{name}"] = served[name] = linear
            for name in ("o_proj", "down_proj"):  # the others are products of their fused group
                served[name].pack()
            served["qkv"] = FusedLinears([served["q_proj"], served["k_proj"], served["v_proj"]])
            served["gate_up"] = FusedLinears([served["gate_proj"], served["up_proj"]])
            attn = layer.self_attn  # qwen3 normalises each head's queries and keys before rotary
            served["head_norms"] = (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))
            self.layers.append(
                (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp.act_fn, served)
            )
        attn = inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scaling = attn.scaling
        self.max_len = max_len
        weight = model.lm_head.weight
        shape = (len(self.layers), rows, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.v_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)

    @staticmethod
    def kv_bytes_per_token(model: nn.Module) -> int:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return (
            2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.lm_head.weight.element_size()
        )

    @staticmethod
    def slot_bytes(model: nn.Module, max_rank: int) -> int:
        """The memory one adapter slot takes over every served linear: A and B at max_rank, and the
        per-channel scales (allocated only when an adapter uses them; counted here)."""
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
        h, m = c.hidden_size, c.intermediate_size
        shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, m), (h, m), (m, h)]  # (in, out) per projection
        per_layer = sum(max_rank * (i + o) + i + 2 * o for i, o in shapes)
        return per_layer * c.num_hidden_layers * model.lm_head.weight.element_size()

    def forward(
        self, ids: Tensor, positions: Tensor, rt: StepSlots, layout: StepLayout, last: Tensor
    ) -> Tensor:
        """Logits (M, vocab) in fp32 at the tokens `last` indexes, after writing every token's keys and
        values to the cache. ids, positions: (N,)."""
        h = self.embed(ids)  # (N, hidden)
        cos, sin = self.rotary(h, positions[None])  # (1, N, D) each
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin = cos[0][:, None], sin[0][:, None]  # (N, 1, D): broadcast over heads
        rows = self._token_rows(layout)
        masks = self._masks(layout, h.device)
        for index, (norm1, norm2, act, p) in enumerate(self.layers):
            x = rms_norm(norm1, h)
            q, k, v = p["qkv"](x, rt)
            q = q.reshape(-1, self.heads, self.head_dim)  # (N, H, D)
            k = k.reshape(-1, self.kv_heads, self.head_dim)  # (N, KVH, D)
            v = v.reshape(-1, self.kv_heads, self.head_dim)
            q_norm, k_norm = p["head_norms"]
            if q_norm is not None:
                q, k = rms_norm(q_norm, q), rms_norm(k_norm, k)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            self.k_cache[index, rows, :, positions] = k
            self.v_cache[index, rows, :, positions] = v
            attn = self._attention(index, q, layout, masks)  # (N, H·D)
            h = h + p["o_proj"](attn, rt)
            x = rms_norm(norm2, h)
            gate, up = p["gate_up"](x, rt)
            h = h + p["down_proj"](act(gate) * up, rt)
        return self.lm_head(rms_norm(self.norm, h[last])).float()

    def _token_rows(self, layout: StepLayout) -> Tensor:
        parts = [layout.decode_rows] + [
            torch.full((n,), row, dtype=torch.long) for row, _, n in layout.prefill
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _masks(self, layout: StepLayout, device: torch.device) -> tuple[Tensor | None, list[Tensor]]:
        """Decode: an additive fp32 mask (R, 1, 1, L), 0 or -inf, over the rows [lo, lo + R) the decode
        tokens' rows span (a row without a decode token sees its position 0 only, and is dropped
        after). Prefill: one boolean mask per chunk (length, start + length), causal."""
        decode = None
        if len(layout.decode_rows):
            rows = layout.decode_rows
            lo, hi = int(rows.min()), int(rows.max()) + 1
            lens = torch.ones(hi - lo, dtype=torch.long)
            lens[rows - lo] = layout.decode_lens
            span = int(layout.decode_lens.max())
            hidden = torch.arange(span) >= lens[:, None]  # (R, L)
            decode = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))[:, None, None]
            decode = decode.to(device)
        prefill = []
        for _, start, length in layout.prefill:
            query_pos = torch.arange(start, start + length)
            prefill.append((torch.arange(start + length)[None] <= query_pos[:, None]).to(device))
        return decode, prefill

    def _attention(self, index: int, q: Tensor, layout: StepLayout, masks: tuple) -> Tensor:
        d = len(layout.decode_rows)
        outs = []
        if d:
            outs.append(self._decode_attention(index, q[:d], layout.decode_rows, masks[0]))
        offset = d
        for (row, start, length), mask in zip(layout.prefill, masks[1], strict=True):
            end = start + length
            k = self.k_cache[index, row : row + 1, :, :end]  # (1, KVH, L, D): a view
            v = self.v_cache[index, row : row + 1, :, :end]
            qp = q[offset : offset + length].transpose(0, 1)[None]  # (1, H, C, D)
            out = F.scaled_dot_product_attention(
                qp, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True
            )
            outs.append(out[0].transpose(0, 1).reshape(length, -1))
            offset += length
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _decode_attention(self, index: int, q: Tensor, rows: Tensor, mask: Tensor) -> Tensor:
        """One query per sequence against its cached keys: plain matmuls over the rows the decode
        tokens span, which beats a fused kernel at query length 1. In fp32: converting the cache
        rows costs less than bf16's batched products at these shapes, and the scores and
        probabilities keep fp32 (HF's eager attention rounds both to the model's dtype)."""
        lo, span = int(rows.min()), mask.shape[-1]
        count = mask.shape[0]
        k = self.k_cache[index, lo : lo + count, :, :span].float()  # (R, KVH, L, D)
        v = self.v_cache[index, lo : lo + count, :, :span].float()
        group = self.heads // self.kv_heads
        in_order = len(rows) == count and bool((rows == torch.arange(lo, lo + count)).all())
        if in_order:  # every row of the span decodes, in row order (the common case): no scatter
            full = q.float()
        else:
            full = q.new_zeros(count, self.heads, self.head_dim, dtype=torch.float32)
            full[rows - lo] = q.float()
        full = full.view(count, self.kv_heads, group, self.head_dim)  # (R, KVH, G, D)
        scores = torch.matmul(full, k.transpose(-1, -2)).mul_(self.scaling).add_(mask)  # (R, KVH, G, L)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (R, KVH, G, D)
        out = out.reshape(count, -1) if in_order else out.reshape(count, -1)[rows - lo]
        return out.to(q.dtype)  # (d, H·D)
