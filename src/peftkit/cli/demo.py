"""`peftkit demo` (the main job): teach the default model a task with LoRA on this machine, then show
the before/after scores on held-out examples, the loss curve, and the adapter answering fresh
prompts. On a 2-core CPU the whole run takes a few minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch

from ..core.rows import BASE
from ..data.example import Message
from ..data.tasks import get_task
from ..errors import ConfigError
from ..io import is_nonempty_dir, write_json_atomic
from ..train.config import TrainConfig, save_config
from ..train.run_dir import check_run_dir, is_run_dir, local_inputs

# Fresh inputs for each task, written by hand (not produced by the task generator).
FRESH = {
    "dates": ["the 4th of July, 1976", "Sept. 9 2031", "1999/12/31", "Monday, 2 February 2015"],
    "extract": [
        "Hello, Jonas Weber here (Vienna). Where is my order KB-10392?",
        "Order ZP-55120 never showed up. - Ana Lima, Porto",
    ],
    "sentiment": ["Broke after two days and support never replied.", "Lovely colour and it works perfectly."],
}


def demo_config(task: str, steps: int, out: Path, base: str) -> TrainConfig:
    """The demo's training run: LoRA r=16 (alpha 32) on every linear layer, a short high-learning-rate
    schedule (lr 1e-3, 10% warmup, no dropout). These values were checked by a `peftkit tune` search
    of the demo's own run (examples/tune_demo.yaml; docs/benchmarks.md, "Tuning the demo's
    defaults"): no trial beat them on validation loss."""
    return TrainConfig(
        base=base,
        data=f"task:{task}",
        max_steps=steps,
        batch_size=8,
        lr=1e-3,
        warmup_ratio=0.1,
        eval_every=steps,
        val_fraction=val_fraction(task, steps),
        output_dir=str(out),
        tensorboard=True,
    )


def val_fraction(task: str, steps: int, batch: int = 8) -> float:
    """The share of the task's data validated on, proportionate to the run: as many examples as the run
    trains on (steps x batch), at least 16 and at most 100 (5% of a 2,000-example task, the default
    run's). A 3-step run validates on 24 examples, not 100."""
    total = len(get_task(task).examples("train"))
    wanted = min(max(steps * batch, 16), 100)
    return min(wanted / total, 0.05)


def check_demo_args(steps: int, n_test: int, min_score: float) -> None:
    """Refuse the demo's own numbers by their option names, before anything runs."""
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    if n_test < 1:
        raise ConfigError(f"--n-test must be at least 1 (held-out examples to score), got {n_test}")
    if not 0 <= min_score <= 1:
        raise ConfigError(f"--min-score is a score between 0 and 1 (0.9 = 90%), got {min_score}")


