"""Choosing each sequence's next token from its logits, as the OpenAI API describes the parameters:
temperature 0 is greedy; otherwise the logits are divided by the temperature, the smallest set of
tokens whose probabilities reach `top_p` is kept, and one is drawn (with the request's own generator
when it gave a seed). Log-probabilities are of the model's own distribution (before temperature)."""

from __future__ import annotations

import torch
from torch import Tensor

from .types import SamplingParams

# Below this temperature the distribution is one token at float32 precision (and dividing by it
# would overflow, or underflow to a division by zero): such a request is decoded greedily.
GREEDY_BELOW = 1e-4


def sample(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[tuple[int, float | None, dict[int, float]]]:
    """(token, its logprob or None, the top-k logprobs) for each row of `logits` (M, vocab), fp32."""
    greedy = logits.argmax(dim=-1).tolist()
    logprobs = None
    if any(p.logprobs is not None for p in params):
        logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for i, p in enumerate(params):
        token = greedy[i] if p.temperature < GREEDY_BELOW else _draw(logits[i], p, generators[i])
        chosen, top = None, {}
        if p.logprobs is not None and logprobs is not None:
            chosen = float(logprobs[i, token])
            if p.logprobs:
                values, indices = logprobs[i].topk(p.logprobs)
                top = dict(zip(indices.tolist(), values.tolist(), strict=True))
        out.append((token, chosen, top))
    return out


def _draw(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    # Shifted so the largest logit is 0 first: a tiny temperature then sends the others to -inf (so,
    # greedy), never the largest to +inf (which would make the softmax NaN).
    probs = torch.softmax((logits - logits.max()) / p.temperature, dim=-1)  # (vocab,)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # the smallest prefix reaching top_p
        keep[0] = True  # the most likely token always stays (a top_p that rounds to 0 keeps only it)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
