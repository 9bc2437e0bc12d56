"""Waiting without leaving the consumer group: pause every partition, keep polling, seek, resume.

kafka-python evicts a consumer that does not call ``poll()`` within ``max_poll_interval_ms``, and
a rebalance it causes itself throws away the batch's work. So while a batch is dispatched and
while the consumer backs off, every assigned partition is paused and ``poll()`` is called every
:data:`KEEPALIVE_EVERY_S` (a paused poll returns no records but counts as liveness). Afterwards
each partition is sought to the exact offset to read next, which also discards records
kafka-python prefetched and parked while the partition was paused, and resumed.

After a rebalance, the group's committed offset is the only truth. kafka-python 3 keeps the
position of a partition that stays assigned across a rebalance, so a position remembered from
before it (or the position after a batch whose commit the rebalance refused) would skip records
that no commit covers: the partition's tail then stays uncommitted for good (a "stuck" partition,
found with the rebalance row of the fault suite). So :meth:`PausedPolling.resume` seeks every
partition to its committed offset whenever an assignment arrived since :meth:`pause_all`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from connectors.outcomes import tp_name

log = logging.getLogger(__name__)

KEEPALIVE_EVERY_S = 0.5
_JOIN_WAIT_MS = 100


class PausedPolling:
    """Pauses, keeps alive and resumes one consumer's partitions (not thread-safe, like the consumer)."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self.stop = stop or threading.Event()
        self._last_keepalive = 0.0
        self.assignments = 0  # assignments received (the listener counts them)
        self._assignments_at_pause = 0

    def listener(self) -> ConsumerRebalanceListener:
        """The rebalance listener to subscribe with: logs and counts assignments."""
        return LoggingRebalanceListener(self)

    def rebalanced(self) -> bool:
        """Whether an assignment arrived since :meth:`pause_all`."""
        return self.assignments != self._assignments_at_pause

    def pause_all(self, consumer: KafkaConsumer) -> dict[TopicPartition, int]:
        """Pause every assigned partition; returns where each one stands, to resume from there."""
        positions: dict[TopicPartition, int] = {}
        assigned = list(consumer.assignment())
        for tp in assigned:
            try:
                positions[tp] = consumer.position(tp, timeout_ms=5000)
            except Exception as exc:  # noqa: BLE001 - unknown position: resumes from the committed offset
                log.debug("%s: no position (%s)", tp_name(tp), type(exc).__name__)
        if assigned:
            consumer.pause(*assigned)
        self._last_keepalive = time.monotonic()
        self._assignments_at_pause = self.assignments
        return positions

    def keepalive(self, consumer: KafkaConsumer, resume_at: dict[TopicPartition, int]) -> None:
        """Poll while paused so the group does not evict us; a partition assigned meanwhile (a
        rebalance) is paused too, and what it returned is read again later."""
        now = time.monotonic()
        if now - self._last_keepalive < KEEPALIVE_EVERY_S:
            return
        self._last_keepalive = now
        try:
            # Never timeout_ms=0: a poll that may not wait cannot take part in a rebalance (found
            # with Tansu: the group never settled while a member was waiting). The partitions are
            # paused, so this only waits, at most _JOIN_WAIT_MS.
            polled = consumer.poll(timeout_ms=_JOIN_WAIT_MS)
        except Exception as exc:  # noqa: BLE001 - the next real poll reports it
            log.debug("keepalive poll failed (%s)", type(exc).__name__)
            return
        for tp, recs in polled.items():
            resume_at.setdefault(tp, min(r.offset for r in recs))
            consumer.pause(tp)
        unpaused = [tp for tp in consumer.assignment() if tp not in consumer.paused()]
        if unpaused:
            consumer.pause(*unpaused)

    def wait(self, consumer: KafkaConsumer, seconds: float, resume_at: dict[TopicPartition, int]) -> float:
        """Wait ``seconds`` (less if stopped) in the group; returns the time waited."""
        start = time.monotonic()
        end = start + seconds
        while not self.stop.is_set() and time.monotonic() < end:
            self.stop.wait(min(KEEPALIVE_EVERY_S, max(0.0, end - time.monotonic())))
            self.keepalive(consumer, resume_at)
        return time.monotonic() - start

    def resume(self, consumer: KafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        """Seek each assigned partition to ``offsets`` (the next record to read) and resume; after a
        rebalance, to the group's committed offset instead (see the module docstring)."""
        assigned = consumer.assignment()
        if self.rebalanced():
            offsets = self._committed(consumer, assigned)
        for tp in assigned:
            if tp not in offsets:
                continue
            try:
                consumer.seek(tp, offsets[tp])
            except (
                ValueError,
                KafkaError,
                AssertionError,
            ):  # revoked meanwhile: its new owner reads from the commit
                log.info("%s no longer assigned; its new owner resumes at the commit", tp_name(tp))
        if assigned:
            consumer.resume(*assigned)


    def _committed(self, consumer: KafkaConsumer, assigned: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Where the group stands on each partition; one without a commit starts at the beginning."""
        self._assignments_at_pause = self.assignments
        offsets: dict[TopicPartition, int] = {}
        for tp in assigned:
            try:
                committed = consumer.committed(tp)
            except Exception as exc:  # noqa: BLE001 - unknown: the next rebalance or batch settles it
                log.warning("%s: committed offset unknown (%s)", tp_name(tp), type(exc).__name__)
                continue
            if committed is None:
                consumer.seek_to_beginning(tp)
            else:
                offsets[tp] = committed
        log.info("rebalanced: resuming %s from the committed offsets", tps_names(assigned))
        return offsets


class LoggingRebalanceListener(ConsumerRebalanceListener):
    """Logs assignment changes and counts assignments for :class:`PausedPolling`. Nothing to flush:
    each batch is published and committed before the next poll, and a commit refused after a
    rebalance only means its records are read again (from the committed offset)."""

    def __init__(self, polling: PausedPolling | None = None) -> None:
        self.polling = polling

    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            log.info("partitions revoked: %s", tps_names(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        if self.polling is not None:
            self.polling.assignments += 1
        if assigned:
            log.info("partitions assigned: %s", tps_names(assigned))


def tps_names(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(sorted(tp_name(tp) for tp in tps))
