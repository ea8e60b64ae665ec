"""The one place that decides the compute dtype: `auto` is bf16 only where the device computes it
natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), float32 everywhere else.

On a CPU without native bf16 (AVX2 only), torch still runs bf16 matrix products, but through a slow
emulation: a bf16 checkpoint kept in bf16 there is a trap, so `auto` loads it in float32. An explicit
half dtype on such a CPU is honoured, with a one-line warning that says how much slower it measured.

`PEFTKIT_NATIVE_BF16=1` (or `0`) overrides what is read from the CPU's flags: for a CPU this module
misreads, and for tests that must behave the same on every kind of machine.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from peftkit.errors import BaseModelError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
"""Dtype names the commands and `load_base` accept (besides "auto" and a torch.dtype)."""

OVERRIDE_ENV = "PEFTKIT_NATIVE_BF16"
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_FP16_FLAGS = ("avx512_fp16", "amx_fp16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9R14", ...), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def flags_have_bf16(flags: frozenset[str] | set[str]) -> bool:
    """Whether CPU flags name native bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    return any(f in flags for f in _BF16_FLAGS)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively ($PEFTKIT_NATIVE_BF16 = 1 or 0 overrides the flags)."""
    forced = os.environ.get(OVERRIDE_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if not cpu_flags():
        return sys.platform == "darwin" and platform.machine() == "arm64"  # Apple silicon: bf16 units
    return flags_have_bf16(cpu_flags())


def native(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether `device` computes `dtype` at full speed (float32 always does)."""
    device = torch.device(device)
    if dtype == torch.float32 or dtype == torch.float64:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # other accelerators: trust the caller's choice
    if dtype == torch.bfloat16:
        return cpu_has_bf16()
    return any(f in cpu_flags() for f in _FP16_FLAGS)


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where `device` computes it natively, float32 otherwise."""
    return torch.bfloat16 if native(torch.bfloat16, device) else torch.float32


PRECISION_ADVICE = "set precision: fp32 (or auto)"
"""How a training config chooses float32 instead of a dtype this machine does not compute natively."""


def compute_dtype(
    dtype: torch.dtype | str | None, device: torch.device | str, advice: str | None = None
) -> torch.dtype:
    """The dtype to load and compute in: `dtype` None or "auto" -> `auto_dtype(device)`; a name or a
    torch.dtype as given, with a warning on stderr when `device` cannot compute it natively (`advice`:
    how to choose float32 instead, if not by --dtype)."""
    chosen = _named(dtype) or auto_dtype(device)
    if not native(chosen, device):
        warn_slow(chosen, *([advice] if advice else []))
    return chosen


def _named(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`dtype` as a torch.dtype; None for None and "auto"."""
    valid = f"valid: auto, {', '.join(DTYPES)}"
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise BaseModelError(f"dtype {dtype} is not a floating-point dtype; {valid}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise BaseModelError(f"unknown dtype {dtype!r}; {valid}, or a torch.dtype")


def why(dtype: torch.dtype, device: torch.device | str) -> str:
    """A few words on why `auto` gives `dtype` on `device`, for a run's header ("float32: this CPU
    has no native bf16")."""
    device = torch.device(device)
    name = dtype_label(dtype)
    if device.type == "cuda":
        return f"{name}: {'this GPU computes bf16 natively' if dtype == torch.bfloat16 else 'this GPU has no bf16'}"
    forced = os.environ.get(OVERRIDE_ENV, "").strip() in ("0", "1")
    source = f"${OVERRIDE_ENV}" if forced else "this CPU"
    if dtype == torch.bfloat16:
        return f"{name}: {source} {'says' if forced else 'has'} native bf16"
    return f"{name}: {source} {'says no' if forced else 'has no'} native bf16" + (
        "" if forced else " (no avx512_bf16 or amx_bf16)"
    )


def dtype_label(dtype: torch.dtype) -> str:
    """ "bf16", "fp16" or "fp32"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def machine_line(device: torch.device | str = "cpu") -> str:
    """One line naming the CPU, its capability and `auto`'s choice, printed with every benchmark table."""
    flags = cpu_flags()
    shown = [f for f in ("avx2", "avx512f", *_BF16_FLAGS, *_FP16_FLAGS) if f in flags]
    return (
        f"CPU: {cpu_model()} ({', '.join(shown) or 'no AVX2/AVX-512 flags'}); {torch.get_num_threads()} "
        f"torch threads; auto dtype on {torch.device(device)}: {dtype_label(auto_dtype(device))}"
    )


_warned: set[torch.dtype] = set()


def warn_slow(dtype: torch.dtype, fix: str = "pass --dtype float32 (or auto)") -> None:
    """Say once per process, in one line, that `dtype` is emulated on this CPU, how much slower a
    matrix product measured here than in float32, and `fix`, the caller's way to choose float32."""
    if dtype in _warned:
        return
    _warned.add(dtype)
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, str(dtype))
    ratio = slowdown(dtype)
    flags = "avx512_bf16/amx_bf16" if dtype == torch.bfloat16 else "avx512_fp16/amx_fp16"
    measured = f"a matrix product ran {ratio:.0f}x slower than in float32 here" if ratio >= 2 else (
        "it is emulated, and usually many times slower than float32")  # fmt: skip
    print(
        f"peftkit: warning: this CPU has no native {name} (no {flags}): {measured}; {fix} unless you "
        "need this dtype",
        file=sys.stderr,
        flush=True,
    )


@functools.cache
def slowdown(dtype: torch.dtype, size: int = 256, runs: int = 5) -> float:
    """How many times slower a (size x size) @ (size x size) product runs in `dtype` than in float32
    on this CPU: the fastest of `runs` of each after a warm-up, so a busy machine's stalls do not
    count (a fraction of a second where `dtype` is emulated)."""
    a32, b32 = torch.randn(size, size), torch.randn(size, size)
    best: dict[torch.dtype, float] = {}
    for kind in (torch.float32, dtype):
        a, b = a32.to(kind), b32.to(kind)
        a @ b  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        best[kind] = min(times)
    return max(best[dtype] / max(best[torch.float32], 1e-9), 1.0)


Precision = Literal["bf16", "fp32"]


def resolve_precision(choice: str, device: torch.device | str) -> Precision:
    """Training's precision: "auto" -> "bf16" where the device computes it natively, else "fp32";
    an explicit "bf16" on a device without it is honoured with the one-line warning."""
    if choice == "auto":
        return "bf16" if auto_dtype(device) == torch.bfloat16 else "fp32"
    if choice == "bf16" and not native(torch.bfloat16, device):
        warn_slow(torch.bfloat16, fix=PRECISION_ADVICE)
    return "bf16" if choice == "bf16" else "fp32"
