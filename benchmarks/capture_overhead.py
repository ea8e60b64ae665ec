"""What traffic capture costs serving: the real server (HTTP on 127.0.0.1, the engine, the built-in model)
with capture off, at 10% and at 100%, on one workload: 16 concurrent completions of 64 prompt tokens
and 64 output tokens each, greedy. One server serves every case (its capture rate is switched between
them), in interleaved rounds whose order alternates; reported are medians of output tokens/s and of
p50/p99 request latency, and the median over rounds of each case's ratio to capture off in the same
round. Capture stores samples from a writer thread in the registry's SQLite file.

    python benchmarks/capture_overhead.py                  # 5 rounds
    python benchmarks/capture_overhead.py --rounds 9 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from machine import Setting, add_dtype_option  # noqa: E402
from test_serve_http import served_app  # noqa: E402  (uvicorn in a thread, on a free port)

CASES = {"capture off": 0.0, "capture 10%": 0.1, "capture 100%": 1.0}


def workload(url: str, prompts: list[list[int]], out: int) -> dict[str, float]:
    import urllib.request

    def one(prompt: list[int]) -> tuple[float, int]:
        body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": out, "temperature": 0}
        request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as r:
            usage = json.loads(r.read())["usage"]
        return time.perf_counter() - start, usage["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--out", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    add_dtype_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = Setting.resolve(args.dtype)
    from peftkit.registry import Registry
    from peftkit.registry.traffic import count_samples
    from peftkit.serve.commands import ServeConfig, prepare
    from peftkit.serve.engine import EngineConfig

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 30000, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    from dataclasses import replace

    registry = Path(tempfile.mkdtemp(prefix="capture-bench-")) / "registry"
    Registry.open(registry)
    # One server, its capture rate switched between cases: the same engine and process serve every case,
    # so what differs is capture alone (the writer thread exists throughout, as with any rate above 0).
    config = ServeConfig(capture=1.0, dtype=setting.name, max_tokens=args.out)
    engine = EngineConfig(max_len=args.prompt + args.out + 8, max_batch=args.batch)
    prepared = prepare("smollm2-135m", None, str(registry), config, engine)
    observer = prepared.app.state.observer
    results: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    stored = dict.fromkeys(CASES, 0)
    with served_app(prepared.app) as url:
        observer.policy = replace(observer.policy, rate=0.0)
        workload(url, prompts, args.out)  # warm-up, not counted
        for round_ in range(args.rounds):
            order = list(CASES) if round_ % 2 == 0 else list(CASES)[::-1]  # no case always goes first
            for case in order:
                observer.policy = replace(observer.policy, rate=CASES[case])
                before = sum(count_samples(Registry.open(registry).db).values())
                results[case].append(workload(url, prompts, args.out))
                time.sleep(1.0)  # the writer's last interval lands before the next case
                stored[case] += sum(count_samples(Registry.open(registry).db).values()) - before
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{c} {results[c][-1]['tokens_per_s']:.1f} tok/s" for c in CASES)
            )
    print(f"\n{setting.lines()}\n{args.threads} torch threads; {args.batch} concurrent completions of {args.prompt} + {args.out} tokens over "
          f"HTTP; {args.rounds} rounds (medians); load average (1 min) {os.getloadavg()[0]:.2f} at the end")  # fmt: skip
    print(
        f"{'case':<14} {'output tok/s':>12} {'vs off':>7} {'p50 latency':>12} {'p99 latency':>12} {'samples stored':>15}"
    )
    table = {}
    for case in CASES:
        med = {k: statistics.median(r[k] for r in results[case]) for k in ("tokens_per_s", "p50", "p99")}
        paired = [
            r["tokens_per_s"] / o["tokens_per_s"] for r, o in zip(results[case], results["capture off"])
        ]
        ratio = statistics.median(paired)  # each round against capture off in the same round
        table[case] = {
            **med,
            "vs_off": ratio,
            "paired": paired,
            "rounds": results[case],
            "stored": stored[case],
        }
        print(f"{case:<14} {med['tokens_per_s']:>12.1f} {ratio:>7.3f} {med['p50']:>11.2f}s {med['p99']:>11.2f}s "
              f"{stored[case]:>15}   (per round: {min(paired):.3f}-{max(paired):.3f})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"setting": setting.lines(), "results": table}, indent=2))


if __name__ == "__main__":
    main()
