"""The benchmarks compute in the dtype peftkit itself would choose on the machine they run on, and say
which machine and why beside their tables (issue 18: they hard-coded bf16, which on a CPU without
native bf16 measures torch's slow emulation instead of what a user there gets)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name != "machine.py")
# vllm_peer.py is not run by hand: serve_throughput.py runs it with the dtype it resolved.
RUN_BY_HAND = [p for p in BENCHMARKS if p.name != "vllm_peer.py"]


def run_forward(tiny_model_dir: Path, tmp_path: Path, native: str, *dtype: str) -> tuple[str, str, dict]:
    """benchmarks/forward_throughput.py on the tiny model, in one round: (stdout, stderr, its JSON)."""
    out = tmp_path / f"forward-{native}-{'-'.join(dtype) or 'default'}.json"
    argv = [sys.executable, str(ROOT / "benchmarks/forward_throughput.py"), "--model", str(tiny_model_dir),
            "--batch", "2", "--seq", "8", "--rank", "2", "--adapters", "2", "--rounds", "1", "--no-peft",
            "--json", str(out), *dtype]  # fmt: skip
    env = {**os.environ, "PEFTKIT_NATIVE_BF16": native, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr, json.loads(out.read_text())


@pytest.mark.parametrize(("native", "label"), [("0", "fp32"), ("1", "bf16")])
def test_auto_is_the_librarys_choice_and_the_table_says_so(tiny_model_dir, tmp_path, native, label) -> None:
    stdout, stderr, record = run_forward(tiny_model_dir, tmp_path, native)
    assert record["dtype_choice"] == "auto" and record["dtype"] == label == record["auto_dtype"]
    assert re.search(rf"^dtype in use: {label} \[--dtype auto: ", stdout, re.M)
    assert re.search(rf"^CPU: .+ torch threads; auto dtype on cpu: {label}$", stdout, re.M)
    assert record["machine"] in stdout and record["cpu_model"] in record["machine"]
    assert "load average (1 min)" in stdout
    assert "slower" not in stderr  # auto warns of nothing: it is the fast dtype here


def test_an_explicit_bf16_without_native_bf16_is_run_with_the_warning(tiny_model_dir, tmp_path) -> None:
    stdout, stderr, record = run_forward(tiny_model_dir, tmp_path, "0", "--dtype", "bfloat16")
    assert record["dtype"] == "bf16" and record["auto_dtype"] == "fp32"
    assert "not native on this machine: emulated, slow" in stdout
    assert "float32" in stderr  # the library's one-line warning names what to pass instead


@pytest.mark.parametrize("script", RUN_BY_HAND, ids=lambda p: p.name)
def test_every_benchmark_takes_dtype_defaulting_to_auto(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"--dtype \{auto,float32,bfloat16\}", done.stdout)
    assert "Setting.resolve(args.dtype" in script.read_text()  # the choice is the library's
