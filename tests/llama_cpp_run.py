"""Running exported GGUF files in real llama.cpp (llama-cpp-python) next to peftkit, for the export tests.

Both sides are given token ids, not text, so a comparison of logits is a comparison of the models;
llama.cpp keeps its KV cache in float32 here (its default, f16, alone moves logits by ~1e-3).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

F32 = 0  # GGML_TYPE_F32, for the KV cache


@contextmanager
def llama(path: Path, lora: Path | None = None, n_ctx: int = 256) -> Iterator[object]:
    """A llama.cpp model on one thread (closed after: its destructor at exit prints an error)."""
    import llama_cpp

    extra = {"lora_path": str(lora)} if lora is not None else {}
    llm = llama_cpp.Llama(
        str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1, type_k=F32, type_v=F32, **extra
    )
    try:
        yield llm
    finally:
        llm.close()


def cpp_logits(llm: object, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` (a fresh sequence). (T, vocab)"""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def torch_logits(model: object, ids: list[int]) -> np.ndarray:
    """peftkit's (or any HF model's) logits for every position of `ids`. (T, vocab)"""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def cpp_greedy(llm: object, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` in llama.cpp."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def torch_greedy(model: object, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` from an HF model (full recompute each step: small inputs only)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(torch_logits(model, seq)[-1].argmax()))
    return seq[len(ids) :]


def top1_agreement(llm: object, model: object, ids: list[int], n: int) -> float:
    """The share of positions of peftkit's greedy continuation where llama.cpp, fed the same prefix,
    picks the same next token (teacher-forced, so one early difference does not decide the rest)."""
    continuation = torch_greedy(model, ids, n)
    seq = ids + continuation
    picks = cpp_logits(llm, seq)[len(ids) - 1 : -1].argmax(axis=-1)
    return float(np.mean(picks == np.array(continuation)))
