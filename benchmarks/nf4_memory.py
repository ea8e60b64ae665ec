"""NF4 base layers: frozen-weight memory of the built-in model, and the cost of dequantizing it.

Memory: bytes of the linear layers NF4 replaces (every nn.Linear but the output head) as fp32, bf16
and NF4 (packed codes + double-quantized statistics), and of the whole model (NF4 layers, the rest
in bf16; tied embeddings counted once). Time: quantizing all layers once, and dequantizing all
layers once to bf16, with the bitsandbytes backend and the plain-PyTorch one (interleaved rounds,
medians, because this machine is shared and noisy).

    python benchmarks/nf4_memory.py                 # smollm2-135m, 5 rounds, torch's default threads
    python benchmarks/nf4_memory.py --threads 1 --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward_throughput import run as time_rounds  # noqa: E402  (interleaved rounds after a warm-up)

import peftkit
from peftkit.base import nf4
from peftkit.base.nf4 import NF4Linear, dequantize_nf4, quantize_model


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    unique = {t.data_ptr(): t for t in tensors}  # tied weights once
    return sum(t.numel() * t.element_size() for t in unique.values())


def model_bytes(model: nn.Module) -> int:
    return tensor_bytes([*model.parameters(), *model.buffers()])


def nf4_layers(model: nn.Module) -> list[NF4Linear]:
    return [m for m in model.modules() if isinstance(m, NF4Linear)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if nf4._bnb() is None:
        raise SystemExit("bitsandbytes is not installed: pip install 'peftkit[nf4]'")

    base, _ = peftkit.load_base(args.model, dtype="float32", device="cpu")
    head = base.get_output_embeddings()
    linears = [m for m in base.modules() if type(m) is nn.Linear and m is not head]
    params = sum(m.weight.numel() for m in linears)
    fp32_bytes = sum(m.weight.numel() * 4 for m in linears)
    bf16_model = model_bytes(copy.deepcopy(base).to(torch.bfloat16))

    quantized = {}

    def quantize(backend: str) -> None:
        model = copy.deepcopy(base).to(torch.bfloat16)
        quantize_model(model, backend=backend)
        quantized[backend] = model

    quantize_times = time_rounds({b: lambda b=b: quantize(b) for b in ("bnb", "torch")}, 1)
    layers = {b: nf4_layers(m) for b, m in quantized.items()}
    same = all(
        torch.equal(x.weight, y.weight) and torch.equal(x.weight_absmax, y.weight_absmax)
        for x, y in zip(layers["bnb"], layers["torch"])
    )
    nf4_bytes = sum(layer.nf4_weight.nbytes() for layer in layers["torch"])

    def dequantize_all(backend: str) -> None:
        for layer in layers[backend]:
            dequantize_nf4(layer.nf4_weight, torch.bfloat16, backend=backend)

    dequant = time_rounds({b: lambda b=b: dequantize_all(b) for b in ("bnb", "torch")}, args.rounds)

    import bitsandbytes

    print(f"\nNF4 frozen weights, {args.model}: {len(linears)} linear layers, {params / 1e6:.1f} M weights")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bitsandbytes "
        f"{bitsandbytes.__version__}, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.2f}; bytes identical across backends: {same}"
    )
    print(f"{'':34s} {'fp32 MB':>9s} {'bf16 MB':>9s} {'NF4 MB':>9s} {'NF4/bf16':>9s}")
    print(
        f"{'linear layers (quantized part)':34s} {fp32_bytes / 1e6:9.1f} {fp32_bytes / 2e6:9.1f} "
        f"{nf4_bytes / 1e6:9.1f} {nf4_bytes / (fp32_bytes / 2):9.3f}"
    )
    whole = model_bytes(quantized["torch"])
    print(
        f"{'whole model (rest in bf16)':34s} {model_bytes(base) / 1e6:9.1f} {bf16_model / 1e6:9.1f} "
        f"{whole / 1e6:9.1f} {whole / bf16_model:9.3f}"
    )
    print(f"\n{'all layers once, seconds':34s} {'bnb':>9s} {'torch':>9s} {'torch/bnb':>9s}")
    for label, times in (
        ("quantize (1 round)", quantize_times),
        (f"dequantize to bf16 ({args.rounds} rounds, median)", dequant),
    ):
        b, t = statistics.median(times["bnb"]), statistics.median(times["torch"])
        print(f"{label:34s} {b:9.3f} {t:9.3f} {t / b:9.2f}")


if __name__ == "__main__":
    main()
