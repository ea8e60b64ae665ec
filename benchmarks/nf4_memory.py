"""NF4 base layers: frozen-weight memory of the built-in model, and the cost of dequantizing it.

Memory: bytes of the linear layers NF4 replaces (every nn.Linear but the output head) as fp32, bf16
and NF4 (packed codes + double-quantized statistics), and of the whole model (NF4 layers, the rest
in the dtype in use; tied embeddings counted once). Time: quantizing all layers once, and
dequantizing all layers once to the dtype in use, with the bitsandbytes backend and the
plain-PyTorch one (interleaved rounds, medians, because this machine is shared and noisy).

The dtype in use is `--dtype` (default auto: bf16 where this machine computes it natively, float32
otherwise; see machine.py): the one a QLoRA run here computes in, so the NF4 ratio is against the
model that run would otherwise hold. The fp32 and bf16 columns are printed on every machine, on
purpose: bytes are a property of the dtype, not of the CPU, and the NF4 target is stated against bf16.

    python benchmarks/nf4_memory.py                 # smollm2-135m, 5 rounds, torch's default threads
    python benchmarks/nf4_memory.py --threads 1 --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward_throughput import run as time_rounds  # noqa: E402  (interleaved rounds after a warm-up)
from machine import Setting, add_dtype_option  # noqa: E402

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
    add_dtype_option(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if nf4._bnb() is None:
        raise SystemExit("bitsandbytes is not installed: pip install 'peftkit[nf4]'")
    setting = Setting.resolve(args.dtype, "cpu")
    dtype, label = setting.dtype, setting.label

    # Loaded in fp32 whatever the dtype in use: the fp32 bytes are a column of the table.
    base, _ = peftkit.load_base(args.model, dtype="float32", device="cpu")
    head = base.get_output_embeddings()
    linears = [m for m in base.modules() if type(m) is nn.Linear and m is not head]
    params = sum(m.weight.numel() for m in linears)
    fp32_bytes = sum(m.weight.numel() * 4 for m in linears)
    bf16_model = model_bytes(copy.deepcopy(base).to(torch.bfloat16))
    used_bytes = fp32_bytes * dtype.itemsize // 4  # the linear layers in the dtype in use
    used_model = model_bytes(base) if dtype == torch.float32 else model_bytes(copy.deepcopy(base).to(dtype))

    quantized = {}

    def quantize(backend: str) -> None:
        model = copy.deepcopy(base).to(dtype)  # NF4 layers then compute in `dtype`, as load_base does
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
            dequantize_nf4(layer.nf4_weight, dtype, backend=backend)

    dequant = time_rounds({b: lambda b=b: dequantize_all(b) for b in ("bnb", "torch")}, args.rounds)

    import bitsandbytes

    print(f"\nNF4 frozen weights, {args.model}: {len(linears)} linear layers, {params / 1e6:.1f} M weights")
    print(setting.lines())
    print(f"bitsandbytes {bitsandbytes.__version__}; bytes identical across backends: {same}")
    ratio = f"NF4/{label}"
    print(f"{'':38s} {'fp32 MB':>9s} {'bf16 MB':>9s} {'NF4 MB':>9s} {ratio:>9s}")
    print(
        f"{'linear layers (quantized part)':38s} {fp32_bytes / 1e6:9.1f} {fp32_bytes / 2e6:9.1f} "
        f"{nf4_bytes / 1e6:9.1f} {nf4_bytes / used_bytes:9.3f}"
    )
    whole = model_bytes(quantized["torch"])
    print(
        f"{f'whole model (rest in {label})':38s} {model_bytes(base) / 1e6:9.1f} {bf16_model / 1e6:9.1f} "
        f"{whole / 1e6:9.1f} {whole / used_model:9.3f}"
    )
    print(f"\n{'all layers once, seconds':38s} {'bnb':>9s} {'torch':>9s} {'torch/bnb':>9s}")
    for row, times in (
        ("quantize (1 round)", quantize_times),
        (f"dequantize to {label} ({args.rounds} rounds, median)", dequant),
    ):
        b, t = statistics.median(times["bnb"]), statistics.median(times["torch"])
        print(f"{row:38s} {b:9.3f} {t:9.3f} {t / b:9.2f}")


if __name__ == "__main__":
    main()
