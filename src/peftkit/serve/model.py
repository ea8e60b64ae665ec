"""The base model as the engine runs it: one forward over a step's tokens (decode tokens of many
sequences plus prefill chunks) through served linear layers that route each token to its adapter's
slot, with the keys and values in a preallocated KV cache (kv_cache.py).

It reuses the HF model's weights and modules (embeddings, norms, rotary embedding, MLP activation),
found through the architecture table (arch.py), but not its forward: no HF cache objects, no padding,
no per-step Python beyond one call per layer. The step's tokens go through every projection and MLP
together; only attention differs: `decode` for the decode tokens, `prefill_chunk` for each chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import RequestError
from .arch import Geometry, architecture, head_dim
from .kv_cache import KVCache
from .slots import SLOT_ROLES, FusedLinears, ServedLinear, packed_product
from .step import Chunk, Decode, Step


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


def decode(cache: KVCache, layer: int, q: Tensor, dec: Decode, g: Geometry) -> Tensor:
    """Attention of one query per sequence against its cached keys (d, H, D) -> (d, H·D): plain
    matmuls over the rows the decode tokens span, which beats a fused kernel at query length 1. In
    fp32: converting the cache rows costs less than bf16's batched products at these shapes, and the
    scores and probabilities keep fp32 (HF's eager attention rounds both to the model's dtype)."""
    k, v = cache.rows(layer, dec.lo, dec.count, dec.span)
    k, v = k.float(), v.float()  # (R, KVH, L, D)
    if dec.in_order:  # every row of the span decodes, in row order: no scatter
        full = q.float()  # (R, H, D)
    else:
        full = q.new_zeros(dec.count, g.heads, g.head_dim, dtype=torch.float32)  # (R, H, D)
        full[dec.within] = q.float()
    full = full.view(dec.count, g.kv_heads, g.heads // g.kv_heads, g.head_dim)  # (R, KVH, G, D)
    scores = torch.matmul(full, k.transpose(-1, -2)).mul_(g.scaling).add_(dec.mask)  # (R, KVH, G, L)
    out = torch.matmul(torch.softmax(scores, dim=-1), v).reshape(dec.count, -1)  # (R, H·D)
    return (out if dec.in_order else out[dec.within]).to(q.dtype)  # (d, H·D)


def prefill_chunk(cache: KVCache, layer: int, q: Tensor, chunk: Chunk, g: Geometry) -> Tensor:
    """Causal attention of one chunk of a sequence's prompt (C, H, D) over its cached keys, those of
    the chunk included -> (C, H·D)."""
    k, v = cache.rows(layer, chunk.row, 1, chunk.start + chunk.length)  # (1, KVH, L, D): views
    qp = q.transpose(0, 1)[None]  # (1, H, C, D)
    out = F.scaled_dot_product_attention(
        qp, k, v, attn_mask=chunk.mask, scale=g.scaling, enable_gqa=True
    )  # (1, H, C, D)
    return out[0].transpose(0, 1).reshape(chunk.length, -1)


def attention(cache: KVCache, layer: int, q: Tensor, step: Step, g: Geometry) -> Tensor:
    """The step's attention, (N, H, D) -> (N, H·D): its decode tokens, then each prefill chunk."""
    outs = [decode(cache, layer, q[: step.decode.tokens], step.decode, g)] if step.decode else []
    for chunk in step.prefill:
        outs.append(prefill_chunk(cache, layer, q[chunk.offset : chunk.offset + chunk.length], chunk, g))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


@dataclass
class ServedLayer:
    """One decoder layer as the engine runs it: its HF norms and activation, its served linears."""

    norms: tuple[nn.Module, nn.Module]  # before attention, before the MLP
    head_norms: tuple[nn.Module, nn.Module] | None
    qkv: FusedLinears
    out: ServedLinear
    gate_up: FusedLinears
    down: ServedLinear
    act: Callable[[Tensor], Tensor]


