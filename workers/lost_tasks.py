"""Tasks lost between the consumer and the workers, found in seconds (issue 8).

A worker waits for tasks in BRPOP. Redis removes a task from the queue as it answers, and kombu
records it as unacknowledged (to re-deliver it if the worker dies) only once the answer is read. A
worker SIGKILLed while the answer is on the wire, or a connection dropped while Redis is frozen,
loses the task: it is in neither the queue nor the unacknowledged set. A consumer killed between
marking an order sent and sending its task leaves the same state behind. Before this, the order
waited for its sent marker to expire (7.5 minutes with the default limits; the fault suite's
worker-parent row).

- Each worker marks every task it receives (:func:`mark_received`, Celery's ``task_received``,
  which fires after kombu has recorded the task as unacknowledged): from then on a dead worker's
  task is Redis's to re-deliver.
- :class:`LostTaskWatch` tells the dispatcher which of the tasks it waits for were lost: no
  worker received them, they have no result, and the queue stood empty both when that was first
  seen and ``lost_after_s`` later. A task still queued keeps the queue non-empty, so a task waiting
  for a stopped worker is never taken for lost.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from workers.app import app

log = logging.getLogger(__name__)

RECEIVED_TTL_S = 3600  # as long as a result is kept


def received_key(task_id: str) -> str:
    """The Redis key that says a worker has taken the task ``task_id`` off the queue."""
    return f"ehrw:recv:{task_id}"


def mark_received(request: Any = None, **_: Any) -> None:
    """Record that this worker holds the task (only the dispatcher's ``ehrw-`` tasks); connected to
    Celery's ``task_received`` by :mod:`workers.tasks`."""
    task_id = getattr(request, "id", None)
    if not isinstance(task_id, str) or not task_id.startswith("ehrw-"):
        return
    try:
        app.backend.client.set(received_key(task_id), b"1", ex=RECEIVED_TTL_S)
    except Exception as exc:  # noqa: BLE001 - a missing mark costs at most one extra run of the task
        log.warning("could not mark task %s received (%s)", task_id, type(exc).__name__)


class LostTaskWatch:
    """Which sent tasks were lost on the way to a worker (see the module docstring)."""

    def __init__(self, redis: Any, backend: Any, queue: str, lost_after_s: float) -> None:
        self._redis = redis
        self._backend = backend
        self.queue = queue
        self.lost_after_s = lost_after_s
        self._unreceived: dict[str, float] = {}  # task id -> since when seen unreceived with the queue empty

    def lost(self, task_ids: set[str]) -> set[str]:
        """The tasks among ``task_ids`` that were lost; each is reported once."""
        if not task_ids or self._redis.llen(self.queue) != 0:
            self._unreceived.clear()  # a task still queued may be one of them: start again once empty
            return set()
        ordered = sorted(task_ids)
        keys = [received_key(t) for t in ordered] + [self._backend.get_key_for_task(t) for t in ordered]
        found = self._redis.mget(keys)
        unreceived = {t for t, mark, result in zip(ordered, found, found[len(ordered) :]) if mark is None and result is None}
        now = time.monotonic()
        self._unreceived = {t: self._unreceived.get(t, now) for t in unreceived}
        lost = {t for t, since in self._unreceived.items() if now - since >= self.lost_after_s}
        for task_id in lost:
            del self._unreceived[task_id]
        return lost
