"""Combining adapters on two tasks: each `how` of `AdaptedModel.combine` against a multi-task LoRA.

Trains LoRA r=16 on every linear layer of the built-in SmolLM2-135M (the demo's schedule: batch 8,
lr 1e-3, 10% warmup; in --dtype, default auto: bf16 with fp32 masters where this machine computes
bf16 natively, float32 otherwise; see machine.py) on the built-in `dates` task and on the
`sentiment` task, --steps each, and one multi-task LoRA on both tasks' training examples shuffled
together for 2 x --steps (the same total number of optimizer steps as the two single-task adapters
together). It then combines the two single-task adapters each way (linear, cat, svd rank 16, ties
density 0.5, dare_linear and dare_ties density 0.5 seed 0; weights 1.0 1.0) and scores every
adapter, and the base model, on both tasks' held-out test splits with `peftkit.eval.run.evaluate`
(the metric `peftkit eval task:NAME` reports: exact match for dates, accuracy for sentiment; greedy
decoding), on the first --eval-limit test examples of each task, all adapters in the same mixed
batches, the base in the same dtype as training.

    python benchmarks/combine_tasks.py                     # 50 steps per task, 100 test examples
    python benchmarks/combine_tasks.py --steps 20 --eval-limit 30 --out runs/combine-quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import Setting, add_dtype_option, default_device  # noqa: E402

from peftkit import AdaptedModel, load_base
from peftkit.cli.demo import demo_config
from peftkit.core.rows import BASE
from peftkit.data.tasks import get_task
from peftkit.eval.run import evaluate
from peftkit.train.config import TrainConfig
from peftkit.train.loop import train

TASKS = ("dates", "sentiment")
BASE_MODEL = "smollm2-135m"
HOWS = {
    "linear": {},
    "cat": {},
    "svd": {"rank": 16},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5, "seed": 0},
    "dare_ties": {"density": 0.5, "seed": 0},
}


def config(data: str, steps: int, out: Path, dtype: torch.dtype) -> TrainConfig:
    """The demo's training run (peftkit.cli.demo.demo_config) on `data` in `dtype`, without TensorBoard."""
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    return demo_config("dates", steps, out, BASE_MODEL).replace(
        data=data, tensorboard=False, precision=precision
    )


def mixed_data(path: Path) -> Path:
    """Both tasks' training examples (2000 each, the task default), shuffled, as prompt/completion."""
    rows = [
        {"prompt": ex.messages[-2].content, "completion": ex.answer}
        for task in TASKS
        for ex in get_task(task).examples("train")
    ]
    random.Random(0).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_all(steps: int, out: Path, dtype: torch.dtype) -> tuple[dict[str, Path], dict[str, float]]:
    """Adapter directory and training seconds of each single-task run and of the multi-task run."""
    runs = {task: (f"task:{task}", steps) for task in TASKS}
    runs["multi-task"] = (str(mixed_data(out / "mixed.jsonl")), 2 * steps)
    dirs, seconds = {}, {}
    for name, (data, n) in runs.items():
        print(f"training {name}: {n} steps on {data}", flush=True)
        result = train(config(data, n, out / name, dtype), overwrite=(out / name).exists())
        dirs[name], seconds[name] = result.adapter_dir, result.seconds
        print(f"  {result.steps} steps in {result.seconds:.0f} s, loss {result.final_loss:.3f}", flush=True)
    return dirs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per single-task adapter")
    parser.add_argument("--eval-limit", type=int, default=100, help="test examples scored per task")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-combine"), help="run directory")
    add_dtype_option(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    setting = Setting.resolve(args.dtype, default_device())
    print(setting.lines(), flush=True)

    dirs, train_s = train_all(args.steps, args.out, setting.dtype)
    model, tokenizer = load_base(BASE_MODEL, dtype=setting.dtype, device=setting.device)
    am = AdaptedModel(model)
    for name, path in dirs.items():
        am.load_adapter(path, name)
    a, b = TASKS
    combine_s = {}
    for how, options in HOWS.items():
        t0 = time.perf_counter()
        result = am.combine([a, b], [1.0, 1.0], how, how=how, **options)
        combine_s[how] = time.perf_counter() - t0
        print(f"  {result.summary()}  [{combine_s[how]:.1f} s]", flush=True)

    names = [None, a, b, *HOWS, "multi-task"]
    scores, eval_s = {}, {}
    for task in TASKS:
        spec = get_task(task)
        examples = spec.examples("test", args.eval_limit)
        print(f"evaluating {len(names)} models on {len(examples)} {task} test examples", flush=True)
        report = evaluate(
            am, tokenizer, examples, metric=spec.metric, adapters=names,
            max_new_tokens=spec.max_new_tokens, batch_size=32, with_perplexity=False,
        )  # fmt: skip
        scores[task] = {r.adapter: r.score for r in report.results}
        eval_s[task] = report.seconds
        print(f"  {report.seconds:.0f} s", flush=True)

    label = {BASE: "base model", a: f"LoRA {a} only", b: f"LoRA {b} only", "multi-task": "multi-task LoRA"}
    head = f"| adapter | {a} ({get_task(a).metric}) | {b} ({get_task(b).metric}) | mean | time s |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    for name in [BASE, a, b, *HOWS, "multi-task"]:
        s1, s2 = scores[a][name], scores[b][name]
        secs = train_s.get(name, combine_s.get(name))
        shown = "-" if secs is None else f"{secs:.1f}"
        row = label.get(name, f"combine {name}")
        lines.append(f"| {row} | {s1:.2f} | {s2:.2f} | {(s1 + s2) / 2:.2f} | {shown} |")
    table = "\n".join(lines)
    print(
        f"\n{BASE_MODEL} {setting.label}, {args.steps} steps per task, {args.eval_limit} test examples per task"
    )
    print(setting.lines())
    print("(time: training seconds for trained adapters, combining seconds for combined ones)")
    print(table)
    total = time.perf_counter() - started
    print(f"\nevaluation: {', '.join(f'{t} {s:.0f} s' for t, s in eval_s.items())}; total {total:.0f} s")
    summary = {"scores": scores, "train_s": train_s, "combine_s": combine_s, "eval_s": eval_s}
    summary |= {"total_s": total, "args": {**vars(args), "out": str(args.out)}, **setting.record()}
    (args.out / "combine_tasks.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