class ServedModel(nn.Module):
    """A causal LM's decoder layers with served linears and a KV cache of `rows` sequences of up
    to `max_len` tokens."""

    def __init__(self, model: nn.Module, rows: int, max_len: int, capacity: int, max_rank: int) -> None:
        super().__init__()
        arch, config = architecture(model.config), model.config
        window = getattr(config, "sliding_window", None)
        if window is not None and max_len > window:
            raise RequestError(
                f"this model attends over a sliding window of {window} tokens and the engine attends over "
                f"the whole sequence: start the server with max_len at most {window}"
            )
        inner = arch.inner(model)
        self.embed, self.norm = getattr(inner, arch.embed), getattr(inner, arch.final_norm)
        self.rotary = getattr(inner, arch.rotary)
        self.lm_head = packed_product(model.lm_head.weight)  # no bias in these models' heads
        self.linears: dict[str, ServedLinear] = {}  # module name in the HF model -> served layer
        self.layers: list[ServedLayer] = []
        for i, layer in enumerate(getattr(inner, arch.layers)):
            served = {}
            for block, names in arch.projections().items():
                for name in names:
                    linear = ServedLinear(getattr(getattr(layer, block), name), capacity, max_rank)
                    self.linears[f"{arch.decoder}.{arch.layers}.{i}.{block}.{name}"] = served[name] = linear
            attn, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
            served[arch.out].pack()  # the others are products of their fused group
            served[arch.down].pack()
            self.layers.append(ServedLayer(
                norms=(getattr(layer, arch.norms[0]), getattr(layer, arch.norms[1])),
                head_norms=arch.head_norms and (getattr(attn, arch.head_norms[0]), getattr(attn, arch.head_norms[1])),
                qkv=FusedLinears([served[n] for n in arch.qkv]), out=served[arch.out],
                gate_up=FusedLinears([served[n] for n in arch.gate_up]), down=served[arch.down],
                act=getattr(mlp, arch.act),
            ))  # fmt: skip
        self.geometry = g = arch.geometry(model)
        self.max_len = max_len
        weight = model.lm_head.weight
        self.cache = KVCache(
            len(self.layers), rows, g.kv_heads, max_len, g.head_dim, weight.dtype, weight.device
        )

    @staticmethod
    def kv_bytes_per_token(model: nn.Module) -> int:
        c = model.config
        size = model.lm_head.weight.element_size()
        return KVCache.bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, head_dim(c), size)

    @staticmethod
    def slot_bytes(model: nn.Module, max_rank: int) -> int:
        """The memory one adapter slot takes over every served linear: each role of the slot algebra
        at max_rank (the scales are allocated only when an adapter uses them; counted here)."""
        c = model.config
        per_layer = 0
        for fan_in, fan_out in architecture(c).shapes(c).values():
            size = {"r": max_rank, "in": fan_in, "out": fan_out}
            per_layer += sum(math.prod(size[d] for d in role.dims) for role in SLOT_ROLES.values())
        return per_layer * c.num_hidden_layers * model.lm_head.weight.element_size()

    def forward(self, step: Step) -> Tensor:
        """Logits (M, vocab) in fp32 at the tokens `step.last` indexes, after writing every token's
        keys and values to the cache."""
        h = self.embed(step.ids)  # (N, hidden)
        cos, sin = self.rotary(h, step.positions[None])  # (1, N, D) each
        half = self.geometry.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin = cos[0][:, None], sin[0][:, None]  # (N, 1, D): broadcast over heads
        for index, layer in enumerate(self.layers):
            h = self._layer(index, layer, h, cos, sin, step)
        return self.lm_head(rms_norm(self.norm, h[step.last])).float()

    def _layer(self, index: int, p: ServedLayer, h: Tensor, cos: Tensor, sin: Tensor, step: Step) -> Tensor:
        """One pre-norm decoder layer over the step's tokens: h (N, hidden) -> (N, hidden)."""
        g, rt = self.geometry, step.slots
        q, k, v = p.qkv(rms_norm(p.norms[0], h), rt)
        q = q.reshape(-1, g.heads, g.head_dim)  # (N, H, D)
        k = k.reshape(-1, g.kv_heads, g.head_dim)  # (N, KVH, D)
        v = v.reshape(-1, g.kv_heads, g.head_dim)
        if p.head_norms is not None:
            q, k = rms_norm(p.head_norms[0], q), rms_norm(p.head_norms[1], k)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        self.cache.write(index, step.rows, step.positions, k, v)
        h = h + p.out(attention(self.cache, index, q, step, g), rt)  # (N, hidden)
        gate, up = p.gate_up(rms_norm(p.norms[1], h), rt)
        return h + p.down(p.act(gate) * up, rt)
