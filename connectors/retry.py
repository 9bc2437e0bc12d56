"""The consumer's retry policy: one budget per event, one clock, one health flag.

Retrying is owned by the consumer alone (issue 8, defect 3): Celery tasks never re-schedule
themselves, they report what happened and the consumer decides. Every ``retry`` outcome has a
kind, and the kind says whether it spends the event's budget and how long the consumer waits:

=============  ======================================  ==========  ===============================
kind           meaning                                  budget      wait before the next attempt
=============  ======================================  ==========  ===============================
``event``      this event failed (a bug, a timeout,     spent       exponential backoff
               a worker killed while on it)
``unavailable`` a dependency is down (FHIR 5xx, 429,    not spent   backoff, or Retry-After if
               timeouts, Redis)                                     longer (capped)
``deployment`` the deployment is wrong (credentials,    never       exponential backoff; the
               base URL): no event can succeed                     consumer reports unhealthy
``busy``       not finished yet (still running,         never       none: re-polled at once
               waiting behind an earlier event)
=============  ======================================  ==========  ===============================

A server that answers 5xx to one event only is not told apart from an outage (a flapping server
would otherwise dead-letter good events): that event's partition waits with capped backoff and the
consumer logs it at every attempt.

The attempt count lives in Redis, keyed by consumer group, topic, partition and offset, so a
restarted (or a new) consumer continues the count: a poison event that kills its consumer is
still dead-lettered after the budget. Without Redis the count falls back to memory.
"""

from __future__ import annotations

import logging
import time
from typing import Literal, Protocol

log = logging.getLogger(__name__)

RetryKind = Literal["event", "unavailable", "deployment", "busy"]

# Attempt counts outlive any plausible outage, then expire: a key per failing offset, not per event.
_ATTEMPTS_TTL_S = 7 * 24 * 3600


class AttemptLedger(Protocol):
    def add(self, key: str) -> int:
        """Count one failed attempt of the event ``key``; returns the attempts so far."""
        ...

    def clear(self, keys: list[str]) -> None:
        """Forget events whose outcome is durable."""
        ...


class MemoryAttempts:
    """Attempt counts in this process only (lost on restart): for tests and Redis-less use."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, key: str) -> int:
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]

    def clear(self, keys: list[str]) -> None:
        for key in keys:
            self.counts.pop(key, None)


class RedisAttempts:
    """Attempt counts in Redis (``ehrw:attempts:{key}``); survive consumer restarts and rebalances.

    A Redis error never stops the consumer: the count continues in memory meanwhile.
    """

    def __init__(self, redis_url: str, *, prefix: str = "ehrw:attempts:", **client_options: object) -> None:
        import redis

        client_options.setdefault("socket_timeout", 5.0)
        client_options.setdefault("socket_connect_timeout", 5.0)
        self.client = redis.Redis.from_url(redis_url, **client_options)
        self.prefix = prefix
        self.fallback = MemoryAttempts()

    def add(self, key: str) -> int:
        try:
            pipe = self.client.pipeline()
            pipe.incr(self.prefix + key)
            pipe.expire(self.prefix + key, _ATTEMPTS_TTL_S)
            count = int(pipe.execute()[0])
        except Exception as exc:  # noqa: BLE001 - counting must never stall the partition
            log.warning("attempt count not stored in Redis (%s); counting in memory", type(exc).__name__)
            return self.fallback.add(key)
        return count + self.fallback.counts.get(key, 0)  # plus what was counted while Redis was away

    def clear(self, keys: list[str]) -> None:
        self.fallback.clear(keys)
        if not keys:
            return
        try:
            self.client.delete(*[self.prefix + k for k in keys])
        except Exception as exc:  # noqa: BLE001 - they expire anyway
            log.debug("attempt counts not cleared (%s)", type(exc).__name__)


def attempt_key(group: str, topic: str, partition: int, offset: int) -> str:
    return f"{group}/{topic}/{partition}/{offset}"


class Backoff:
    """Exponential backoff with a cap; ``reset()`` after a success."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self.base_s = base_s
        self.max_s = max(max_s, base_s)
        self._next = base_s

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next = self.base_s


class Health:
    """The consumer's health flag: unhealthy while the deployment is wrong (``reason`` says how)."""

    def __init__(self) -> None:
        self.healthy = True
        self.reason: str | None = None
        self.since: float | None = None

    def unhealthy(self, reason: str) -> None:
        if self.healthy or reason != self.reason:
            log.error(
                "UNHEALTHY: %s; consumption paused, retrying with backoff (no event is dead-lettered for this)",
                reason,
            )
        if self.healthy:
            self.since = time.monotonic()
        self.healthy, self.reason = False, reason

    def recovered(self) -> None:
        if not self.healthy:
            log.warning(
                "healthy again after %.0fs (%s resolved)", time.monotonic() - (self.since or 0), self.reason
            )
        self.healthy, self.reason, self.since = True, None, None
