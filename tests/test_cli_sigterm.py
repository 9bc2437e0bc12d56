"""A long command stopped by SIGTERM (``timeout``, a CI runner, ``kill``) leaves nothing running.

Before: ``timeout 3600 ehr-worker chaos`` killed the command and left its Celery worker (with its pool
children), a consumer, Tansu, sekmet and a Redis behind, still holding ports and CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.services


def _family(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of ``root`` (from /proc)."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            parents[int(entry.name)] = int(fields[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    family, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in family:
                family[pid] = commands[pid]
                frontier.append(pid)
    return family


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_chaos_run_stopped_by_sigterm_leaves_no_process_behind(tiny_registry):
    cmd = [sys.executable, "-m", "workers.cli", "chaos", "--events", "3000", "--short", "--only", "poison",
           "--registry", str(tiny_registry)]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            seen.update(_family(proc.pid))
            if any("workers.chaos consume" in c for c in seen.values()):  # services, worker and a consumer up
                break
            time.sleep(0.5)
        assert any("celery" in c for c in seen.values()) and any("workers.chaos consume" in c for c in seen.values()), seen
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        time.sleep(1.0)
        left = {pid: c for pid, c in seen.items() if _alive(pid)}
        assert left == {}, f"left running after SIGTERM: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in seen:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
