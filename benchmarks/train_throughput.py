"""LoRA training throughput and peak memory: peftkit vs HF transformers + PEFT, in one run.

Both train the built-in SmolLM2-135M with LoRA r=16 on all linear layers, AdamW, on the same
batches: 8 sequences x 256 tokens of multi-turn chat built from the `extract` task, with the loss on
the assistant turns only. Both hold the model's weights in one dtype, `--dtype` (default auto: bf16
where this machine computes it natively, float32 otherwise; see machine.py). Each system runs in its
own subprocess (peak RSS is a per-process figure), alternating over rounds; tokens/s counts every
position of the batch (padding included). The floor is the step's matrix-product FLOPs (counted by
torch) at this machine's measured matrix-product rate in that dtype.

    python benchmarks/train_throughput.py                 # 2 rounds x 6 timed steps each
    python benchmarks/train_throughput.py --systems peftkit --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import Setting, add_dtype_option  # noqa: E402

SYSTEMS = ("hf_peft", "peftkit")


def make_batches(tokenizer, n_batches: int, batch: int, seq: int) -> list[dict]:
    """Fixed-length chat sequences (no padding) with labels on the assistant turns."""
    import torch

    from peftkit.data.encode import encode
    from peftkit.data.example import Example, Message
    from peftkit.data.tasks import get_task

    pairs = get_task("extract").examples("train", 4000)
    rows, i = [], 0
    while len(rows) < n_batches * batch:
        turns: list[Message] = []
        while True:  # grow a conversation until it passes `seq` tokens
            turns += pairs[i % len(pairs)].messages
            i += 1
            enc = encode(Example(tuple(turns)), tokenizer, max_length=10**6)
            if len(enc) >= seq:
                break
        rows.append((enc.input_ids[:seq], enc.labels[:seq]))
    out = []
    for b in range(n_batches):
        chunk = rows[b * batch : (b + 1) * batch]
        ids = torch.tensor([r[0] for r in chunk])
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([r[1] for r in chunk]),
            }
        )
    return out


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(system: str, steps: int, batch: int, seq: int, rank: int, dtype: str) -> dict:
    """Train `steps` timed steps (after 2 warm-up steps) with one system, the model in `dtype`
    (float32 or bfloat16, resolved by the parent); report times and peak RSS."""
    import torch

    import peftkit

    torch.manual_seed(0)
    model, tokenizer = peftkit.load_base("smollm2-135m", dtype=dtype, device="cpu")
    batches = make_batches(tokenizer, steps + 2, batch, seq)
    step = _hf_peft_step(model, rank) if system == "hf_peft" else _peftkit_step(model, rank)
    times, flops = [], None
    for k, b in enumerate(batches):
        if k == 1:
            flops = _count_flops(step, b)
        t0 = time.perf_counter()
        loss = step(b)
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return {"system": system, "times": times, "loss": loss, "flops": flops, "peak_rss_mb": peak_rss_mb()}


def _hf_peft_step(model, rank: int):
    import peft
    import torch

    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, cfg)  # PEFT's defaults: bf16 adapter weights upcast to fp32
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

    def step(b: dict) -> float:
        loss = pm(**b).loss  # transformers' own loss over full-vocabulary logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in pm.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _peftkit_step(model, rank: int):
    import torch

    from peftkit import AdaptedModel, LoraConfig
    from peftkit.train.fused import fuse_for_training
    from peftkit.train.loss import head_loss_sum, labelled_hidden
    from peftkit.train.optim import Trainable

    fuse_for_training(model)  # as `peftkit train` does
    am = AdaptedModel.attach(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    am.train()
    # fp32 masters of the model's bf16 parameters (as `peftkit train` does); in fp32 they are the same
    trainable = Trainable.of(am)
    opt = torch.optim.AdamW(trainable.masters, lr=1e-4, foreach=False)
    backbone, head = model.base_model, model.get_output_embeddings()

    def step(b: dict) -> float:
        hidden = backbone(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False
        ).last_hidden_state
        h, y = labelled_hidden(hidden, b["labels"])
        loss = head_loss_sum(head, h, y) / y.numel()
        loss.backward()
        trainable.grads_to_masters()
        torch.nn.utils.clip_grad_norm_(trainable.masters, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainable.masters_to_params()
        return loss.item()

    return step


def _count_flops(step, b: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(b)
    return counter.get_total_flops()


def matmul_rate(dtype: torch.dtype) -> float:
    """Measured matrix-product rate (FLOP/s) of this machine in `dtype`, on a model-sized product."""
    import torch

    a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048 * 576 * 1536 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    add_dtype_option(parser)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.seq, args.rank, args.dtype)))
        return

    import warnings

    warnings.filterwarnings("ignore")
    setting = Setting.resolve(args.dtype, "cpu")
    results: dict[str, list[dict]] = {s: [] for s in args.systems}
    for _ in range(args.rounds):
        for system in args.systems:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                system,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
            ]
            cmd += ["--seq", str(args.seq), "--rank", str(args.rank), "--dtype", setting.name]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[system].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rate = matmul_rate(setting.dtype)
    tokens = args.batch * args.seq
    rows = []
    for system, runs in results.items():
        step_s = statistics.median(t for r in runs for t in r["times"])
        flops = runs[0]["flops"]
        rows.append(
            {
                "system": system,
                "step_s": step_s,
                "tokens_per_s": tokens / step_s,
                "peak_rss_gb": max(r["peak_rss_mb"] for r in runs) / 1024,
                "step_tflop": flops / 1e12,
                "floor_s": flops / rate,
                "x_floor": step_s / (flops / rate),
                "final_loss": runs[-1]["loss"],
            }
        )
    print(
        f"\nLoRA training, smollm2-135m {setting.label}, batch {args.batch} x {args.seq} tokens, r={args.rank} on "
        f"all linear layers; {args.rounds} rounds x {args.steps} steps per system (medians); "
        f"{setting.label} matmul rate {rate / 1e12:.2f} TFLOP/s"
    )
    print(setting.lines())
    print(
        f"{'system':10s} {'s/step':>7s} {'tokens/s':>9s} {'peak RSS GB':>12s} {'TFLOP/step':>11s} {'floor s':>8s} {'x floor':>8s}"
    )
    for r in rows:
        print(
            f"{r['system']:10s} {r['step_s']:7.2f} {r['tokens_per_s']:9.0f} {r['peak_rss_gb']:12.2f} "
            f"{r['step_tflop']:11.3f} {r['floor_s']:8.2f} {r['x_floor']:8.2f}"
        )
    if len(rows) == 2:
        hf, pk = rows
        print(
            f"peftkit vs HF+PEFT: {pk['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s, "
            f"{pk['peak_rss_gb'] / hf['peak_rss_gb']:.2f}x peak memory"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {**setting.record(), "args": vars(args), "matmul_rate": rate, "rows": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
