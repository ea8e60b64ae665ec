"""The engine's KV cache: every layer's keys and values for `rows` sequences of up to `max_len`
tokens, allocated once. A running sequence owns one row; a step writes each token's key and value at
its (row, position), and attention reads views of the rows it needs (no copies, no cache objects)."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values, (layers, rows, KVH, max_len, D) each."""

    def __init__(
        self,
        layers: int,
        rows: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (layers, rows, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, element_size: int) -> int:
        """What one token of one row takes: a key and a value in every layer."""
        return 2 * layers * kv_heads * head_dim * element_size

    def write(self, layer: int, rows: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Each token's key and value at its row and position; rows, positions (N,), k, v (N, KVH, D)."""
        self.k[layer, rows, :, positions] = k
        self.v[layer, rows, :, positions] = v

    def write_prefix(self, row: int, keys: Tensor, values: Tensor) -> None:
        """An adapter's key/value prefix (layers, KVH, P, D) at the start of a row, every layer."""
        self.k[:, row, :, : keys.shape[2]] = keys
        self.v[:, row, :, : values.shape[2]] = values

    def rows(self, layer: int, lo: int, count: int, length: int) -> tuple[Tensor, Tensor]:
        """Views of rows [lo, lo + count) up to `length` positions: (count, KVH, length, D) each."""
        return self.k[layer, lo : lo + count, :, :length], self.v[layer, lo : lo + count, :, :length]
