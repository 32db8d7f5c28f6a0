"""Run control: stop requests (SIGTERM, SIGUSR1, the run's STOP file), agreed over ranks, and ``status.json``.

A stop is requested by a signal to any process or by creating ``<run_dir>/STOP`` (the launcher writes it);
the loop asks ``stop_agreed()`` at its check points, so every rank stops at the same one, checkpoints and exits.
``status.json`` says where a run is (running, finished, preempted, failed with its one-line error) for
``alignrl status``, the launcher and the Slurm job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from alignrl.errors import AlignError
from alignrl.training import checkpoint as ckpt
from alignrl.training.distributed import Collectives

_early_stop_signals: list[int] = []


def record_early_stop_signal(signum, frame) -> None:
    """Signal handler for launch wrappers (the Slurm job): a stop signal that arrives before the trainer
    installs its own handlers is kept, and the trainer stops at its first check."""
    _early_stop_signals.append(signum)


def one_line(e: BaseException) -> str:
    """An exception as the one line ``status.json`` and the CLI show (the user-facing message for ours)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, AlignError):
        return text or type(e).__name__
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class RunControl:
    def __init__(self, run_dir: Path, dist: Collectives, is_main: bool):
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.is_main = is_main
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ stop requests
    def install_signal_handlers(self) -> dict:
        """SIGTERM/SIGUSR1 request a stop; returns the handlers they replaced (to restore afterwards).

        SIGUSR1 (the pre-time-limit / preemption signal, which the Slurm job requeues on) is not replaced
        by a later SIGTERM, e.g. one that arrives during the checkpoint.
        """
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self.stop_signal != signal.SIGUSR1:
                self.stop_signal = signum

        for signum in _early_stop_signals:
            handler(signum, None)
        _early_stop_signals.clear()
        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    @staticmethod
    def restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():  # a later run in this process gets its own
            signal.signal(sig, handler)

    @property
    def stop_file(self) -> Path:
        """Creating this file asks the run to checkpoint and exit, like SIGTERM (the launcher uses it)."""
        return self.run_dir / "STOP"

    def clear_stale_stop_file(self) -> None:
        """A STOP of an earlier (now resumed) process; under torchrun the launcher removes a stale one before it
        starts the workers, and a STOP present now is a fresh request."""
        if self.is_main and self.stop_file.exists() and "TORCHELASTIC_RUN_ID" not in os.environ:
            self.stop_file.unlink()

    def stop_agreed(self) -> bool:
        """True on every rank when any rank was signalled or the stop file exists."""
        return bool(self.dist.max_int(1 if self.stop_signal is not None or self.stop_file.exists() else 0))

    def stop_reason(self) -> str:
        if self.stop_signal is not None:
            return f"signal {signal.Signals(self.stop_signal).name}"
        if self.stop_file.exists():
            try:
                note = self.stop_file.read_text().strip().splitlines()[0]  # the launcher names the signal
            except (OSError, IndexError):
                note = ""
            return f"{self.stop_file.name} file" + (f" ({note})" if note else "")
        return "another process"

    def raise_if_any_failed(self, failure: Exception | None) -> None:
        """Raise ``failure`` here, or a stand-in where another rank failed: no rank waits in a collective."""
        flag = self.dist.max_int(0 if failure is None else 1)
        if failure is not None:
            raise failure
        if flag:
            raise AlignError("another process failed during the rollout (its error is printed above); stopping")

    # ------------------------------------------------------------------ status.json
    def write_status(self, state: str, *, step: int, max_steps: int, train_seconds: float, training: bool,
                     failure: str | None = None) -> None:
        """status.json (atomic): written at the start, after every iteration and at the end; ``failed`` carries
        the one-line error."""
        if not self.is_main or not self.run_dir.is_dir():  # a start that failed before the run had a directory
            return
        status = {"state": state, "step": step, "max_steps": max_steps,
                  "train_seconds": round(train_seconds, 3), "phase": "train" if training else "setup",
                  "pid": os.getpid(),
                  "host": socket.gethostname(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        if state == "failed" and failure:
            status["error"] = failure
        if state == "preempted":
            status["stop"] = self.stop_reason()  # the Slurm job requeues on SIGUSR1 only (see alignrl/slurm.py)
        ckpt.atomic_write_text(self.run_dir / "status.json", json.dumps(status, indent=2))
