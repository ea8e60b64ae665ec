"""Stopping an experiment cleanly: SIGINT (Ctrl-C), SIGTERM and SIGHUP all mean the same thing.

`compare` and `tune` train each run in a child process of its own session, so a signal meant for a
whole process group (Ctrl-C at a terminal, `timeout`'s SIGTERM) reaches only the parent, never the
children behind its back. The parent passes each stop signal it gets on to every running child: the
first as SIGUSR1, which `peftkit train` reads as a request to stop after the current step and save a
checkpoint that never aborts it, a second as SIGINT, which aborts a stopping run. So SIGTERM (`kill`, `timeout`, `docker stop`, Kubernetes, Slurm
and systemd all send it) and SIGHUP (a closed terminal) do what Ctrl-C does: no new run starts, the
running ones checkpoint, the parent waits for them, says what was left, and exits 128 + the signal's
number (130, 143, 129). A signal the process was started with ignored (`nohup`'s SIGHUP, a background
job's SIGINT) stays ignored. A signal sent to every process of a control group (systemd's default
KillMode, Slurm's scancel) reaches each child directly as well as through the parent: the child takes
the two for one request (SIGUSR1 never aborts, and a direct signal just after it is its echo).

    with stop_signals():
        ...                          # KeyboardInterrupt (a `Stopped`) is raised here on a stop signal
    proc = CHILDREN.popen(command)   # refused (NotStarted) once a stop was asked for
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import PeftkitError
from ..train.step import PASSED_ON
from ..train.step import stop_signals as _stop_signals

STOP_SIGNALS = _stop_signals()  # the ones `peftkit train` takes as a stop (SIGINT, SIGTERM, SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal, raised in the main thread (a KeyboardInterrupt, so every Ctrl-C path applies)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class NotStarted(PeftkitError):
    """A run was about to start after a stop signal: it never starts."""


def signal_name(e: BaseException) -> str:
    """SIGINT, SIGTERM, SIGHUP: the signal behind an interruption (a bare KeyboardInterrupt is SIGINT)."""
    return signal.Signals(getattr(e, "signum", signal.SIGINT)).name


def exit_status(e: BaseException) -> int:
    """128 + the signal's number, the status a shell reports for a process stopped by it."""
    return 128 + getattr(e, "signum", signal.SIGINT)


class Children:
    """The training processes this process runs, and the stop requests passed on to them."""

    def __init__(self) -> None:
        # Reentrant: the signal handler runs in the main thread, maybe while that thread holds it.
        self._lock = threading.RLock()
        self._running: dict[int, subprocess.Popen] = {}
        self.requests = 0  # stop signals received since `stop_signals` began

    def popen(self, command: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start `command` in a session of its own (see the module docstring) and keep it on the list;
        NotStarted once a stop was asked for, so no new run begins after a signal."""
        with self._lock:
            if self.requests:
                raise NotStarted("stopped before this run started")
            proc = subprocess.Popen(command, start_new_session=True, **kwargs)
            self._running[proc.pid] = proc
        return proc

    def exited(self, proc: subprocess.Popen) -> None:
        """`proc` was waited for: forget it (its pid may be reused)."""
        with self._lock:
            self._running.pop(proc.pid, None)

    def stop(self) -> None:
        """Pass a stop on to every running child: the first as SIGUSR1, which `peftkit train` reads as
        a stop after the current step that never aborts it (the child may have had the same signal
        directly, from a control group's kill); a later one as SIGINT, which aborts a stopping run."""
        with self._lock:
            self.requests += 1
            passed_on = PASSED_ON if self.requests == 1 and PASSED_ON is not None else signal.SIGINT
            for pid, proc in list(self._running.items()):
                # os.kill, not send_signal: that polls, and reaping here would take the child's exit
                # (and its peak memory, read by os.wait4) from the thread that watches it.
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, passed_on)


CHILDREN = Children()
_active = threading.Event()  # stop_signals' handlers are installed


@contextlib.contextmanager
def stop_signals() -> Iterator[Children]:
    """In the main thread: SIGINT, SIGTERM and SIGHUP each pass a stop on to the running children,
    then raise `Stopped` here. Nested uses and other threads change nothing (the outer one rules)."""
    if _active.is_set() or threading.current_thread() is not threading.main_thread():
        yield CHILDREN
        return

    def handle(signum: int, frame: Any) -> None:
        CHILDREN.stop()
        raise Stopped(signum)

    CHILDREN.requests = 0
    previous = {}
    for number in STOP_SIGNALS:
        if signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, handle)
    _active.set()
    try:
        yield CHILDREN
    finally:
        _active.clear()
        CHILDREN.requests = 0  # a later run in this process (a test, a notebook) starts afresh
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def interrupted_line(e: BaseException) -> str:
    """What stopped a command, in words: "interrupted" (Ctrl-C), else "stopped by SIGTERM" (or SIGHUP)."""
    name = signal_name(e)
    return "interrupted" if name == "SIGINT" else f"stopped by {name}"


def report_stop(e: BaseException) -> int:
    """Say on stderr what stopped the command and return its exit status (128 + the signal)."""
    print(interrupted_line(e), file=sys.stderr, flush=True)
    return exit_status(e)
