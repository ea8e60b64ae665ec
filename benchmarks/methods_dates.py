"""Every method on the built-in `dates` task with the same step budget: what each costs and scores.

Each variant is its shipped example config (examples/dates_<method>.yaml; QLoRA is the LoRA one with
`quantize: nf4`, full fine-tuning the LoRA one with `method: full` and a full-fine-tuning rate), trained
through `peftkit train` in its own subprocess (peak RSS is per process), then scored on the held-out
test split with greedy decoding. Every variant trains and is scored in `--dtype` (default auto: bf16
with fp32 masters where this machine computes bf16 natively, float32 otherwise; see machine.py).
Reported: trainable parameters, adapter size on disk, training tokens/s, peak memory, exact match,
and the score relative to full fine-tuning.

    python benchmarks/methods_dates.py                       # 80 steps each, 100 test examples
    python benchmarks/methods_dates.py --steps 40 --variants lora ia3 --n 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import Setting, add_dtype_option, default_device  # noqa: E402

VARIANTS = {
    "lora": ("dates_lora.yaml", {}),
    "qlora": ("dates_lora.yaml", {"quantize": "nf4"}),
    "dora": ("dates_lora.yaml", {"lora.use_dora": True}),
    "ia3": ("dates_ia3.yaml", {}),
    "prompt": ("dates_prompt.yaml", {}),
    "prefix": ("dates_prefix.yaml", {}),
    "bottleneck": ("dates_bottleneck.yaml", {}),
    "full": ("dates_lora.yaml", {"method": "full", "lr": 2e-5}),
}


def worker(variant: str, steps: int, n: int, out: Path, dtype: str) -> dict:
    """Train and score one variant with the model in `dtype` (float32 or bfloat16, resolved by the
    parent)."""
    import torch

    from peftkit.data.source import load_data
    from peftkit.eval.commands import load_model
    from peftkit.eval.run import evaluate
    from peftkit.train.config import load_config
    from peftkit.train.loop import train

    example, overrides = VARIANTS[variant]
    config = load_config(
        ROOT / "examples" / example,
        {
            **overrides,
            "max_steps": steps,
            "eval_every": steps,
            "output_dir": str(out / variant),
            "progress": False,
            "precision": "bf16" if dtype == "bfloat16" else "fp32",
        },
    )
    t0 = time.perf_counter()
    result = train(config, overwrite=(out / variant).exists())
    train_s = time.perf_counter() - t0
    peak_train = _peak_rss_mb()
    weights = result.adapter_dir or result.model_dir
    size = sum(f.stat().st_size for f in weights.glob("*.safetensors"))
    examples = load_data("task:dates", split="test", n=n)
    adapters = [(variant, result.adapter_dir)] if result.adapter_dir else []
    model, tokenizer = load_model(
        str(weights) if not adapters else config.base, adapters, dtype, quantize=config.quantize
    )
    with torch.no_grad():
        report = evaluate(
            model, tokenizer, examples, metric="exact_match", adapters=[variant] if adapters else [None],
            max_new_tokens=16, batch_size=16, with_perplexity=False, samples=0,
        )  # fmt: skip
    trainable = result.summary.get("trainable_parameters")
    return {
        "variant": variant,
        "trainable": trainable,
        "size_mb": size / 1e6,
        "tokens_per_s": result.tokens_per_second,
        "train_s": train_s,
        "peak_rss_gb": peak_train / 1024,
        "score": report.results[0].score,
        "final_loss": result.final_loss,
    }


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", default="runs/bench-methods")
    add_dtype_option(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.n, Path(args.out), args.dtype)))
        return

    setting = Setting.resolve(args.dtype, default_device())
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--n", str(args.n)]
        cmd += ["--dtype", setting.name]
        done = subprocess.run([*cmd, "--out", args.out], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{variant}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    full = next((r["score"] for r in rows if r["variant"] == "full"), None)
    print(
        f"\nsmollm2-135m {setting.label} on task:dates, {args.steps} steps of batch 8 each, scored on {args.n} "
        f"held-out test examples (exact match, greedy)"
    )
    print(setting.lines())
    print(f"{'variant':11s} {'trainable':>11s} {'size MB':>8s} {'tokens/s':>9s} {'train s':>8s} {'peak GB':>8s} "
          f"{'exact':>6s} {'vs full':>8s}")  # fmt: skip
    for r in rows:
        rel = f"{r['score'] / full:7.0%}" if full else "    n/a"
        trainable = f"{r['trainable']:,}" if r["trainable"] else "?"
        print(
            f"{r['variant']:11s} {trainable:>11s} {r['size_mb']:8.2f} {r['tokens_per_s']:9.0f} {r['train_s']:8.0f} "
            f"{r['peak_rss_gb']:8.2f} {r['score']:6.2f} {rel:>8s}"
        )


if __name__ == "__main__":
    main()
