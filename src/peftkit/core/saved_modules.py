"""`modules_to_save`: whole modules (e.g. a classification head) trained in full by an adapter.

The wrapper keeps the original module and one trainable copy per adapter; the active adapter's copy
runs, the original runs when adapters are disabled or none of the active ones has a copy.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .rows import AdapterState


class ModulesToSave(nn.Module):
    """The original module plus per-adapter copies (PEFT's attribute names, so keys line up)."""

    is_adapter_wrapper = True

    def __init__(self, original_module: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.state = state

    @property
    def specs(self) -> dict[str, None]:
        return dict.fromkeys(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        """Give adapter `name` its own trainable copy of the original module."""
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if state.disabled:
            return self.original_module(x, *args, **kwargs)
        if state.rows is not None:
            return self._forward_mixed(x, *args, **kwargs)
        for name in state.active:
            if name in self.modules_to_save:
                return self.modules_to_save[name](x, *args, **kwargs)
        return self.original_module(x, *args, **kwargs)

    def _forward_mixed(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # A whole module can be anything, so rows are grouped per adapter (one call per adapter in the
        # batch), unlike the LoRA layers' single gathered product.
        routing = self.state.rows
        assert routing is not None
        repeat = routing.repeat_for(x.shape[0])
        out = self.original_module(x, *args, **kwargs)
        for i, name in enumerate(routing.unique):
            if name not in self.modules_to_save:
                continue
            rows = (routing.row_to_unique == i).repeat_interleave(repeat).to(x.device)
            idx = torch.nonzero(rows).flatten()
            out = out.index_copy(0, idx, self.modules_to_save[name](x[idx], *args, **kwargs).to(out.dtype))
        return out
