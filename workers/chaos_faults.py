"""The faults of the chaos table, and its rows (:func:`rows`).

A fault is a function of the running row (:class:`RunningRow`, implemented by
:class:`workers.chaos.RowRun`), started in a thread once
the row's consumers run. It waits for some progress (committed offsets, counted from Kafka),
inflicts its fault through the lab (:class:`workers.chaos_lab.ChaosLab`), and notes what it did.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from workers.chaos_lab import FHIR_TIMEOUT_S, ChaosLab
from workers.chaos_proxy import FaultProxy
from workers.settings import Settings


class RunningRow(Protocol):
    """What a fault may see and do of the row it runs in."""

    lab: ChaosLab
    settings: Settings
    notes: list[str]

    def progress(self) -> float: ...

    def wait_for(self, fraction: float, timeout_s: float = 300.0) -> None: ...

    def start_consumer(self) -> None: ...

    def stop_consumer(self, index: int, timeout_s: float = 60.0) -> None: ...

    def wait_until_assigned(self, index: int, timeout_s: float = 60.0) -> bool: ...


Fault = Callable[[RunningRow], None]


def kill_worker_children(times: int = 3) -> Fault:
    def fault(run: RunningRow) -> None:
        for i in range(times):
            run.wait_for((i + 1) / (times + 2))
            if run.lab.kill_worker_child():
                run.notes.append(f"killed a worker child at {run.progress():.0%}")

    return fault


def kill_worker_parent(restart_after_s: float = 5.0) -> Fault:
    def fault(run: RunningRow) -> None:
        run.wait_for(0.3)
        at = run.progress()
        run.lab.kill_worker_parent(restart_after_s)
        run.notes.append(f"worker parent SIGKILL at {at:.0%}, new worker {restart_after_s:.0f}s later")

    return fault


def kill_consumer_before_commit(at_commit: int = 3) -> Fault:
    """A consumer subprocess that SIGKILLs itself after publishing a batch's outcomes and before
    committing them (the worst moment), then a fresh consumer takes over."""

    def fault(run: RunningRow) -> None:
        env = run.lab.consumer_env(run.settings)
        proc = subprocess.run([sys.executable, "-m", "workers.chaos", "crash-consumer", str(at_commit)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, check=False)  # fmt: skip
        run.notes.append(f"consumer killed by SIGKILL (exit {proc.returncode}) at {run.progress():.0%}")
        run.start_consumer()

    return fault


def for_a_while(at: float, seconds: float, begin: Callable[[ChaosLab], None], end: Callable[[ChaosLab], None],
                note: str) -> Fault:  # fmt: skip
    """Once ``at`` of the row is committed: ``begin`` the fault, keep it ``seconds``, ``end`` it."""

    def fault(run: RunningRow) -> None:
        run.wait_for(at)
        begin(run.lab)
        run.notes.append(f"{note} for {seconds:.0f}s at {run.progress():.0%}")
        try:
            time.sleep(seconds)
        finally:
            end(run.lab)

    return fault


def stop_fhir(seconds: float) -> Fault:
    return for_a_while(0.2, seconds, ChaosLab.stop_fhir, ChaosLab.start_fhir, "FHIR stopped")


def fhir_answers(
    status: int, seconds: float, *, fraction: float = 1.0, retry_after: float | None = None
) -> Fault:
    return for_a_while(0.15, seconds, lambda lab: _proxy(lab).fail(status, fraction, retry_after),
                       lambda lab: _proxy(lab).heal(), f"FHIR answered {status} to {fraction:.0%}")  # fmt: skip


def fhir_slow(seconds: float, delay_s: float) -> Fault:
    """The server does the work but answers after the client gave up (``delay_s`` > the worker's
    timeout): a write-back that timed out may have committed, and its retry must not duplicate it."""
    return for_a_while(0.15, seconds, lambda lab: _proxy(lab).slow(delay_s), lambda lab: _proxy(lab).slow(None),
                       f"FHIR answered after {delay_s:.0f}s (client timeout {FHIR_TIMEOUT_S:.0f}s)")  # fmt: skip


def _proxy(lab: ChaosLab) -> FaultProxy:
    assert lab.proxy is not None
    return lab.proxy


def redis_hit(what: str, times: int = 2) -> Fault:
    """``what``: ``restart`` (SIGKILL and restart on its append-only file) or ``flush`` (FLUSHALL),
    ``times`` times during the row."""
    action, note = {"restart": (ChaosLab.restart_redis, "Redis SIGKILL + restart"),
                    "flush": (ChaosLab.flush_redis, "Redis FLUSHALL")}[what]  # fmt: skip

    def fault(run: RunningRow) -> None:
        for i in range(times):
            run.wait_for((i + 1) / (times + 2))
            action(run.lab)
            run.notes.append(f"{note} at {run.progress():.0%}")

    return fault


def freeze_redis(seconds: float) -> Fault:
    return for_a_while(0.25, seconds, ChaosLab.freeze_redis, ChaosLab.thaw_redis, "Redis unreachable (SIGSTOP)")


def forced_rebalance(run: RunningRow) -> None:
    """Two consumers share the group; a third joins mid-run, then one of the first leaves.

    The first leaves only once the third holds partitions. A member that leaves while the group is
    still joining leaves Tansu's group waiting for it for good (Kafka's coordinator would drop it
    after the rebalance timeout); that is a broker limit, not what this row tests."""
    run.wait_for(0.2)
    run.start_consumer()
    joined = run.wait_until_assigned(2)
    run.wait_for(0.5)
    run.stop_consumer(0)
    run.notes.append("3rd consumer joined at 20 %, 1st left at 50 %" + ("" if joined else " (3rd got no partitions in 60 s)"))


def rows(n: int, *, long: bool = False) -> list[tuple[str, Fault | None, dict[str, Any]]]:
    """The rows of the table, most important first; ``long`` uses the issue's durations."""
    outage = 60.0 if long else 8.0
    return [
        ("poison + invalid interleaved", None, {}),
        ("worker child SIGKILL", kill_worker_children(), {}),
        ("worker parent SIGKILL + restart", kill_worker_parent(), {}),
        ("consumer SIGKILL before commit", kill_consumer_before_commit(), {}),
        (f"FHIR stopped {outage:.0f}s", stop_fhir(outage), {}),
        ("FHIR 500s (30 %)", fhir_answers(500, outage, fraction=0.3), {}),
        ("FHIR 429 Retry-After", fhir_answers(429, 45.0 if long else 6.0, retry_after=45 if long else 3), {}),
        ("FHIR 401 expired token", fhir_answers(401, 30.0 if long else 6.0), {}),
        ("FHIR slower than timeout", fhir_slow(outage, FHIR_TIMEOUT_S + 2), {}),
        ("Redis restart", redis_hit("restart", times=4), {}),
        ("Redis flush", redis_hit("flush"), {}),
        (f"Redis unreachable {30 if long else 6}s", freeze_redis(30.0 if long else 6.0), {}),
        ("Bundles of 2,000 + duplicate ids", None, {"bundles": 2}),
        ("oversized events", None, {"oversized": 3}),
        ("v1+v2 same batch + revoked", None, {"versions": max(10, n // 20)}),
        ("two consumers + rebalance", forced_rebalance, {"consumers": 2}),
    ]
