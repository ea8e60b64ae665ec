"""Perplexity on plain text, for many adapters at once: forgetting measure 1 of `peftkit compare`.

The text is tokenized once (no chat template: it is general English, not a conversation) and cut into
windows of `window` tokens; every (window, adapter) pair is a row of the same batches, each row routed
through its own adapter (None = the base model), as `peftkit.eval.run.evaluate` does for answers. A
window's first token has no context and is not scored; the rest are, each given the tokens before it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

LOGIT_BUDGET = 4096  # rows x window per forward pass: caps the (B, T, V) logits (V = 49k: 0.8 GB fp32)


def text_windows(tokenizer: Any, text: str, window: int) -> list[list[int]]:
    """The text's token ids in windows of exactly `window` tokens (the tail shorter than a window is
    dropped, so every row has the same length); one shorter window when the text is short."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]
    return windows or ([ids] if len(ids) >= 2 else [])


def text_perplexity(
    model: Any,
    windows: Sequence[Sequence[int]],
    adapters: Sequence[str | None],
    *,
    batch_size: int = 16,
) -> dict[str | None, tuple[float, int]]:
    """{adapter: (perplexity, tokens scored)} on `windows`, every adapter in the same mixed batches
    (`model` a plain causal LM when `adapters` is [None], else a peftkit.AdaptedModel)."""
    from peftkit.core.adapted import AdaptedModel

    rows = [(w, a) for w in windows for a in adapters]  # window-major: a batch holds equal-length rows
    per_batch = max(1, min(batch_size, LOGIT_BUDGET // max(len(w) for w in windows)))
    totals = {a: [0.0, 0] for a in adapters}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), per_batch):
                batch = rows[start : start + per_batch]
                ids = torch.tensor([w for w, _ in batch], device=device)  # (B, T)
                kw = {"adapter_names": [a for _, a in batch]} if isinstance(model, AdaptedModel) else {}
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits
                logits = logits[:, -ids.shape[1] :]  # (B, T, V): only the text's positions
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none"
                )  # (B, T-1): token t+1 predicted at t
                for (_, a), row in zip(batch, nll.sum(1).tolist(), strict=True):
                    totals[a][0] += row
                    totals[a][1] += ids.shape[1] - 1
    finally:
        model.train(was_training)
    return {a: (math.exp(s / n) if n else math.nan, n) for a, (s, n) in totals.items()}
