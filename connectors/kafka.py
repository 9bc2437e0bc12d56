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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError

from connectors.dlq import (  # noqa: F401 - the header names are part of this module's surface
    H_DETAILS,
    H_REASON,
    H_REASON_CODE,
    H_REJECTED_AT,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    DeadLetter,
    dead_letter_record,
    json_bytes,
    minimal_dead_letter,
    reason_headers,
)
from connectors.retry import AttemptLedger, Backoff, Health, MemoryAttempts, RetryKind, attempt_key
from schemas.events import EventRejected, ParsedEvent, parse_event

log = logging.getLogger(__name__)

# Bound what the fetcher may buffer ahead of the batch being processed (kafka-python prefetches).
_FETCH_MAX_BYTES = 8 * 1024 * 1024
# Producer sends that Kafka has not acknowledged within this time fail, so flush() is bounded.
_DELIVERY_TIMEOUT_MS = 30_000
# How often a waiting consumer polls (paused) to stay in its group.
_KEEPALIVE_EVERY_S = 0.5
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
DEFAULT_DLQ_MAX_BYTES = 1_000_000

Dispatch = Callable[[list["Incoming"]], list["EventOutcome"]]
def make_producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """A producer for outcomes that must not be lost: acks from all in-sync replicas, idempotent
    retries (kafka-python retries until ``delivery_timeout_ms``), a small linger to batch sends.

    ``overrides`` are passed to ``KafkaProducer`` (e.g. ``security_protocol``, ``sasl_*``, ``ssl_*``).
    """
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": "ehr-worker",
        "acks": "all",
        "linger_ms": 5,
        "request_timeout_ms": _DELIVERY_TIMEOUT_MS // 2,  # kafka-python: delivery >= linger + request
        "delivery_timeout_ms": _DELIVERY_TIMEOUT_MS,
    }
    config.update(overrides)
    return KafkaProducer(**config)


def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    *,
    partitions: int = 3,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
    **client_config: Any,
) -> list[str]:
    """Create the topics that do not exist yet (idempotent); returns the names it created.

    Existing topics are left as they are (their partition count is not changed).
    """
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **client_config
    )
    try:
        existing = set(admin.list_topics())
        created = []
        for topic in dict.fromkeys(topics):
            if topic in existing:
                continue
            try:
                admin.create_topics([NewTopic(topic, partitions, replication_factor)])
                created.append(topic)
                log.info("created topic %s (%d partitions)", topic, partitions)
            except TopicAlreadyExistsError:  # another process won the race
                pass
        return created
    finally:
        admin.close()


