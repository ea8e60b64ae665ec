"""Compressed LoRA against LoRA trained at the smaller rank directly: what `peftkit compress` costs in score.

On each built-in task, trains LoRA r=--big-rank (default 64, lora_alpha 2r, every linear layer) with
the demo's recipe (peftkit.cli.demo.demo_config: batch 8, lr 1e-3, 10% warmup, --steps optimizer
steps, seed --seed), compresses it with `peftkit.tools.compress.compress_adapter` to each of --ranks
and each of --energies, and trains LoRA at each of --ranks directly (alpha 2r, the same recipe and
seed). Every adapter of a task is then scored on the task's held-out test split (its first --n
examples, greedy decoding, the task's own metric) in one evaluation pass, all adapters in the same
mixed batches. Each training and each task's evaluation runs in its own subprocess; the model trains
and is scored in --dtype (default auto: bf16 with fp32 masters where this machine computes bf16
natively, float32 otherwise; see machine.py).

Reported per task: each adapter's rank (largest / mean over layers), parameters and bytes on disk
(its safetensors file), the relative error ‖ΔW − ΔW'‖_F / ‖ΔW‖_F over all layers against the big
adapter (compressed ones only), the score and the score minus the big adapter's.

    python benchmarks/compress_quality.py                          # 3 tasks, 80 steps, 100 test examples
    python benchmarks/compress_quality.py --tasks dates --out runs/cq-dates --json cq-dates.json
    python benchmarks/compress_quality.py --resume                 # go on after an interruption
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import Setting, add_dtype_option, default_device  # noqa: E402

from peftkit.data.tasks import TASKS  # noqa: E402

SETTINGS = ("base", "steps", "seed", "dtype", "big_rank")  # a --resume must keep these


def energy_name(energy: float) -> str:
    """An adapter name for an energy target: 0.95 -> "e0_95" (adapter names take no dots)."""
    return "e" + f"{energy:g}".replace(".", "_")


def train_worker(task: str, rank: int, steps: int, seed: int, base: str, dtype: str, out: Path) -> dict:
    """Train LoRA r=`rank` (alpha 2r) on `task` with the demo's recipe into `out`; its adapter and time."""
    from peftkit.cli.demo import demo_config
    from peftkit.train.loop import train
    from peftkit.train.run_dir import is_run_dir

    config = demo_config(task, steps, out, base)
    config = config.replace(
        lora=config.lora.replace(r=rank, lora_alpha=2 * rank),
        seed=seed,
        tensorboard=False,
        progress=False,
        precision="bf16" if dtype == "bfloat16" else "fp32",
    )
    result = train(config, overwrite=is_run_dir(out))  # an interrupted run starts over
    return {
        "adapter_dir": str(result.adapter_dir),
        "train_s": result.seconds,
        "final_loss": result.final_loss,
        "trainable": result.summary.get("trainable_parameters"),
    }


def eval_worker(task: str, adapters: list[list[str]], n: int, base: str, dtype: str) -> dict:
    """Score each (name, directory) on `task`'s first `n` test examples: as many in one pass as can
    share the model (LoRA adapters all can), any others in further passes. {name: score}, seconds."""
    import torch

    from peftkit.data.tasks import get_task
    from peftkit.eval.run import evaluate
    from peftkit.tools.opening import open_model

    spec = get_task(task)
    examples = spec.examples("test", n)
    pending: list[Any] = [(name, Path(path)) for name, path in adapters]
    scores, passes, t0 = {}, 0, time.perf_counter()
    while pending:
        passes += 1
        opened = open_model(base, pending, dtype=getattr(torch, dtype), together="passes")
        names = [s.name for s in opened.sources if s not in opened.waiting]
        with torch.no_grad():
            report = evaluate(
                opened.model, opened.tokenizer, examples, metric=spec.metric, adapters=names,
                max_new_tokens=spec.max_new_tokens, batch_size=32, with_perplexity=False, samples=0,
            )  # fmt: skip
        scores |= {r.adapter: r.score for r in report.results}
        pending = list(opened.waiting)
    seconds = time.perf_counter() - t0
    return {"scores": scores, "metric": spec.metric, "n": len(examples), "passes": passes, "eval_s": seconds}


