"""Adapter registry: register and resolve with 1,000 versions, on SQLite and on PostgreSQL, and what
a registry reference costs over a plain directory when loading an r=16 adapter of the built-in model.

PostgreSQL is a throwaway local server started from the machine's own binaries (as the tests do).
The built-in model is loaded in `--dtype` (default auto: bf16 where this machine computes it natively,
float32 otherwise; see machine.py), and the adapter is made and loaded in that dtype.

    python benchmarks/registry_ops.py                    # 1000 versions per backend
    python benchmarks/registry_ops.py --versions 200 --backends sqlite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import Setting, add_dtype_option  # noqa: E402


def tiny_adapters(out: Path, n: int) -> list[Path]:
    """n distinct small LoRA adapters (a tiny Llama's, r=2): what a registry holds many of."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit import AdaptedModel, LoraConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    torch.manual_seed(0)
    am = AdaptedModel.attach(LlamaForCausalLM(config), LoraConfig(r=2, init_lora_weights=False))
    dirs = []
    for i in range(n):
        with torch.no_grad():
            for p in am.adapter_state_dict("default").values():
                p.add_(0.01)
        dirs.append(am.save_adapter(out / f"a{i}"))
    return dirs


def bench_backend(location: str, dirs: list[Path], rounds: int) -> dict[str, float]:
    import random

    from peftkit.registry import Registry

    reg = Registry.open(location)
    times = []
    for i, d in enumerate(dirs):
        t0 = time.perf_counter()
        reg.register(f"adapter-{i % 50}", d)  # 50 names x 20 versions (for 1000)
        times.append(time.perf_counter() - t0)
    rng = random.Random(0)
    resolve = []
    for _ in range(rounds):
        i = rng.randrange(len(dirs))  # a version that exists, for any --versions
        ref = f"adapter-{i % 50}@{i // 50 + 1}"
        t0 = time.perf_counter()
        reg.resolve(ref)
        resolve.append(time.perf_counter() - t0)
    return {"register_ms": 1e3 * statistics.median(times), "resolve_ms": 1e3 * statistics.median(resolve),
            "versions": len(reg.versions())}  # fmt: skip


def bench_load(location: str, rounds: int, dtype: torch.dtype) -> dict[str, float]:
    """Load an r=16 adapter of the built-in model (in `dtype`) from a directory vs from a registry
    reference (resolve + verify every file's hash + load), interleaved, medians."""
    import peftkit
    from peftkit import AdaptedModel, LoraConfig
    from peftkit.registry import Registry
    from peftkit.registry.paths import adapter_path

    model, _ = peftkit.load_base("smollm2-135m", dtype=dtype, device="cpu")
    source = Path(tempfile.mkdtemp()) / "r16"
    am = AdaptedModel.attach(model, LoraConfig(r=16, lora_alpha=32))
    am.save_adapter(source)
    am.delete_adapter("default")
    reg = Registry.open(location)
    reg.register("smol-r16", source)
    plain, ref = [], []
    for i in range(rounds):
        for kind in ("plain", "ref"):
            t0 = time.perf_counter()
            path = source if kind == "plain" else adapter_path("smol-r16@1", location)
            am.load_adapter(path, f"{kind}{i}")
            (plain if kind == "plain" else ref).append(time.perf_counter() - t0)
            am.delete_adapter(f"{kind}{i}")
    return {"plain_s": statistics.median(plain), "ref_s": statistics.median(ref)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--load-rounds", type=int, default=7)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    add_dtype_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setting = Setting.resolve(args.dtype, "cpu")
    work = Path(tempfile.mkdtemp(prefix="peftkit-bench-registry-"))
    dirs = tiny_adapters(work / "adapters", args.versions)
    sys.path.insert(0, str(ROOT / "tests"))
    rows, server = {}, None
    try:
        for backend in args.backends:
            if backend == "sqlite":
                location = str(work / "sqlite")
            else:
                from postgres import create_database, start_server

                server = server or start_server()
                location = server.url(create_database(server)) + f"&files={work / 'pg-files'}"
            rows[backend] = bench_backend(location, dirs, args.rounds)
            rows[backend] |= bench_load(location, args.load_rounds, setting.dtype)
    finally:
        if server is not None:
            from postgres import stop_server

            stop_server(server)
    print(
        f"\nregistry with {args.versions} versions ({min(50, args.versions)} names), medians; r=16 adapter of smollm2-135m in {setting.label}"
    )
    print(setting.lines())
    print(
        f"{'backend':10s} {'register ms':>12s} {'resolve ms':>11s} {'load dir s':>11s} {'load ref s':>11s} {'ref/dir':>8s}"
    )
    for backend, r in rows.items():
        print(f"{backend:10s} {r['register_ms']:12.1f} {r['resolve_ms']:11.2f} {r['plain_s']:11.3f} "
              f"{r['ref_s']:11.3f} {r['ref_s'] / r['plain_s']:8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
