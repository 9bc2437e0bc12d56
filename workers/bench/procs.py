"""Processes of a bench run: who they are, their memory (VmRSS) and CPU time, from ``/proc``.

Linux only (the bench reads ``/proc/<pid>/status`` and ``/proc/<pid>/stat``); elsewhere the figures
are ``None``. Nothing here signals or changes a process.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.measure import kb_to_mb, vm_rss_kb

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def child_pids(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc/*/stat parent links)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        cur = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == cur]
        found += kids
        frontier += kids
    return sorted(found)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (its own threads; not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, ValueError, IndexError):
        return None


def listening_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:``port`` (TCP), via /proc/net/tcp socket inodes; ``None``
    when it is not this user's (or cannot be read)."""
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:] + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    except OSError:
        return None
    inodes = set()
    for line in lines:
        cols = line.split()
        if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(cols[9])
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


def snapshot(processes: dict[str, int | None]) -> dict[str, dict]:
    """``{name: {"pid", "rss_mb", "cpu_s"}}`` for each named process that is alive."""
    out: dict[str, dict] = {}
    for name, pid in processes.items():
        if pid is None:
            continue
        rss = vm_rss_kb(pid)
        if rss is None:
            continue
        out[name] = {"pid": pid, "rss_mb": kb_to_mb(rss), "cpu_s": cpu_seconds(pid)}
    return out


def stack_processes(stack, worker_pid: int | None) -> dict[str, int | None]:
    """Every process of a bench run on a :class:`workers.local.LocalStack`: this one (the consumer),
    the celery worker's parent and pool children, Kafka (Tansu), FHIR (sekmet, with its children)
    and Redis (found by its port: shared with whatever else uses it)."""
    procs: dict[str, int | None] = {"consumer (bench process)": os.getpid()}
    if worker_pid is not None:
        procs["worker parent"] = worker_pid
        for i, pid in enumerate(child_pids(worker_pid)):
            procs[f"worker child {i + 1}"] = pid
    services = stack.services.processes
    for name, label in (("kafka", "broker (Tansu)"), ("fhir", "FHIR (sekmet)")):
        proc = services.get(name)
        if proc is not None:
            procs[label] = proc.pid
            for i, pid in enumerate(child_pids(proc.pid)):
                procs[f"{label} child {i + 1}"] = pid
    redis = services.get("redis")
    procs["Redis"] = redis.pid if redis is not None else listening_pid(stack.services.redis_port)
    return procs
