"""Forward (prefill) throughput with LoRA: peftkit vs HF PEFT, side by side in one process.

Cases, each on its own copy of the same base model and the same input batch:
  base model alone; one unmerged adapter; N different adapters mixed in one batch (row i uses
  adapter i mod N). Rounds are interleaved (every case once per round) and medians reported, because
  this machine is noisy; ratios are against the base model measured in the same rounds.

Every case computes in one dtype, `--dtype` (default auto: bf16 where this machine computes it
natively, float32 otherwise; see machine.py). HF PEFT's `autocast_adapter_dtype=False` case only
differs from its default in a half dtype (PEFT upcasts bf16/fp16 adapters, nothing else), so it is
run only then.

    python benchmarks/forward_throughput.py                      # default model, auto dtype, 16 x 128, r=16
    python benchmarks/forward_throughput.py --dtype float32 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import Setting, add_dtype_option  # noqa: E402

import peftkit
from peftkit import AdaptedModel, LoraConfig


def build_peftkit(base: torch.nn.Module, n: int, r: int) -> AdaptedModel:
    am = AdaptedModel(copy.deepcopy(base))
    for i in range(n):
        am.add_adapter(
            f"a{i}", LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
        )
    am.set_adapter("a0")
    return am.eval()


def build_peft(base: torch.nn.Module, n: int, r: int, autocast_adapter_dtype: bool) -> torch.nn.Module:
    import peft

    def config() -> peft.LoraConfig:
        return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)

    pm = peft.get_peft_model(
        copy.deepcopy(base), config(), adapter_name="a0", autocast_adapter_dtype=autocast_adapter_dtype
    )
    for i in range(1, n):
        pm.add_adapter(f"a{i}", config(), autocast_adapter_dtype=autocast_adapter_dtype)
    pm.set_adapter("a0")
    return pm.eval()


def run(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():  # warm-up: allocator, oneDNN kernels, caches
            fn()
        for _ in range(rounds):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    add_dtype_option(parser)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-peft", action="store_true", help="skip HF PEFT (peftkit only)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    setting = Setting.resolve(args.dtype, "cpu")
    base, _ = peftkit.load_base(args.model, dtype=setting.dtype, device="cpu")
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    mixed = [f"a{i % args.adapters}" for i in range(args.batch)]
    ours = build_peftkit(base, args.adapters, args.rank)
    trainable_base = copy.deepcopy(base).requires_grad_(True)

    cases: dict[str, Callable[[], object]] = {
        "base": lambda: base(ids),
        "base, weights requires_grad=True": lambda: trainable_base(ids),
        "peftkit: 1 adapter": lambda: ours(ids),
        f"peftkit: {args.adapters} adapters mixed": lambda: ours(ids, adapter_names=mixed),
    }
    if not args.no_peft:
        import peft

        pm = build_peft(base, args.adapters, args.rank, autocast_adapter_dtype=True)
        cases["HF PEFT: 1 adapter"] = lambda: pm(ids)
        if setting.dtype != torch.float32:  # in fp32 the same model as the default
            pm_same = build_peft(base, 1, args.rank, autocast_adapter_dtype=False)
            cases["HF PEFT: 1 adapter, autocast_adapter_dtype=False"] = lambda: pm_same(ids)
        cases[f"HF PEFT: {args.adapters} adapters mixed"] = lambda: pm(ids, adapter_names=mixed)
        peft_version = peft.__version__
    else:
        peft_version = None

    times = run(cases, args.rounds)
    base_median, base_min = statistics.median(times["base"]), min(times["base"])
    tokens = args.batch * args.seq
    rows = []
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        rows.append(
            {
                "case": name,
                "median_s": med,
                "min_s": best,
                "tokens_per_s": tokens / med,
                "x_base": base_median / med,
                "x_base_min": base_min / best,
            }
        )

    print(
        f"\nforward throughput, {args.model} {setting.label}, batch {args.batch} x {args.seq} tokens, "
        f"LoRA r={args.rank} on all linear layers, {args.rounds} interleaved rounds (medians); peft {peft_version}"
    )
    print(setting.lines())
    # The minimum is the least noisy estimate of the work itself; the median shows typical runs.
    print(
        f"{'case':50s} {'median s':>9s} {'min s':>7s} {'tokens/s':>9s} {'x base':>7s} {'x base (min)':>13s}"
    )
    for row in rows:
        print(
            f"{row['case']:50s} {row['median_s']:9.3f} {row['min_s']:7.3f} {row['tokens_per_s']:9.0f} "
            f"{row['x_base']:7.2f} {row['x_base_min']:13.2f}"
        )
    if args.json:
        record = {**setting.record(), "args": vars(args), "peft": peft_version, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
