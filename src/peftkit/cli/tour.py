"""`peftkit tour`: the adapter library at work on a real model, with every claim checked as it runs.

The adapters here are untrained (zero-initialised, or random): they show the mechanics (attach,
switch, disable, mixed batches, merge, save, inspect, export), not learned skills. Training is
`peftkit train` (and `peftkit demo`).

float32 is the default because it measured both faster and exact here: on the 2-core AVX-512/AMX CPU
the whole tour took ~29 s in float32 and ~46 s in bfloat16, and in bfloat16 the mixed-batch and
merged generations drift from the per-adapter ones (different rounding order, amplified by greedy
decoding), while in float32 they match token for token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..core.adapted import AdaptedModel
from ..core.rows import BASE
from ..methods import LoraConfig, LoraLayer

PROMPTS = (
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Give me one tip for sleeping better.",
)
RANK, ALPHA = 16, 32
# Std of the random lora_B entries of adapters A and B: at 0.02 SmolLM2-135M stays fluent but visibly changes.
RANDOM_B_STD = 0.02


@dataclass
class Report:
    """Prints the tour's sections and keeps score of its checks."""

    checks: list[tuple[str, bool]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def line(self, text: str = "") -> None:
        print(f"   {text}" if text else "", flush=True)

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((what, ok))
        self.line(f"[{'ok' if ok else 'FAILED'}] {what}{f' ({detail})' if detail else ''}")
        return ok


@dataclass
class Session:
    """What every step shares: the report, the tokenizer, the prompts as a batch, and a greedy `gen`."""

    r: Report
    tok: Any
    batch: dict[str, Tensor]  # the chat prompts, left-padded: input_ids and attention_mask, (N, T)
    max_new_tokens: int

    def gen(self, model: Any, batch: dict[str, Tensor] | None = None, **kwargs: Any) -> Tensor:
        """Greedy continuations of `batch` (default: the prompts), (N, max_new_tokens)."""
        return generate(
            model, self.tok, self.batch if batch is None else batch, self.max_new_tokens, **kwargs
        )


def run_tour(
    model: str = "smollm2-135m",
    out: Path = Path("out/tour"),
    dtype: str = "float32",
    max_new_tokens: int = 20,
) -> bool:
    """Run the tour and print its report; True when every check passed."""
    from transformers.utils import logging as hf_logging

    check_tour_args(model, Path(out), max_new_tokens)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    r = Report()
    print(f"peftkit tour: base {model!r}, {dtype}, {torch.get_num_threads()} CPU threads, greedy decoding")
    s, base, base_out = load_step(r, model, dtype, max_new_tokens)
    am, trainable = attach_step(s, base, base_out)
    outs = adapters_step(s, am, base_out)
    mixed_batch_step(s, am, outs)
    adapter_dir = save_step(s, am, Path(out), trainable)
    merged_out = merge_step(s, am, outs["A"])
    export_step(s, model, adapter_dir, Path(out), dtype, merged_out)
    passed = sum(ok for _, ok in r.checks)
    print(f"\n{passed}/{len(r.checks)} checks passed; tour took {time.perf_counter() - r.start:.0f} s")
    return passed == len(r.checks)


def check_tour_args(model: str, out: Path, max_new_tokens: int) -> None:
    """Refuse what would fail only after the tour's slow steps: a token count below 1, and output
    directories that cannot be written, lie inside the base model, or hold something other than what
    the tour replaces there (a model in merged-A, an adapter in adapter-A)."""
    from ..base.save import check_model_out_dir
    from ..errors import RequestError
    from ..io import unwritable_reason
    from ..paths import input_clash, input_paths

    if max_new_tokens < 1:
        raise RequestError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    inputs = input_paths(model)
    for path in (out / "adapter-A", out / "merged-A"):
        clash = input_clash(path, inputs)
        if clash:
            raise RequestError(f"the tour writes {path}, which {clash}; choose another --out")
    reason = unwritable_reason(out)
    if reason:
        raise RequestError(f"--out {out} cannot be written: {reason}")
    check_model_out_dir(out / "merged-A", overwrite=True)
    adapter = out / "adapter-A"  # save_adapter replaces an adapter there, and refuses other files
    if adapter.is_dir() and any(adapter.iterdir()) and not any(adapter.glob("adapter_*")):
        raise RequestError(
            f"the tour saves an adapter to {adapter}, which holds other files; choose another --out"
        )


# -- steps ---------------------------------------------------------------------------------------
def load_step(r: Report, model: str, dtype: str, max_new_tokens: int) -> tuple[Session, Any, Tensor]:
    from ..base import load_base

    r.section("1. Load the base model")
    t0 = time.perf_counter()
    base, tok = load_base(model, dtype=dtype)
    seconds = time.perf_counter() - t0
    tok.padding_side = "left"  # generation continues from the right edge of every row
    total = sum(p.numel() for p in base.parameters())
    r.line(f"{type(base).__name__}, {total / 1e6:.1f}M parameters, on {base.device}: {seconds:.1f} s")
    s = Session(r, tok, chat_batch(tok, PROMPTS, base.device), max_new_tokens)
    t0 = time.perf_counter()
    base_out = s.gen(base)
    r.line(
        f"greedy generation, {len(PROMPTS)} prompts x {max_new_tokens} tokens: {time.perf_counter() - t0:.1f} s"
    )
    return s, base, base_out


def attach_step(s: Session, base: Any, base_out: Tensor) -> tuple[AdaptedModel, int]:
    s.r.section(f"2. Attach a LoRA adapter: r={RANK}, lora_alpha={ALPHA}, every linear layer")
    am = AdaptedModel.attach(base, LoraConfig(r=RANK, lora_alpha=ALPHA), name="zero")
    trainable, total = am.trainable_parameters()
    layers = sum(isinstance(m, LoraLayer) for m in am.modules())
    s.r.line(
        f"{layers} layers adapted; trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )
    s.r.check(
        "a zero-initialised adapter (B = 0) leaves greedy generation unchanged",
        torch.equal(s.gen(am), base_out),
    )
    am.delete_adapter("zero")
    return am, trainable


def adapters_step(s: Session, am: AdaptedModel, base_out: Tensor) -> dict[str | None, Tensor]:
    s.r.section("3. Two adapters A and B with random weights (untrained: they show mechanics, not skills)")
    for i, name in enumerate(("A", "B")):
        random_adapter(am, name, seed=i + 1)
    s.r.line(f"A, B: r={RANK}, lora_B ~ N(0, {RANDOM_B_STD}^2), so each visibly changes the model's output")

    s.r.section("4. Generate with the base model, adapter A and adapter B (set_adapter / disable_adapters)")
    outs: dict[str | None, Tensor] = {}
    with am.disable_adapters():
        outs[None] = s.gen(am)
    for name in ("A", "B"):
        am.set_adapter(name)
        outs[name] = s.gen(am)
    s.r.check("disable_adapters() gives the base model's output", torch.equal(outs[None], base_out))
    for i, prompt in enumerate(PROMPTS):
        s.r.line(f"{prompt!r}")
        for name, label in ((None, BASE), ("A", "A"), ("B", "B")):
            s.r.line(f"   {label:<4} -> {decode(s.tok, outs[name][i])!r}")
    a, b, ab = (
        differing(outs[None], outs["A"]),
        differing(outs[None], outs["B"]),
        differing(outs["A"], outs["B"]),
    )
    n = len(PROMPTS)
    s.r.check(
        "A and B each change the generations, and differently",
        a > 0 and b > 0 and ab > 0,
        f"A differs from base on {a}/{n} prompts, B on {b}/{n}, A from B on {ab}/{n}",
    )
    return outs


def mixed_batch_step(s: Session, am: AdaptedModel, outs: dict[str | None, Tensor]) -> None:
    s.r.section(
        "5. One mixed batch: each row picks its adapter, all rows decoded in a single generate() call"
    )
    names, n = [None, "A", "B"], len(PROMPTS)
    mixed = {k: v.repeat(len(names), 1) for k, v in s.batch.items()}  # (3N, T): base rows, A rows, B rows
    row_names = [name for name in names for _ in range(n)]
    t0 = time.perf_counter()
    out = s.gen(am, mixed, adapter_names=row_names)
    s.r.line(f"adapter_names = {row_names}: {time.perf_counter() - t0:.1f} s")
    same = [torch.equal(out[i], outs[row_names[i]][i % n]) for i in range(len(row_names))]
    s.r.check(
        "every row equals the same prompt generated with that adapter alone",
        all(same),
        f"{sum(same)}/{len(same)} rows",
    )


def save_step(s: Session, am: AdaptedModel, out: Path, trainable: int) -> Path:
    from ..tools.info import adapter_info, format_info

    s.r.section("6. Save adapter A (HF PEFT format) and inspect it: `peftkit info`")
    path = am.save_adapter(out / "adapter-A", "A")
    s.r.line(f"wrote {path}: {', '.join(sorted(p.name for p in path.iterdir()))}")
    s.r.line(f"$ peftkit info {path}")
    facts = adapter_info(path)
    for text in format_info(facts).splitlines():
        s.r.line("  " + text)
    s.r.check(
        "the file holds exactly the trainable parameter count of step 2", facts["parameters"] == trainable
    )
    return path


def merge_step(s: Session, am: AdaptedModel, unmerged_out: Tensor) -> Tensor:
    s.r.section("7. Merge adapter A into the weights (zero inference overhead) and compare")
    am.set_adapter("A")
    timing_batch = {k: v.repeat(2, 1) for k, v in s.batch.items()}
    with torch.inference_mode():
        unmerged_logits = am(**s.batch).logits.float()
        unmerged_s = time_forward(am, timing_batch)
        am.merge("A")
        merged_logits = am(**s.batch).logits.float()
        merged_s = time_forward(am, timing_batch)
    merged_out = s.gen(am)
    real = s.batch["attention_mask"].bool()  # left padding: compare the logits of real tokens only
    diff = (merged_logits - unmerged_logits)[real].abs().max().item()
    dtype = str(am.model.dtype).removeprefix("torch.")
    shape = tuple(timing_batch["input_ids"].shape)
    s.r.line(
        f"forward pass on {shape} tokens: unmerged {unmerged_s * 1e3:.0f} ms, merged {merged_s * 1e3:.0f} ms"
    )
    s.r.line(f"largest logit difference merged vs unmerged: {diff:.3g} (W + s*B*A is rounded to {dtype})")
    same = sum(torch.equal(x, y) for x, y in zip(merged_out, unmerged_out, strict=True))
    s.r.check(
        "merged generation equals unmerged generation", same == len(PROMPTS), f"{same}/{len(PROMPTS)} prompts"
    )
    return merged_out


def export_step(s: Session, model: str, adapter_dir: Path, out: Path, dtype: str, merged_out: Tensor) -> None:
    from transformers import AutoModelForCausalLM

    from ..tools.merge import merge_to_dir

    s.r.section("8. Export a merged model (`peftkit merge`) and reload it with plain transformers")
    s.r.line(f"$ peftkit merge {model} {adapter_dir} {out / 'merged-A'} --dtype {dtype} --overwrite")
    log: Callable[[str], None] = lambda message: s.r.line("  " + message)
    merged_dir = merge_to_dir(model, adapter_dir, out / "merged-A", dtype=dtype, overwrite=True, log=log)
    size = sum(p.stat().st_size for p in merged_dir.iterdir() if p.is_file())
    s.r.line(
        f"wrote {merged_dir} ({size / 1e6:.0f} MB): {', '.join(sorted(p.name for p in merged_dir.iterdir()))}"
    )
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, dtype)).eval()
    same = sum(torch.equal(x, y) for x, y in zip(s.gen(plain), merged_out, strict=True))
    s.r.check(
        "AutoModelForCausalLM.from_pretrained(merged dir) generates what the merged adapter did",
        same == len(PROMPTS),
        f"{same}/{len(PROMPTS)} prompts",
    )