def describe(adapter_dir: Path) -> dict:
    """Rank (largest, mean over layers), parameters and safetensors bytes of a LoRA adapter's files."""
    from safetensors import safe_open

    ranks, params, size = [], 0, 0
    for path in sorted(adapter_dir.glob("*.safetensors")):
        size += path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle is no dict)
                shape = f.get_slice(key).get_shape()
                params += _numel(shape)
                if ".lora_A." in key:
                    ranks.append(shape[0])
    return {"rank_max": max(ranks), "rank_mean": sum(ranks) / len(ranks), "params": params, "bytes": size}


def _numel(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def run_worker(argv: list[str]) -> dict:
    """This script with `argv` in a subprocess; its last stdout line as JSON (stderr shows live)."""
    done = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"worker {' '.join(argv)} failed (exit {done.returncode}); fix it and rerun with --resume"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def trained(task: str, rank: int, args: argparse.Namespace, setting: Setting) -> dict:
    """The run of LoRA r=`rank` on `task`: reused when a finished one is recorded, else trained now."""
    record = args.out / task / f"r{rank}.json"
    if record.is_file():
        print(f"{task}: r={rank} reused ({record})", flush=True)
        return json.loads(record.read_text())
    print(f"{task}: training LoRA r={rank} for {args.steps} steps", flush=True)
    argv = ["--worker", "train", "--tasks", task, "--big-rank", str(rank), "--steps", str(args.steps)]
    argv += ["--seed", str(args.seed), "--base", args.base, "--dtype", setting.name, "--out", str(args.out)]
    result = run_worker(argv)
    record.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  {result['train_s']:.0f} s, final loss {result['final_loss']:.3f}", flush=True)
    return result


def run_task(task: str, args: argparse.Namespace, setting: Setting) -> list[dict]:
    """Train, compress and score every adapter of `task`: one row per adapter, the big one first."""
    from peftkit.tools.compress import compress_adapter

    big = f"r{args.big_rank}"
    runs = {big: trained(task, args.big_rank, args, setting)}
    rows = [{"adapter": big, "how": f"trained, alpha {2 * args.big_rank}", "error": None, **runs[big]}]
    targets = [(f"{big}-to-r{r}", {"rank": r}) for r in args.ranks]
    targets += [(f"{big}-{energy_name(e)}", {"energy": e}) for e in args.energies]
    for name, target in targets:
        out = args.out / task / "compressed" / name
        result = compress_adapter(runs[big]["adapter_dir"], out, overwrite=True, **target)
        how = f"compressed, {result.target}"
        rows.append({"adapter": name, "how": how, "error": result.relative_error, "adapter_dir": str(out)})
    for r in [r for r in args.ranks if r != args.big_rank]:
        runs[f"r{r}"] = trained(task, r, args, setting)
        rows.append({"adapter": f"r{r}", "how": f"trained, alpha {2 * r}", "error": None, **runs[f"r{r}"]})
    for row in rows:
        row |= describe(Path(row["adapter_dir"]))

    adapters = [[row["adapter"], row["adapter_dir"]] for row in rows]
    record = args.out / task / "eval.json"
    done = json.loads(record.read_text()) if record.is_file() else {}
    if done.get("adapters") == adapters and done.get("n") == args.n:
        print(f"{task}: scores reused ({record})", flush=True)
    else:
        print(f"{task}: scoring {len(rows)} adapters on {args.n} test examples", flush=True)
        argv = ["--worker", "eval", "--tasks", task, "--n", str(args.n), "--base", args.base]
        argv += ["--dtype", setting.name, "--adapters-json", json.dumps(adapters)]
        done = {"adapters": adapters, **run_worker(argv)}
        record.write_text(json.dumps(done, indent=2) + "\n")
        print(f"  {done['eval_s']:.0f} s in {done['passes']} evaluation pass(es)", flush=True)
    for row in rows:
        row |= {"score": done["scores"][row["adapter"]], "metric": done["metric"], "n": done["n"]}
        row["vs_big"] = row["score"] - done["scores"][big]
    return rows


def table(rows: list[dict]) -> str:
    """The rows as aligned columns."""
    head = (
        "adapter",
        "how made",
        "rank max/mean",
        "trainable params",
        "bytes",
        "rel. error",
        "score",
        "vs big",
    )
    cells = [head] + [
        (
            r["adapter"],
            r["how"],
            f"{r['rank_max']} / {r['rank_mean']:.1f}",
            f"{r['params']:,}",
            f"{r['bytes']:,}",
            "-" if r["error"] is None else f"{r['error']:.4f}",
            f"{r['score']:.3f}",
            f"{r['vs_big']:+.3f}",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    )


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible numbers by their option names before anything trains (and drop repeats)."""
    args.ranks, args.energies = list(dict.fromkeys(args.ranks)), list(dict.fromkeys(args.energies))
    for name in ("steps", "n", "big_rank"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if any(r < 1 for r in args.ranks):
        raise SystemExit(f"--ranks must all be at least 1, got {args.ranks}")
    if any(not 0 < e <= 1 for e in args.energies):
        raise SystemExit(f"--energies must all lie in (0, 1], got {args.energies}")


def claim_out(args: argparse.Namespace, setting: Setting) -> None:
    """Refuse a non-empty --out unless --resume, and a --resume whose settings differ from the run's."""
    from peftkit.io import is_nonempty_dir

    settings = {k: getattr(args, k) for k in SETTINGS} | {"dtype": setting.name}
    path = args.out / "settings.json"
    if is_nonempty_dir(args.out) and not args.resume:
        raise SystemExit(
            f"--out {args.out} is not empty: add --resume to go on with its runs, or choose another --out"
        )
    if args.resume and path.is_file() and (old := json.loads(path.read_text())) != settings:
        changed = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
        raise SystemExit(
            f"--resume with other settings than {args.out}'s runs ({changed}); choose another --out"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps (batch 8) of every training")
    parser.add_argument("--n", type=int, default=100, help="held-out test examples scored per task")
    parser.add_argument("--big-rank", type=int, default=64, help="rank of the adapter that is compressed")
    parser.add_argument(
        "--ranks", nargs="+", type=int, default=[32, 16, 8], help="compressed to, and trained at"
    )
    parser.add_argument("--energies", nargs="+", type=float, default=[0.9, 0.95, 0.99], help="compressed to")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training")
    parser.add_argument(
        "--base", default="smollm2-135m", help="the base model (a built-in name or a directory)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench-compress"), help="directory for the runs"
    )
    parser.add_argument("--resume", action="store_true", help="reuse the finished runs in a non-empty --out")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_dtype_option(parser)
    parser.add_argument("--worker", choices=("train", "eval"), help=argparse.SUPPRESS)
    parser.add_argument("--adapters-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "train":
        task, rank = args.tasks[0], args.big_rank
        out = args.out / task / f"r{rank}"
        print(json.dumps(train_worker(task, rank, args.steps, args.seed, args.base, args.dtype, out)))
        return
    if args.worker == "eval":
        adapters = json.loads(args.adapters_json)
        print(json.dumps(eval_worker(args.tasks[0], adapters, args.n, args.base, args.dtype)))
        return

    started = time.perf_counter()
    check_args(args)
    setting = Setting.resolve(args.dtype, default_device())
    claim_out(args, setting)
    print(setting.lines(), flush=True)
    results = {task: run_task(task, args, setting) for task in args.tasks}
    print(
        f"\n{args.base} {setting.label}: LoRA r={args.big_rank} (every linear layer) compressed vs trained "
        f"directly; {args.steps} steps of batch 8 each (lr 1e-3, warmup 0.1), seed {args.seed}; scored on "
        f"{args.n} held-out test examples per task (greedy)"
    )
    print(setting.lines())
    print("(rel. error: ‖ΔW − ΔW'‖_F / ‖ΔW‖_F over all layers vs the big adapter; vs big: score − its score)")
    for task, rows in results.items():
        print(f"\ntask:{task} ({rows[0]['metric']}, n={rows[0]['n']})")
        print(table(rows))
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")
    if args.json:
        record = {"results": results, "total_s": total, **setting.record()}
        record["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