@dataclass
class Incoming:
    """A valid event, as handed to the dispatcher."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    event: ParsedEvent


@dataclass
class EventOutcome:
    """What the dispatcher made of one :class:`Incoming`.

    ``done``: every order reached a final state; ``results`` (one JSON-able dict per order, with an
    ``"order"`` id used as the message key) go to the result topic. ``dead_letter``: the event goes
    to the dead-letter topic with ``reason_code``/``reason``/``details`` (codes and ids only, never
    event text); its ``results``, if any, are published too. ``retry``: not durable yet; the event
    comes back. ``retry_kind`` says whose fault it was (see :mod:`connectors.retry`), and
    ``retry_after_s`` how long a server asked us to wait; ``error_type`` names the last error's
    type for the ``attempts_exhausted`` dead letter.
    """

    status: Literal["done", "dead_letter", "retry"]
    results: list[dict] = field(default_factory=list)
    reason_code: str | None = None
    reason: str | None = None
    details: dict | None = None
    retry_kind: RetryKind = "event"
    retry_after_s: float | None = None
    error_type: str | None = None


@dataclass
class ConsumerStats:
    """Counters of one :meth:`EventConsumer.run` (records are Kafka messages, results are per order)."""

    consumed: int = 0  # records polled (a record polled again after a retry counts again)
    dispatched: int = 0  # records handed to the dispatcher
    rejected: int = 0  # records that failed parsing/validation (a subset of dead_lettered)
    dead_lettered: int = 0  # records acknowledged on the dead-letter topic
    skipped: int = 0  # non-actionable orders (result events with status "skipped")
    written: int = 0  # result events published for orders the dispatcher finished
    retried: int = 0  # records sent back for another attempt (seek back)
    committed: int = 0  # records whose offsets were committed
    commit_failures: int = 0  # commits refused, e.g. after a rebalance (the records come back)
    batches: int = 0
    attempts_exhausted: int = 0  # records dead-lettered because their attempt budget ran out
    too_large: int = 0  # records rejected by size before parsing
    truncated: int = 0  # dead letters sent as a truncated copy (original too large or refused)
    unsendable: int = 0  # records no copy of which Kafka accepted: committed as skipped, logged
    deployment_pauses: int = 0  # batches that found the deployment broken (consumption paused)
    waited_s: float = 0.0  # time spent waiting (backoff, Retry-After) while staying in the group

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class _FailedSend:
    """Stands in for the future of a send that raised before it was queued. ``permanent``: no copy
    of the record can ever be sent (counted as skipped rather than retried forever)."""

    is_done = True

    def __init__(self, permanent: bool = False) -> None:
        self.permanent = permanent

    def succeeded(self) -> bool:
        return self.permanent


@dataclass
class _Slot:
    """One polled record and what became of it within the batch."""

    record: ConsumerRecord
    tp: TopicPartition
    incoming: Incoming | None = None
    status: Literal["done", "dead_letter", "retry"] | None = None
    reason_code: str | None = None
    reason: str | None = None
    details: dict | None = None
    results: list[dict] = field(default_factory=list)
    rejected: bool = False
    retry_kind: RetryKind = "event"
    retry_after_s: float | None = None
    error_type: str | None = None
    attempts: int | None = None
    futures: list[Any] = field(default_factory=list)
    dead_letter: DeadLetter | None = None
    dead_letter_future: Any = None


class _Rebalance(ConsumerRebalanceListener):
    """Logs assignment changes. Nothing to flush: each batch is published and committed before the
    next poll, and a commit refused after a rebalance only means its records are read again."""

    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            log.info("partitions revoked: %s", _tps(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            log.info("partitions assigned: %s", _tps(assigned))



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
    ) -> None:
        """``client_config``: extra kafka-python settings for both consumer and producer (SASL/TLS).
        ``attempts``: where attempt counts live (default: memory; production: Redis)."""
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
        self._finished = 0
        self._stop = threading.Event()
        self._last_keepalive = 0.0

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
        consumer.subscribe([self.topic], listener=_Rebalance())
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
        slots = [self._parse(r) for r in records]
        # Paused while the batch is worked on, so the keepalive polls return nothing; each
        # partition is sought to its exact next offset on the way out (_resume).
        resume_at = self._pause_all(consumer)
        next_offsets: dict[TopicPartition, int] = {}
        try:
            dispatched = [s for s in slots if s.incoming is not None and s.status is None]
            self._dispatch(consumer, dispatch, dispatched, resume_at)
            self._spend_budget(slots, dispatched)
            next_offsets = self._publish_and_commit(consumer, producer, slots, dispatch)
            self._wait_before_retry(consumer, [s for s in slots if s.status == "retry"], dispatched, resume_at)
        finally:
            self._resume(consumer, {**resume_at, **next_offsets})

    def _publish_and_commit(
        self, consumer: KafkaConsumer, producer: KafkaProducer, slots: list[_Slot], dispatch: Dispatch
    ) -> dict[TopicPartition, int]:
        by_tp: dict[TopicPartition, list[_Slot]] = {}
        for slot in slots:
            by_tp.setdefault(slot.tp, []).append(slot)

        # Only a partition's prefix before its first retry is final; what follows is re-polled
        # (and re-dispatched) after the seek, so publishing it now would duplicate its outputs.
        final: dict[TopicPartition, list[_Slot]] = {}
        for tp, tp_slots in by_tp.items():
            cut = next((i for i, s in enumerate(tp_slots) if s.status == "retry"), len(tp_slots))
            final[tp] = tp_slots[:cut]
            for slot in final[tp]:
                self._publish(producer, slot)
        self._flush(producer)
        self._resend_refused_dead_letters(producer, [s for tp_slots in final.values() for s in tp_slots])

        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        durable_slots: list[_Slot] = []
        next_offsets: dict[TopicPartition, int] = {}
        for tp, tp_slots in by_tp.items():
            durable = 0
            for slot in final[tp]:
                if not all(f.is_done and f.succeeded() for f in slot.futures):
                    log.warning(
                        "%s@%d: outcome not acknowledged by Kafka; retrying", _tp(tp), slot.record.offset
                    )
                    break
                durable += 1
                durable_slots.append(slot)
            if durable:
                offsets[tp] = OffsetAndMetadata(tp_slots[durable - 1].record.offset + 1, "", -1)
            if durable < len(tp_slots):
                next_offsets[tp] = tp_slots[durable].record.offset
                self.stats.retried += len(tp_slots) - durable
                if tp_slots[durable].status != "retry":  # a publish failed: Kafka's problem, not the event's
                    tp_slots[durable].status, tp_slots[durable].retry_kind = "retry", "unavailable"
            else:
                next_offsets[tp] = tp_slots[-1].record.offset + 1

        # A record counts as finished only once its offset is committed: after a refused commit
        # (the group rebalanced during a slow batch) it comes back and is processed again.
        if self._commit(consumer, offsets, len(durable_slots)):
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

    def _parse(self, record: ConsumerRecord) -> _Slot:
        tp = TopicPartition(record.topic, record.partition)
        slot = _Slot(record=record, tp=tp)
        size = len(record.value) if isinstance(record.value, (bytes, bytearray)) else 0
        if record.value is None:
            slot.status, slot.rejected = "dead_letter", True
            slot.reason_code, slot.reason = "empty_value", "The message has no value (a Kafka tombstone)."
        elif size > self.max_event_bytes:
            slot.status, slot.rejected = "dead_letter", True
            slot.reason_code = "event_too_large"
            slot.reason = (
                f"The event is {size} bytes; the limit is {self.max_event_bytes} (EHRW_MAX_EVENT_BYTES). "
                "Send large Bundles as several events."
            )
            self.stats.too_large += 1
        else:
            try:
                event = parse_event(record.value)
            except EventRejected as exc:
                slot.status, slot.rejected = "dead_letter", True
                slot.reason_code, slot.reason = exc.code, exc.message
            except Exception as exc:  # noqa: BLE001 - a parser bug must not stall the partition
                slot.status, slot.rejected = "dead_letter", True
                slot.reason_code = "parse_error"
                slot.reason = f"The event parser failed ({type(exc).__name__}); please report this as a bug."
                log.error("%s@%d: parser raised %s", _tp(tp), record.offset, type(exc).__name__)
            else:
                slot.incoming = Incoming(
                    record.topic, record.partition, record.offset, record.key, record.value, event
                )
                if not event.items:  # nothing to dispatch: only non-actionable orders
                    slot.status = "done"
        if slot.rejected:
            log.info("%s@%d rejected: %s", _tp(tp), record.offset, slot.reason_code)
        return slot

    def _dispatch(
        self,
        consumer: KafkaConsumer,
        dispatch: Dispatch,
        slots: list[_Slot],
        resume_at: dict[TopicPartition, int],
    ) -> None:
        if not slots:
            return
        self.stats.dispatched += len(slots)
        batch = [s.incoming for s in slots if s.incoming is not None]
        try:
            if getattr(dispatch, "accepts_keepalive", False):
                outcomes = dispatch(batch, keepalive=lambda: self._keepalive(consumer, resume_at))  # type: ignore[call-arg]
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

    def _attempt_key(self, slot: _Slot) -> str:
        return attempt_key(self.group, slot.record.topic, slot.record.partition, slot.record.offset)

    def _spend_budget(self, slots: list[_Slot], dispatched: list[_Slot]) -> None:
        """Count failed attempts; an event out of budget is dead-lettered (``attempts_exhausted``)."""
        others_succeeded = any(s.status == "done" for s in dispatched)
        for slot in slots:
            if slot.status != "retry":
                continue
            counts = slot.retry_kind == "event" or (
                slot.retry_kind == "unavailable" and slot.retry_after_s is None and others_succeeded
            )
            if not counts:
                continue
            slot.attempts = self.attempts.add(self._attempt_key(slot))
            if slot.attempts < self.max_attempts:
                continue
            last = slot.reason_code or "unknown"
            log.error(
                "%s@%d: %d attempts failed (last: %s, %s); dead-lettering",
                _tp(slot.tp), slot.record.offset, slot.attempts, last, slot.error_type or "-",
            )  # fmt: skip
            slot.status = "dead_letter"
            slot.reason_code = "attempts_exhausted"
            slot.reason = f"Processing failed {slot.attempts} times; the last error was {last}."
            slot.details = {"attempts": slot.attempts, "last_reason_code": last, "last_error_type": slot.error_type}
            slot.results = [r for r in slot.results if r.get("status") in _FINAL_RESULT_STATUSES]
            self.stats.attempts_exhausted += 1

    # -- publishing ------------------------------------------------------------------------------

    def _publish(self, producer: KafkaProducer, slot: _Slot) -> None:
        rec = slot.record
        if slot.status == "dead_letter":
            ours = reason_headers(
                topic=rec.topic, partition=rec.partition, offset=rec.offset,
                reason_code=slot.reason_code, reason=slot.reason, details=slot.details, attempts=slot.attempts,
            )  # fmt: skip
            try:
                slot.dead_letter = dead_letter_record(rec.key, rec.value, rec.headers, ours, max_bytes=self.dlq_max_bytes)
            except Exception as exc:  # noqa: BLE001 - a record we cannot even copy: the minimal one
                log.error("%s@%d: cannot copy the record (%s)", _tp(slot.tp), rec.offset, type(exc).__name__)
                slot.dead_letter = minimal_dead_letter(DeadLetter(None, b"", ours))
            if slot.dead_letter.value is not rec.value and any(n == "ehrw-truncated" for n, _ in slot.dead_letter.headers):
                self.stats.truncated += 1
            self._send_dead_letter(producer, slot, slot.dead_letter)
        source = [
            ("ehrw-source-topic", rec.topic.encode()),
            ("ehrw-source-partition", str(rec.partition).encode()),
            ("ehrw-source-offset", str(rec.offset).encode()),
        ]
        results = list(slot.results)
        if slot.incoming is not None:
            results += [
                {"order": _order_ref(order), "status": "skipped", "reason_code": code}
                for order, code in slot.incoming.event.skipped
            ]
        for result in results:
            order = result.get("order")
            key = str(order).encode() if order is not None else (rec.key if isinstance(rec.key, bytes) else None)
            self._send(producer, slot, self.result_topic, key, json_bytes(result), source)

    def _send_dead_letter(self, producer: KafkaProducer, slot: _Slot, record: DeadLetter) -> None:
        future = self._send(producer, slot, self.dlq_topic, record.key, record.value, record.headers, final=False)
        if future is None:  # refused before sending (size, a value kafka-python rejects): the minimal copy
            slot.dead_letter = minimal_dead_letter(record)
            self.stats.truncated += 1
            future = self._send(producer, slot, self.dlq_topic, None, slot.dead_letter.value, slot.dead_letter.headers)
        slot.dead_letter_future = future

    def _resend_refused_dead_letters(self, producer: KafkaProducer, slots: list[_Slot]) -> None:
        """A dead letter the broker refused for good (too large for its limit, invalid record) is
        sent again as the minimal copy, so the record cannot come back forever."""
        again = []
        for slot in slots:
            fut = slot.dead_letter_future
            if fut is None or not fut.is_done or fut.succeeded() or isinstance(fut, _FailedSend):
                continue
            exc = getattr(fut, "exception", None)
            if isinstance(exc, KafkaError) and exc.retriable:
                continue
            assert slot.dead_letter is not None
            log.warning("%s@%d: dead letter refused (%s); sending the minimal copy",
                        _tp(slot.tp), slot.record.offset, type(exc).__name__)  # fmt: skip
            slot.futures.remove(fut)
            slot.dead_letter = minimal_dead_letter(slot.dead_letter)
            self.stats.truncated += 1
            self._send(producer, slot, self.dlq_topic, None, slot.dead_letter.value, slot.dead_letter.headers)
            again.append(slot)
        if again:
            self._flush(producer)

    def _send(
        self,
        producer: KafkaProducer,
        slot: _Slot,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        *,
        final: bool = True,
    ) -> Any:
        """Queue one record; returns its future, or None when it was refused and ``final`` is False
        (the caller sends a smaller copy). Nothing raised here can crash the consumer."""
        try:
            future = producer.send(topic, key=key, value=value, headers=headers)
        except KafkaError as exc:
            # Raised before sending (metadata unavailable, record too large...).
            name = type(exc).__name__
            log.error("%s@%d: cannot publish to %s (%s)", _tp(slot.tp), slot.record.offset, topic, name)
            if not final and not exc.retriable:
                return None
            future = _FailedSend()
        except Exception as exc:  # noqa: BLE001 - TypeError/ValueError: kafka-python refused the record
            log.error("%s@%d: record refused for %s (%s)", _tp(slot.tp), slot.record.offset, topic, type(exc).__name__)
            if not final:
                return None
            self.stats.unsendable += 1
            future = _FailedSend(permanent=True)  # no copy can ever be sent: skip rather than loop
        slot.futures.append(future)
        return future

    def _flush(self, producer: KafkaProducer) -> None:
        try:
            producer.flush()
        except KafkaError as exc:  # not-done futures count as failed
            log.warning("producer flush failed (%s); unacknowledged outcomes are retried", type(exc).__name__)

    def _count_durable(self, slot: _Slot) -> None:
        self._finished += 1
        if slot.status == "dead_letter":
            self.stats.dead_lettered += 1
            self.stats.rejected += int(slot.rejected)
        self.stats.written += len(slot.results)
        if slot.incoming is not None:
            self.stats.skipped += len(slot.incoming.event.skipped)

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
            # A later commit covers these offsets; a crash before then only causes a harmless replay.
            self.stats.commit_failures += 1
            log.warning("commit failed (%s); continuing", type(exc).__name__)
            return False
        for tp, om in offsets.items():
            log.debug("committed %s up to %d", _tp(tp), om.offset)
        self.stats.committed += records
        return True

    # -- waiting without leaving the group --------------------------------------------------------

    def _wait_before_retry(
        self, consumer: KafkaConsumer, retries: list[_Slot], dispatched: list[_Slot], resume_at: dict
    ) -> None:
        if any(s.status == "done" for s in dispatched):
            self.health.recovered()
        kinds = {s.retry_kind for s in retries}
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
        where = ", ".join(sorted({f"{_tp(s.tp)}@{s.record.offset}" for s in retries})[:5])
        log.info("retrying %s (%s) in %.1fs", where, ",".join(sorted(kinds)), delay)
        self._wait(consumer, delay, resume_at)

    def _pause_all(self, consumer: KafkaConsumer) -> dict[TopicPartition, int]:
        """Pause every assigned partition; returns where each one stands, to resume from there."""
        positions: dict[TopicPartition, int] = {}
        assigned = list(consumer.assignment())
        for tp in assigned:
            try:
                positions[tp] = consumer.position(tp, timeout_ms=5000)
            except Exception as exc:  # noqa: BLE001 - unknown position: resumes from the committed offset
                log.debug("%s: no position (%s)", _tp(tp), type(exc).__name__)
        if assigned:
            consumer.pause(*assigned)
        self._last_keepalive = time.monotonic()
        return positions

    def _keepalive(self, consumer: KafkaConsumer, resume_at: dict[TopicPartition, int]) -> None:
        """Poll while paused so the group does not evict us; a partition assigned meanwhile (a
        rebalance) is paused too, and what it returned is read again later."""
        now = time.monotonic()
        if now - self._last_keepalive < _KEEPALIVE_EVERY_S:
            return
        self._last_keepalive = now
        try:
            polled = consumer.poll(timeout_ms=0)
        except Exception as exc:  # noqa: BLE001 - the next real poll reports it
            log.debug("keepalive poll failed (%s)", type(exc).__name__)
            return
        for tp, recs in polled.items():
            resume_at.setdefault(tp, min(r.offset for r in recs))
            consumer.pause(tp)
        unpaused = [tp for tp in consumer.assignment() if tp not in consumer.paused()]
        if unpaused:
            consumer.pause(*unpaused)

    def _wait(self, consumer: KafkaConsumer, seconds: float, resume_at: dict[TopicPartition, int]) -> None:
        start = time.monotonic()
        end = start + seconds
        while not self._stop.is_set() and time.monotonic() < end:
            self._stop.wait(min(_KEEPALIVE_EVERY_S, max(0.0, end - time.monotonic())))
            self._keepalive(consumer, resume_at)
        self.stats.waited_s += time.monotonic() - start

    def _resume(self, consumer: KafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        assigned = consumer.assignment()
        for tp in assigned:
            if tp not in offsets:
                continue
            try:
                consumer.seek(tp, offsets[tp])
            except (ValueError, KafkaError, AssertionError):  # revoked meanwhile: its new owner reads from the commit
                log.info("%s no longer assigned; its new owner resumes at the commit", _tp(tp))
        if assigned:
            consumer.resume(*assigned)


_FINAL_RESULT_STATUSES = frozenset({"written", "skipped", "no_suggestion", "rejected"})


def _order_ref(order_id: str) -> str:
    # The same "ServiceRequest/{id}" form the workers use in their result events.
    return order_id if "/" in order_id else f"ServiceRequest/{order_id}"


def _tp(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


def _tps(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(sorted(_tp(tp) for tp in tps))
