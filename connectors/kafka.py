"""Kafka in and out: the event consumer with at-least-once input and durable outcomes.

Delivery contract (DESIGN.md, "at-least-once in, exactly-once effect out"):

- Offsets are committed by hand, and only past records whose outcome is durable: the dispatcher
  reported ``done`` (suggestions written) and the result events are acknowledged by Kafka, or the
  record is acknowledged on the dead-letter topic. A crash anywhere re-delivers the uncommitted
  records; the idempotent write-back makes the replay harmless.
- Every record ends on the dead-letter topic or done, whatever its bytes, headers or size: a
  record above ``max_event_bytes`` is rejected by size before parsing (``event_too_large``); a
  parser bug is a rejection (``parse_error``); null header values, a keyless tombstone and
  oversized originals are made sendable by :mod:`connectors.dlq` (a truncated copy with the
  original's size and sha256), and a copy the broker still refuses is sent as a minimal one. No
  send error crashes the consumer.
- A ``retry`` outcome (or a publish that Kafka did not acknowledge) stops the commit of its
  partition just before that record; the consumer seeks back to it. Records after it in the same
  partition are re-processed too, so per-order ordering (key = ServiceRequest id) holds.
- One owner of retrying, one budget (:mod:`connectors.retry`): failures of the event itself count
  against a per-event attempt budget kept outside this process (Redis, by group/topic/partition/
  offset); after ``max_attempts`` the event is dead-lettered with ``attempts_exhausted`` and the
  last error's code and type. Unavailable dependencies wait (honouring Retry-After); a broken
  deployment (credentials, base URL) pauses consumption and reports unhealthy, never dead-letters.
- Waiting never costs group membership: while the dispatcher works and while backing off, every
  assigned partition is paused and the consumer keeps polling (a paused poll returns nothing but
  counts as liveness for ``max_poll_interval_ms``); afterwards each partition is sought to the
  exact next offset and resumed. (kafka-python 3.0.12 parks records prefetched for a paused
  partition; the explicit seek discards them.)
- Backpressure: at most ``max_in_flight`` records are handed out per poll, and the next poll
  happens only when the batch's outcomes are known, so a slow FHIR server slows consumption
  instead of growing memory (the fetch buffer is also bounded, see ``_FETCH_MAX_BYTES``). The
  dispatcher bounds orders in flight (a Bundle is many orders).

Nothing here logs a message value or key content beyond ids: values are clinical orders (PHI).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError

from connectors.intake import DEFAULT_MAX_EVENT_BYTES, read_record
from connectors.kafka_clients import ensure_topics, make_producer
from connectors.observer import ConsumerObserver  # Operations (issue 9)
from connectors.outcomes import (
    FINAL_RESULT_STATUSES,
    ConsumerStats,
    EventOutcome,
    Incoming,
    OutcomePublisher,
    Slot,
    tp_name,
)
from connectors.paused import PausedPolling
from connectors.retry import AttemptLedger, Backoff, Health, MemoryAttempts, attempt_key

# The consumer's surface; the producer and topic helpers live in connectors.kafka_clients.
__all__ = ["ConsumerStats", "Dispatch", "EventConsumer", "EventOutcome", "Incoming", "ensure_topics", "make_producer"]

log = logging.getLogger(__name__)

# Bound what the fetcher may buffer ahead of the batch being processed (kafka-python prefetches).
_FETCH_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_DLQ_MAX_BYTES = 1_000_000

Dispatch = Callable[[list["Incoming"]], list["EventOutcome"]]


class EventConsumer:
    """Consumes ServiceRequest events, dead-letters invalid ones, dispatches the rest, commits safely."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        group: str,
        dlq_topic: str,
        result_topic: str,
        max_in_flight: int = 32,
        poll_timeout_s: float = 1.0,
        max_poll_interval_ms: int = 10_000,
        session_timeout_ms: int = 6_000,
        retry_backoff_s: float = 2.0,
        retry_backoff_max_s: float = 30.0,
        retry_after_max_s: float = 300.0,
        max_attempts: int = 5,
        attempts: AttemptLedger | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        dlq_max_bytes: int = DEFAULT_DLQ_MAX_BYTES,
        client_id: str = "ehr-worker",
        stats: ConsumerStats | None = None,
        client_config: Mapping[str, Any] | None = None,
        observer: ConsumerObserver | None = None,  # Operations (issue 9): metrics
    ) -> None:
        """``client_config``: extra kafka-python settings for both consumer and producer (SASL/TLS).
        ``attempts``: where attempt counts live (default: memory; production: Redis).
        ``observer``: told what was polled, what became durable and what was retried (metrics)."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.dlq_topic = dlq_topic
        self.result_topic = result_topic
        self.max_in_flight = max_in_flight
        self.poll_timeout_s = poll_timeout_s
        self.max_poll_interval_ms = max_poll_interval_ms
        self.session_timeout_ms = session_timeout_ms
        self.retry_after_max_s = retry_after_max_s
        self.max_attempts = max_attempts
        self.attempts = attempts if attempts is not None else MemoryAttempts()
        self.max_event_bytes = max_event_bytes
        self.dlq_max_bytes = dlq_max_bytes
        self.client_id = client_id
        self.stats = stats or ConsumerStats()
        self.client_config = dict(client_config or {})
        self.health = Health()
        self._backoff = Backoff(retry_backoff_s, retry_backoff_max_s)
        self.observer = observer  # Operations (issue 9)
        self._finished = 0
        self._stop = threading.Event()
        self._paused = PausedPolling(self._stop)
        self._publisher = OutcomePublisher(
            self.stats, dlq_topic=dlq_topic, result_topic=result_topic, dlq_max_bytes=dlq_max_bytes
        )

    # -- run loop --------------------------------------------------------------------------------

    def run(
        self,
        dispatch: Dispatch,
        *,
        stop: threading.Event | None = None,
        idle_timeout_s: float | None = None,
        max_events: int | None = None,
    ) -> ConsumerStats:
        """Consume until ``stop`` is set, ``max_events`` records have a durable outcome (dead-lettered
        or done; retries do not count), or nothing has arrived for ``idle_timeout_s``."""
        stop = stop or threading.Event()
        producer = make_producer(
            self.bootstrap,
            client_id=f"{self.client_id}-out",
            max_request_size=max(self.dlq_max_bytes, 1024 * 1024) + 64 * 1024,
            **self.client_config,
        )
        try:
            consumer = self._make_consumer()
        except BaseException:
            producer.close(timeout=5)
            raise
        self._stop = stop
        self._paused.stop = stop
        self._backoff.reset()
        self._finished = 0
        last_record = time.monotonic()
        try:
            while not stop.is_set():
                if max_events is not None and self._finished >= max_events:
                    break
                limit = self.max_in_flight
                if max_events is not None:
                    limit = max(1, min(limit, max_events - self._finished))
                polled = consumer.poll(timeout_ms=int(self.poll_timeout_s * 1000), max_records=limit)
                records = [r for tp in sorted(polled, key=lambda t: t.partition) for r in polled[tp]]
                if self.observer is not None:  # Operations (issue 9)
                    self.observer.polled(consumer, records)
                if records:
                    self._process(consumer, producer, records, dispatch)
                    last_record = time.monotonic()  # after the batch: its retry backoff is not idleness
                elif idle_timeout_s is not None and time.monotonic() - last_record >= idle_timeout_s:
                    log.info("no events for %.1fs; stopping", idle_timeout_s)
                    break
        finally:
            # Nothing uncommitted may be committed on the way out: autocommit stays off.
            consumer.close(autocommit=False)
            producer.close(timeout=10)
        return self.stats

    def _make_consumer(self) -> KafkaConsumer:
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            client_id=self.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_in_flight,
            max_poll_interval_ms=self.max_poll_interval_ms,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(100, self.session_timeout_ms // 3),
            fetch_max_bytes=_FETCH_MAX_BYTES,
            max_partition_fetch_bytes=max(self.max_event_bytes, 1024 * 1024) + 64 * 1024,
            **self.client_config,
        )
        consumer.subscribe([self.topic], listener=self._paused.listener())
        return consumer

    # -- one batch -------------------------------------------------------------------------------

    def _process(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        records: list[ConsumerRecord],
        dispatch: Dispatch,
    ) -> None:
        self.stats.batches += 1
        self.stats.consumed += len(records)
        slots = [read_record(r, self.max_event_bytes, self.stats) for r in records]
        # Paused while the batch is worked on, so the keepalive polls return nothing; each
        # partition is sought to its exact next offset on the way out (_resume).
        resume_at = self._paused.pause_all(consumer)
        next_offsets: dict[TopicPartition, int] = {}
        try:
            dispatched = [s for s in slots if s.incoming is not None and s.status is None]
            self._dispatch(consumer, dispatch, dispatched, resume_at)
            self._spend_budget(slots)
            next_offsets = self._publish_and_commit(consumer, producer, slots, dispatch)
            self._wait_before_retry(
                consumer, [s for s in slots if s.status == "retry"], dispatched, resume_at
            )
        finally:
            self._paused.resume(consumer, {**resume_at, **next_offsets})

    def _publish_and_commit(
        self, consumer: KafkaConsumer, producer: KafkaProducer, slots: list[Slot], dispatch: Dispatch
    ) -> dict[TopicPartition, int]:
        by_tp: dict[TopicPartition, list[Slot]] = {}
        for slot in slots:
            by_tp.setdefault(slot.tp, []).append(slot)

        # Only a partition's prefix before its first retry is final; what follows is re-polled
        # (and re-dispatched) after the seek, so publishing it now would duplicate its outputs.
        final: dict[TopicPartition, list[Slot]] = {}
        for tp, tp_slots in by_tp.items():
            cut = next((i for i, s in enumerate(tp_slots) if s.status == "retry"), len(tp_slots))
            final[tp] = tp_slots[:cut]
            for slot in final[tp]:
                self._publisher.publish(producer, slot)
        self._publisher.flush(producer)
        self._publisher.resend_refused_dead_letters(
            producer, [s for tp_slots in final.values() for s in tp_slots]
        )

        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        durable_slots: list[Slot] = []
        next_offsets: dict[TopicPartition, int] = {}
        for tp, tp_slots in by_tp.items():
            durable = 0
            for slot in final[tp]:
                if not all(f.is_done and f.succeeded() for f in slot.futures):
                    log.warning(
                        "%s@%d: outcome not acknowledged by Kafka; retrying", tp_name(tp), slot.record.offset
                    )
                    break
                durable += 1
                durable_slots.append(slot)
            if durable:
                offsets[tp] = OffsetAndMetadata(tp_slots[durable - 1].record.offset + 1, "", -1)
            if durable < len(tp_slots):
                next_offsets[tp] = tp_slots[durable].record.offset
                self.stats.retried += len(tp_slots) - durable
                if self.observer is not None:  # Operations (issue 9)
                    self.observer.retried(len(tp_slots) - durable)
                if tp_slots[durable].status != "retry":  # a publish failed: Kafka's problem, not the event's
                    tp_slots[durable].status, tp_slots[durable].retry_kind = "retry", "unavailable"
            else:
                next_offsets[tp] = tp_slots[-1].record.offset + 1

        # A record counts as finished only once its offset is committed: after a refused commit
        # (the group rebalanced during a slow batch) it is read again from the first uncommitted
        # record (if this consumer still holds the partition; kafka-python keeps its position).
        if not self._commit(consumer, offsets, len(durable_slots)):
            for tp in offsets:
                next_offsets[tp] = by_tp[tp][0].record.offset
        else:
            for slot in durable_slots:
                self._count_durable(slot)
            self.attempts.clear([self._attempt_key(s) for s in durable_slots if s.attempts])
            finished = getattr(dispatch, "finished", None)
            incomings = [s.incoming for s in durable_slots if s.incoming is not None]
            if finished is not None and incomings:
                try:
                    finished(incomings)
                except Exception as exc:  # noqa: BLE001 - only housekeeping (results expire anyway)
                    log.warning("dispatcher cleanup failed (%s)", type(exc).__name__)
        return next_offsets

    def _dispatch(
        self,
        consumer: KafkaConsumer,
        dispatch: Dispatch,
        slots: list[Slot],
        resume_at: dict[TopicPartition, int],
    ) -> None:
        if not slots:
            return
        self.stats.dispatched += len(slots)
        batch = [s.incoming for s in slots if s.incoming is not None]
        try:
            if getattr(dispatch, "accepts_keepalive", False):
                outcomes = dispatch(batch, keepalive=lambda: self._paused.keepalive(consumer, resume_at))  # type: ignore[call-arg]
            else:
                outcomes = dispatch(batch)
            if len(outcomes) != len(slots):
                raise RuntimeError(f"dispatch returned {len(outcomes)} outcomes for {len(slots)} events")
        except Exception as exc:  # the batch is simply not durable yet
            # The type only: exception text may quote event content. Not the events' fault.
            log.error("dispatch failed (%s); %d events will be retried", type(exc).__name__, len(slots))
            log.debug("dispatch failure", exc_info=True)
            for slot in slots:
                slot.status, slot.retry_kind = "retry", "unavailable"
                slot.reason_code, slot.error_type = "dispatch_failed", type(exc).__name__
            return
        for slot, outcome in zip(slots, outcomes):
            slot.status = outcome.status
            slot.results = list(outcome.results)
            slot.reason_code, slot.reason, slot.details = outcome.reason_code, outcome.reason, outcome.details
            slot.retry_kind, slot.retry_after_s = outcome.retry_kind, outcome.retry_after_s
            slot.error_type = outcome.error_type

    def _attempt_key(self, slot: Slot) -> str:
        return attempt_key(self.group, slot.record.topic, slot.record.partition, slot.record.offset)

    def _spend_budget(self, slots: list[Slot]) -> None:
        """Count failed attempts; an event out of budget is dead-lettered (``attempts_exhausted``)."""
        for slot in slots:
            if slot.status != "retry" or slot.retry_kind != "event":
                continue  # outages, deployment problems and unfinished work never spend the budget
            slot.attempts = self.attempts.add(self._attempt_key(slot))
            if slot.attempts < self.max_attempts:
                continue
            last = slot.reason_code or "unknown"
            log.error(
                "%s@%d: %d attempts failed (last: %s, %s); dead-lettering",
                tp_name(slot.tp), slot.record.offset, slot.attempts, last, slot.error_type or "-",
            )  # fmt: skip
            slot.status = "dead_letter"
            slot.reason_code = "attempts_exhausted"
            slot.reason = f"Processing failed {slot.attempts} times; the last error was {last}."
            slot.details = {
                "attempts": slot.attempts,
                "last_reason_code": last,
                "last_error_type": slot.error_type,
            }
            slot.results = [r for r in slot.results if r.get("status") in FINAL_RESULT_STATUSES]
            self.stats.attempts_exhausted += 1

    # -- publishing ------------------------------------------------------------------------------

    def _count_durable(self, slot: Slot) -> None:
        self._finished += 1
        if slot.status == "dead_letter":
            self.stats.dead_lettered += 1
            self.stats.rejected += int(slot.rejected)
        self.stats.written += len(slot.results)
        if slot.incoming is not None:
            self.stats.skipped += len(slot.incoming.event.skipped)
        if self.observer is not None:  # Operations (issue 9)
            self.observer.durable(
                slot.record,
                status=slot.status or "done",
                reason_code=slot.reason_code,
                results=slot.results,
                skipped=slot.incoming.event.skipped if slot.incoming is not None else [],
            )

    def _commit(
        self, consumer: KafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata], records: int
    ) -> bool:
        if not offsets:
            return True
        try:
            consumer.commit(offsets)
        except CommitFailedError:
            # The group rebalanced while the batch ran: the partition's new owner re-reads from the
            # last commit, and re-processing is harmless because the write-back is idempotent.
            self.stats.commit_failures += 1
            log.warning("commit refused after a rebalance; %d partitions go back to the group", len(offsets))
            return False
        except KafkaError as exc:
            # RebalanceInProgressError among others: the batch is read again from its first
            # uncommitted record (_publish_and_commit), which the idempotent write-back makes harmless.
            self.stats.commit_failures += 1
            log.warning("commit failed (%s); the batch is read again", type(exc).__name__)
            return False
        for tp, om in offsets.items():
            log.debug("committed %s up to %d", tp_name(tp), om.offset)
        self.stats.committed += records
        return True

    # -- waiting without leaving the group --------------------------------------------------------

    def _wait_before_retry(
        self, consumer: KafkaConsumer, retries: list[Slot], dispatched: list[Slot], resume_at: dict
    ) -> None:
        kinds = {s.retry_kind for s in retries}
        if "deployment" not in kinds and any(s.status == "done" for s in dispatched):
            self.health.recovered()
        if not retries:
            self._backoff.reset()
            return
        if kinds == {"busy"}:
            return  # still running or queued behind an earlier event: look again at once
        delay = self._backoff.next_delay()
        if "deployment" in kinds:
            self.stats.deployment_pauses += 1
            code = next(s.reason_code for s in retries if s.retry_kind == "deployment")
            self.health.unhealthy(f"the FHIR deployment refuses the worker ({code})")
        asked = [s.retry_after_s for s in retries if s.retry_after_s]
        if asked:
            delay = max(delay, min(max(asked), self.retry_after_max_s))
        where = ", ".join(sorted({f"{tp_name(s.tp)}@{s.record.offset}" for s in retries})[:5])
        log.info("retrying %s (%s) in %.1fs", where, ",".join(sorted(kinds)), delay)
        self.stats.waited_s += self._paused.wait(consumer, delay, resume_at)
