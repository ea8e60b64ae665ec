"""QLoRA vs LoRA on the full-precision base: a training step on the built-in model, side by side.

The same peftkit training step as `train_throughput.py` (LoRA r=16 on all linear layers, fused loss,
fp32 master weights, batch 8 x 256 tokens of chat from the `extract` task) over three bases: the
model in `--dtype` (default auto: bf16 where this machine computes it natively, float32 otherwise;
see machine.py), and its NF4 form dequantized by bitsandbytes or by the plain-PyTorch path, which
computes in that same dtype (NF4 is how the frozen weights are stored, not the compute dtype). Each
system runs in its own subprocess (peak RSS is per process), alternating over rounds; the ratios
are against the LoRA step and frozen weights in the dtype in use.

    python benchmarks/qlora_step.py                  # 2 rounds x 6 timed steps each
    python benchmarks/qlora_step.py --rounds 3 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import Setting, add_dtype_option  # noqa: E402
from train_throughput import make_batches, peak_rss_mb  # noqa: E402

SYSTEMS = ("lora", "qlora_bnb", "qlora_torch")  # "lora": the base in the dtype in use


def worker(system: str, steps: int, batch: int, seq: int, rank: int, dtype: str) -> dict:
    import torch

    import peftkit
    from peftkit.base import nf4
    from peftkit.core.layer_types import is_quantized

    torch.manual_seed(0)
    if system == "qlora_torch":
        nf4.BACKEND = "torch"
    quantize = None if system == "lora" else "nf4"
    model, tokenizer = peftkit.load_base("smollm2-135m", dtype=dtype, device="cpu", quantize=quantize)
    frozen = sum(
        sum(t.numel() * t.element_size() for t in (*m.buffers(recurse=False), *m.parameters(recurse=False)))
        for m in model.modules()
        if is_quantized(m) or type(m) is torch.nn.Linear and m is not model.get_output_embeddings()
    )
    batches = make_batches(tokenizer, steps + 2, batch, seq)
    step = _step(model, rank)
    times = []
    for k, b in enumerate(batches):
        t0 = time.perf_counter()
        loss = step(b)
        if k >= 2:
            times.append(time.perf_counter() - t0)
    return {
        "system": system,
        "times": times,
        "loss": loss,
        "frozen_mb": frozen / 1e6,
        "peak_rss_mb": peak_rss_mb(),
    }


def _step(model, rank: int):
    import torch

    from peftkit import AdaptedModel, LoraConfig
    from peftkit.train.fused import fuse_for_training
    from peftkit.train.loss import head_loss_sum, labelled_hidden
    from peftkit.train.optim import Trainable

    fuse_for_training(model)
    am = AdaptedModel.attach(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    am.train()
    trainable = Trainable.of(am)
    opt = torch.optim.AdamW(trainable.masters, lr=1e-4, foreach=False)
    backbone, head = model.base_model, model.get_output_embeddings()

    def step(b: dict) -> float:
        hidden = backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        h, y = labelled_hidden(hidden.last_hidden_state, b["labels"])
        loss = head_loss_sum(head, h, y) / y.numel()
        loss.backward()
        trainable.grads_to_masters()
        torch.nn.utils.clip_grad_norm_(trainable.masters, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainable.masters_to_params()
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    add_dtype_option(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.seq, args.rank, args.dtype)))
        return

    setting = Setting.resolve(args.dtype, "cpu")
    results: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for _ in range(args.rounds):
        for system in SYSTEMS:
            cmd = [sys.executable, __file__, "--worker", system, "--steps", str(args.steps)]
            cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank)]
            cmd += ["--dtype", setting.name]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[system].append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = statistics.median(t for r in results["lora"] for t in r["times"])
    base_frozen = results["lora"][0]["frozen_mb"]
    x = f"x {setting.label}"
    print(
        f"\nLoRA r={args.rank} on all linear layers of smollm2-135m, batch {args.batch} x {args.seq}; "
        f"{args.rounds} rounds x {args.steps} steps (medians); compute in {setting.label}"
    )
    print(setting.lines())
    print(f"{'base':12s} {'s/step':>7s} {x:>7s} {'frozen MB':>10s} {x:>7s} {'peak RSS GB':>12s}")
    for system, runs in results.items():
        step_s = statistics.median(t for r in runs for t in r["times"])
        frozen = runs[0]["frozen_mb"]
        rss = max(r["peak_rss_mb"] for r in runs) / 1024
        name = f"{setting.label} (LoRA)" if system == "lora" else system
        print(
            f"{name:12s} {step_s:7.2f} {step_s / base:7.2f} {frozen:10.1f} {frozen / base_frozen:7.2f} {rss:12.2f}"
        )


if __name__ == "__main__":
    main()
