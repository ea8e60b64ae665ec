"""The scripts in examples/ run and pass their own checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lora_on_a_cnn_learns_two_tasks_and_mixes_them() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lora_on_a_cnn.py")],
        capture_output=True,
        text=True,
        timeout=900,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("[ok]") == 4 and "FAILED" not in done.stdout