# -- helpers ---------------------------------------------------------------------------------------
def chat_batch(tok: Any, prompts: tuple[str, ...], device: torch.device) -> dict[str, Tensor]:
    """The prompts as one left-padded batch, each wrapped in the tokenizer's chat template."""
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def generate(model: Any, tok: Any, batch: dict[str, Tensor], max_new_tokens: int, **kwargs: Any) -> Tensor:
    """Greedy continuations, (N, max_new_tokens) token ids (padded after an early end)."""
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs
        )
    return out[:, batch["input_ids"].shape[1] :]


def decode(tok: Any, ids: Tensor) -> str:
    return tok.decode(ids, skip_special_tokens=True).strip()


def random_adapter(am: AdaptedModel, name: str, seed: int) -> None:
    """A LoRA adapter with Gaussian A (std 1/r) and small random B: not a no-op, but the model stays fluent."""
    am.add_adapter(name, LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian"), trainable=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in am.modules():
            if isinstance(layer, LoraLayer) and name in layer.specs:
                b = layer.lora_B[name]
                b.copy_(torch.randn(b.shape, generator=g) * RANDOM_B_STD)


def differing(a: Tensor, b: Tensor) -> int:
    """How many rows of two (N, T) generations differ."""
    return sum(not torch.equal(x, y) for x, y in zip(a, b, strict=True))


def time_forward(model: Any, batch: dict[str, Tensor], repeats: int = 3) -> float:
    """Median seconds of one forward pass (after a warm-up)."""
    model(**batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tour(
    model: str = "smollm2-135m",
    out: Path = Path("out/tour"),
    dtype: Literal["float32", "bfloat16"] = "float32",
    max_new_tokens: int = 20,
) -> int:
    """Tour the adapter library on a real model in about a minute, checking every claim as it runs.

    Loads the base, attaches LoRA adapters, checks a zero-initialised adapter changes nothing,
    generates with two (untrained, random) adapters and with both in one mixed batch, merges,
    saves, inspects and exports a merged model that plain transformers reloads.

    Args:
        model: the base model (a built-in name, an HF model directory or a .gguf file)
        out: directory for the tour's files (the saved adapter and the merged model)
        dtype: compute dtype. bfloat16 runs matrix products faster on CPUs with AVX-512/AMX, but its
            rounding makes mixed-batch and merged generations drift from the per-adapter ones, so the
            tour's exact-equality checks can fail in bfloat16
        max_new_tokens: tokens to generate per prompt (greedy)
    """
    return 0 if run_tour(model=model, out=out, dtype=dtype, max_new_tokens=max_new_tokens) else 1
