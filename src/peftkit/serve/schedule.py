"""The server's own monitoring schedule (`monitor_every: SECONDS` in serve.yaml): every interval, one
`peftkit monitor run --ab` in a child process at a low CPU priority (`monitor_nice`, 19 by default),
so re-evaluation and drift statistics never run on the request path, and a failure there never touches serving. Its results go to
the registry, which this server (and every other on it) exports as metrics. Cron can run the same
command instead (docs/monitor.md).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from typing import Any

log = logging.getLogger("peftkit.serve")


class MonitorSchedule:
    """Runs `peftkit monitor run` every `every` seconds from `start()` until `close()`."""

    def __init__(
        self,
        every: float,
        base: str,
        registry: str | None,
        rollback: bool,
        metrics: Any | None,
        nice: int = 19,
    ) -> None:
        self.every, self.metrics, self.nice = every, metrics, nice
        self.command = [sys.executable, "-m", "peftkit", "monitor", "run", "--ab", "--base", base, "--json"]
        self.command += ["--rollback"] if rollback else []
        self.command += ["--registry", registry] if registry else []
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._loop, name="peftkit-monitor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop: a run in progress is terminated (the next start's run catches up)."""
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.terminate()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _loop(self) -> None:
        while not self.stopping.wait(self.every):
            self.run_once()

    def run_once(self) -> str:
        """One run: "ok", "alert" or "failed" (logged, and counted in peftkit_monitor_runs_total)."""
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        try:
            self.child = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=env, preexec_fn=lambda: os.nice(self.nice))  # fmt: skip
            out, err = self.child.communicate()
            code = self.child.returncode
        except OSError as e:
            out, err, code = "", str(e), -1
        outcome = {0: "ok", 1: "alert"}.get(code, "failed")
        if outcome == "failed":
            log.warning("monitor run failed (exit %s): %s", code, err.strip().splitlines()[-1:] or "")
        elif outcome == "alert":
            try:
                alerts = json.loads(out).get("alerts", [])
            except ValueError:
                alerts = ["?"]
            log.warning("monitor run: alerts: %s", ", ".join(alerts))
        if self.metrics is not None:
            self.metrics.monitor_runs.labels(outcome).inc()
        return outcome