def run_demo(task: str, steps: int, out: Path, base: str, n_test: int, min_score: float) -> bool:
    """Train, evaluate base vs adapter on the held-out split, show fresh answers. True if the
    adapter reaches `min_score` on the held-out examples."""
    from ..eval.run import evaluate, format_table
    from ..tools.opening import open_model
    from ..train.loop import train

    started = time.perf_counter()
    check_demo_args(steps, n_test, min_score)
    spec = get_task(task)
    config = demo_config(task, steps, out, base)
    overwrite = claim_demo_dir(out, config)
    print(f"peftkit demo: teach {base} the '{task}' task ({spec.description}) with LoRA")
    print(f"  {torch.get_num_threads()} CPU threads; training config saved as {out / 'config.yaml'}\n")

    again = "Run the same `peftkit demo` command again to start the demo over (it replaces this run)"
    result = train(config, overwrite=overwrite, rerun=again)
    print(
        f"\ntrained {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s)"
    )

    bf16 = result.summary["precision"] == "bf16"
    opened = open_model(
        base, [("adapter", result.adapter_dir)], dtype=torch.bfloat16 if bf16 else torch.float32
    )
    am, tokenizer = opened.model, opened.tokenizer
    examples = spec.examples("test", n_test)
    print(f"\nheld-out test split ({len(examples)} examples the adapter never saw; --n-test sets how many), "
          "base and adapter in the same mixed batches:")  # fmt: skip
    report = evaluate(
        am, tokenizer, examples, metric=spec.metric, adapters=[None, "adapter"],
        max_new_tokens=spec.max_new_tokens, batch_size=32,
    )  # fmt: skip
    print(format_table(report))
    base_score, adapter_score = report[BASE].score, report["adapter"].score

    _show_fresh_answers(am, tokenizer, task)
    summary = {
        "task": task,
        "metric": spec.metric,
        "base": base_score,
        "adapter": adapter_score,
        "n": len(examples),
        "train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "adapter_dir": str(result.adapter_dir),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_config(config, out / "config.yaml")
    ok = adapter_score >= min_score
    print(
        f"\n{spec.metric} on held-out examples: base {base_score:.0%} -> adapter {adapter_score:.0%} "
        f"[{'ok' if ok else 'FAILED'}: target {min_score:.0%}]"
    )
    print(f"adapter:    {result.adapter_dir}  (peftkit info {result.adapter_dir})")
    print(
        f"loss curve: {out / 'loss.png'};  metrics: {out / 'metrics.jsonl'};  TensorBoard: {out / 'tensorboard'}"
    )
    print(f"try it:     peftkit chat --adapter {result.adapter_dir}")
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return ok


def claim_demo_dir(out: Path, config: TrainConfig) -> bool:
    """Make `out` the demo's: a new or empty directory, or one holding an earlier demo run (its
    demo.json), which is replaced; anything else, say a real training run, is refused. Marks it
    with a demo.json that has no scores yet, so a failed rerun never leaves the old scores beside
    the new adapter and the next rerun still knows the directory. True when a run is there to clear."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another --out")
    if is_nonempty_dir(out) and not (out / "demo.json").is_file():
        raise ConfigError(
            f"--out {out} is not empty and holds no earlier demo run (no demo.json): the demo replaces "
            "only its own runs; choose a new or empty --out"
        )
    overwrite = is_run_dir(out)
    check_run_dir(out, resume=False, overwrite=overwrite, inputs=local_inputs(config))  # as train will
    write_json_atomic(out / "demo.json", {"task": config.data.removeprefix("task:"), "status": "training"})
    return overwrite


def _show_fresh_answers(am: Any, tokenizer: Any, task: str) -> None:
    """The base model's and the adapter's answers to the hand-written inputs, side by side."""
    from ..eval.run import generate_answers

    spec = get_task(task)
    prompts = [[Message("user", f"{spec.instruction}\n{spec.label}: {text}")] for text in FRESH.get(task, [])]
    if not prompts:
        return
    answers = generate_answers(
        am, tokenizer, prompts * 2, max_new_tokens=spec.max_new_tokens, adapter_names=[None] * len(prompts) + ["adapter"] * len(prompts)
    )  # fmt: skip
    print("\nfresh inputs (written by hand), base model -> adapter:")
    for i, text in enumerate(FRESH[task]):
        print(
            f"  {text!r}\n      base:    {_one_line(answers[i])}\n      adapter: {_one_line(answers[i + len(prompts)])}"
        )


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= 90 else text[:87] + "...")


def demo(
    task: Literal["dates", "extract", "sentiment"] = "dates",
    steps: int = 80,
    out: Path = Path("out/demo"),
    base: str = "smollm2-135m",
    n_test: int = 100,
    min_score: float = 0.9,
) -> int:
    """The main job: teach the default model a built-in task with LoRA, then show before and after.

    Fine-tunes the base with LoRA (r=16, every linear layer) on the task's training split, scores the
    base model and the adapter side by side on held-out examples (in the same mixed batches), saves
    the adapter, the loss curve (PNG), metrics and TensorBoard logs, and shows the adapter answering
    fresh, hand-written inputs. Exits 1 if the adapter misses min_score. A few minutes on a 2-core CPU.

    Args:
        task: the built-in task to learn
        steps: optimizer steps (8 examples each)
        out: directory for the run (adapter, loss.png, metrics, config); new, empty, or an earlier
            demo run, which is replaced (any other directory is refused)
        base: the base model (a built-in name, an HF model directory or a .gguf file)
        n_test: held-out examples to score base and adapter on
        min_score: the adapter's held-out score the demo expects
    """
    return 0 if run_demo(task, steps, out, base, n_test, min_score) else 1
