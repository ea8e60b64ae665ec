"""How often the serving engine's greedy tokens agree with offline generation, in the dtype a server
on this machine computes in.

In fp32 they are identical (tests/test_serve_engine.py). In bf16, the engine's batch composition, its
fused projections and its order of additions round differently from HF `generate` over peftkit's
adapted model, one request at a time, so a near-tie between two tokens can go either way and the
texts part from there. This measures how often, on the built-in model, in `--dtype` (default auto:
bf16 where this machine computes it natively, float32 otherwise, as `peftkit serve` decides; see
machine.py), and always in fp32 as well: fp32 is the exactness check, fixed on purpose.

On a CPU without native bf16, auto is fp32 and the run measures fp32 only. `--dtype bfloat16` measures
bf16 there too, but slowly, and through emulating kernels whose rounding need not match a native
bf16 CPU's: read that figure as this machine's, not as the AVX-512 one.

    python benchmarks/serve_agreement.py                  # 32 requests over the base and 8 adapters
    python benchmarks/serve_agreement.py --dtype bfloat16

Reported: the share of requests whose tokens are all identical, the mean share of each request's tokens
identical before the first difference, and the same in fp32 as a check (1.0 expected).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import Setting, add_dtype_option, default_device  # noqa: E402

import peftkit
from peftkit import AdaptedModel, LoraConfig
from peftkit.base.precision import dtype_label
from peftkit.serve.scheduler import EngineConfig, EngineCore
from peftkit.serve.types import SamplingParams


def agreement(dtype: torch.dtype, args: argparse.Namespace, device: str) -> tuple[float, float]:
    base, tokenizer = peftkit.load_base(args.model, dtype=dtype, device=device)
    root = tempfile.mkdtemp(prefix="agreement-")
    dirs = {}
    for i in range(args.adapters):
        torch.manual_seed(200 + i)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        am = AdaptedModel.attach(base, config, name=f"a{i}")
        with torch.no_grad():  # trained-size updates: random B at init would swamp the model
            for name, p in am.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        dirs[f"a{i}"] = str(am.save_adapter(os.path.join(root, f"a{i}"), f"a{i}"))
        am.delete_adapter(f"a{i}")
    g = torch.Generator().manual_seed(0)
    names = [
        None if i % (args.adapters + 1) == 0 else f"a{i % (args.adapters + 1) - 1}"
        for i in range(args.requests)
    ]
    prompts = [torch.randint(100, 40000, (int(torch.randint(8, 64, (1,), generator=g)),), generator=g).tolist()
               for _ in names]  # fmt: skip
    params = SamplingParams(max_tokens=args.tokens, temperature=0)  # both stop at end-of-sequence
    core = EngineCore(base, tokenizer, dirs.get, EngineConfig(max_batch=16, max_len=160, adapter_slots=8))
    served = [
        [o.token_id for o in out]
        for out in core.run([(p, n, params) for p, n in zip(prompts, names, strict=True)])
    ]
    same_requests, same_tokens = 0, 0
    for name in dict.fromkeys(names):  # one offline model per adapter, each request generated alone
        model, _ = peftkit.load_base(args.model, dtype=dtype, device=device)
        am = AdaptedModel.from_pretrained(model, dirs[name]) if name else model
        for prompt, tokens in [(p, t) for p, n, t in zip(prompts, names, served, strict=True) if n == name]:
            out = am.generate(input_ids=torch.tensor([prompt]), max_new_tokens=args.tokens, do_sample=False)
            ref = out[0, len(prompt) :].tolist()
            prefix = next(
                (i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(ref), len(tokens))
            )
            same_requests += tokens == ref
            same_tokens += prefix / max(len(ref), len(tokens))
    return same_requests / len(names), same_tokens / len(names)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    add_dtype_option(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    setting = Setting.resolve(args.dtype, default_device())
    dtypes = list(dict.fromkeys((setting.dtype, torch.float32)))  # fp32, the check, once
    rows = [(dtype, *agreement(dtype, args, setting.device)) for dtype in dtypes]
    print(f"\ngreedy agreement, engine vs offline generate, {args.model}, {args.requests} requests over the base "
          f"and {args.adapters} LoRA r=16 adapters, {args.tokens} tokens each")  # fmt: skip
    print(setting.lines())
    for dtype, requests, tokens in rows:
        role = "(check)" if dtype == torch.float32 and len(dtypes) > 1 else ""
        print(
            f"{dtype_label(dtype)} {role:8s} identical requests {requests:.2f}   "
            f"tokens before the first difference {tokens:.2f}"
        )


if __name__ == "__main__":
    main()
