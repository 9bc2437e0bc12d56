"""A real ``celery -A workers worker`` subprocess for the demo, the benchmark and the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from celery import Celery


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the worker and its pool children at once (crash simulation)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # warm shutdown: finish the current task
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def start_worker(
    env: dict[str, str],
    log_path: Path,
    *,
    app: Celery,
    concurrency: int = 2,
    name: str = "ehrw",
    ready_timeout: float = 120.0,
) -> WorkerProcess:
    """Start a worker with ``env`` (EHRW_* settings) and wait until it answers a ping."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    node = f"{name}-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    cmd = [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "--loglevel", "INFO", "--concurrency", str(concurrency), "--pool", "prefork",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"{node}@%h",
    ]  # fmt: skip
    log = log_path.open("ab")
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    worker = WorkerProcess(proc, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"celery worker exited with {proc.returncode}; its log ({log_path}) ends:\n{worker.log_tail()}")
        replies = app.control.ping(timeout=1.0)
        if any(worker_name.startswith(f"{node}@") for reply in replies for worker_name in reply):
            return worker
        time.sleep(0.5)
    worker.stop()
    raise RuntimeError(f"celery worker not ready after {ready_timeout:.0f}s; see {log_path}:\n{worker.log_tail()}")
