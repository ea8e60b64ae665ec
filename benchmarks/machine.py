"""The dtype a benchmark computes in and the machine it ran on: printed above every table and recorded
in the JSON results, the same lines for every file in benchmarks/.

Each benchmark takes `--dtype {auto,float32,bfloat16}` (default auto) and resolves it by the
library's own rule (`peftkit.base.precision`): auto is bf16 only where the device computes it
natively (a CPU with avx512_bf16 or amx_bf16, a CUDA GPU with bf16) and float32 everywhere else. On
an AVX2-only CPU a benchmark therefore measures the path a user there gets, not torch's slow bf16
emulation. Every peer in a run (peftkit, HF transformers + PEFT, vLLM) computes in the one resolved
dtype. An explicit `--dtype bfloat16` on such a CPU is honoured, with the library's one-line warning.

The load average goes beside every table because these machines are shared: a table measured under
load is read differently.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import date

import torch

from peftkit.base.precision import (
    auto_dtype,
    compute_dtype,
    cpu_flags,
    cpu_model,
    dtype_label,
    machine_line,
    native,
    why,
)

CHOICES = ("auto", "float32", "bfloat16")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")  # as machine_line


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    """`--dtype {auto,float32,bfloat16}`, default auto."""
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=CHOICES,
        help="the dtype every system in the run computes in (auto: bf16 where this machine computes it "
        "natively, float32 otherwise, as peftkit decides)",
    )


def default_device() -> str:
    """Where `peftkit.load_base` puts a model given no device: "cuda" when available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Setting:
    """A run's resolved dtype (`choice` through peftkit's rule on `device`) and the load average
    (1, 5, 15 minutes) when it started."""

    choice: str
    dtype: torch.dtype
    device: str
    load_at_start: tuple[float, float, float]

    @classmethod
    def resolve(cls, choice: str, device: str = "cpu") -> Setting:
        """Resolve `choice` (auto, float32 or bfloat16) now; warns once on stderr if not native."""
        return cls(choice, compute_dtype(choice, device), device, os.getloadavg())

    @property
    def name(self) -> str:
        """The resolved dtype's name ("float32", "bfloat16"): what a worker process or vLLM is given."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        """ "fp32" or "bf16", for titles and column heads."""
        return dtype_label(self.dtype)

    def reason(self) -> str:
        """Why the run computes in this dtype ("--dtype auto: this CPU has no native bf16 ...")."""
        if self.choice == "auto":
            return f"--dtype auto: {why(self.dtype, self.device).partition(': ')[2]}"
        if native(self.dtype, self.device):
            return f"--dtype {self.choice}"
        return f"--dtype {self.choice}, not native on this machine: emulated, slow"

    def lines(self) -> str:
        """Printed above each table: the machine, the dtype in use and why, the load average."""
        start, now = self.load_at_start[0], os.getloadavg()[0]
        return (
            f"{machine_line(self.device)}\n"
            f"dtype in use: {self.label} [{self.reason()}]; torch {torch.__version__}; "
            f"load average (1 min) {start:.2f} at the start, {now:.2f} now"
        )

    def record(self) -> dict:
        """The same, for a benchmark's JSON results."""
        return {
            "date": str(date.today()),
            "machine": machine_line(self.device),
            "cpu_model": cpu_model(),
            "cpu_flags": [f for f in FLAGS if f in cpu_flags()],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "dtype_choice": self.choice,
            "dtype": self.label,
            "dtype_reason": self.reason(),
            "auto_dtype": dtype_label(auto_dtype(self.device)),
            "load_average_start": list(self.load_at_start),
            "load_average_end": list(os.getloadavg()),
        }
