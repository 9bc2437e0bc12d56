"""Kafka in and out: the event consumer with at-least-once input and durable outcomes.

Delivery contract (DESIGN.md, "at-least-once in, exactly-once effect out"):

- Offsets are committed by hand, and only past records whose outcome is durable: the dispatcher
  reported ``done`` (suggestions written) and the result events are acknowledged by Kafka, or the
  record is acknowledged on the dead-letter topic. A crash anywhere re-delivers the uncommitted
  records; the idempotent write-back makes the replay harmless.
- A ``retry`` outcome (or a publish that Kafka did not acknowledge) stops the commit of its
  partition just before that record; the consumer seeks back to it, sleeps a growing backoff and
  polls again. Records after it in the same partition are re-processed too, so per-order ordering
  (key = ServiceRequest id) holds. (Not ``pause()``/``resume()``: kafka-python 3.0.12 never
  re-fetches a partition whose prefetched records were parked while it was paused.)
- Backpressure: at most ``max_in_flight`` records are handed out per poll, and the next poll
  happens only when the batch's outcomes are known, so a slow FHIR server slows consumption
  instead of growing memory (the fetch buffer is also bounded, see ``_FETCH_MAX_BYTES``).

Nothing here logs a message value or key content beyond ids: values are clinical orders (PHI).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError

from connectors.observer import ConsumerObserver  # Operations (issue 9)
from schemas.events import EventRejected, ParsedEvent, parse_event

log = logging.getLogger(__name__)

# Bound what the fetcher may buffer ahead of the batch being processed (kafka-python prefetches).
_FETCH_MAX_BYTES = 8 * 1024 * 1024
# Producer sends that Kafka has not acknowledged within this time fail, so flush() is bounded.
_DELIVERY_TIMEOUT_MS = 30_000

H_REASON_CODE = "ehrw-reason-code"
H_REASON = "ehrw-reason"
H_DETAILS = "ehrw-details"
H_SOURCE_TOPIC = "ehrw-source-topic"
H_SOURCE_PARTITION = "ehrw-source-partition"
H_SOURCE_OFFSET = "ehrw-source-offset"
H_REJECTED_AT = "ehrw-rejected-at"

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
    to the dead-letter topic with ``reason_code``/``reason``/``details`` (e.g. the OperationOutcome);
    its ``results``, if any, are published too. ``retry``: not durable yet; the event comes back.
    """

    status: Literal["done", "dead_letter", "retry"]
    results: list[dict] = field(default_factory=list)
    reason_code: str | None = None
    reason: str | None = None
    details: dict | None = None


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

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _FailedSend:
    """Stands in for the future of a send that raised before it was queued."""

    is_done = True

    def succeeded(self) -> bool:
        return False


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
    futures: list[Any] = field(default_factory=list)


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
        client_id: str = "ehr-worker",
        stats: ConsumerStats | None = None,
        client_config: Mapping[str, Any] | None = None,
        observer: ConsumerObserver | None = None,  # Operations (issue 9): metrics
    ) -> None:
        """``client_config``: extra kafka-python settings for both consumer and producer (SASL/TLS).
        ``observer``: told what was polled, what became durable and what was retried (metrics)."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.dlq_topic = dlq_topic
        self.result_topic = result_topic
        self.max_in_flight = max_in_flight
        self.poll_timeout_s = poll_timeout_s
        self.max_poll_interval_ms = max_poll_interval_ms
        self.session_timeout_ms = session_timeout_ms
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.client_id = client_id
        self.stats = stats or ConsumerStats()
        self.client_config = dict(client_config or {})
        self.observer = observer  # Operations (issue 9)
        self._retry_delay_s = retry_backoff_s
        self._finished = 0
        self._stop = threading.Event()

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
        producer = make_producer(self.bootstrap, client_id=f"{self.client_id}-out", **self.client_config)
        try:
            consumer = self._make_consumer()
        except BaseException:
            producer.close(timeout=5)
            raise
        self._stop = stop
        self._retry_delay_s = self.retry_backoff_s
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
        self._dispatch(dispatch, [s for s in slots if s.incoming is not None and s.status is None])

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
        try:
            producer.flush()
        except KafkaError as exc:  # not-done futures count as failed below
            log.warning("producer flush failed (%s); unacknowledged outcomes are retried", type(exc).__name__)

        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        durable_slots: list[_Slot] = []
        retry_at: dict[TopicPartition, int] = {}
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
                retry_at[tp] = tp_slots[durable].record.offset
                self.stats.retried += len(tp_slots) - durable
                if self.observer is not None:  # Operations (issue 9)
                    self.observer.retried(len(tp_slots) - durable)

        # A record counts as finished only once its offset is committed: after a refused commit
        # (the group rebalanced during a slow batch) it comes back and is processed again.
        if self._commit(consumer, offsets, len(durable_slots)):
            for slot in durable_slots:
                self._count_durable(slot)
        if retry_at:
            self._back_off(consumer, retry_at)
        else:
            self._retry_delay_s = self.retry_backoff_s  # success resets the backoff

    def _parse(self, record: ConsumerRecord) -> _Slot:
        tp = TopicPartition(record.topic, record.partition)
        slot = _Slot(record=record, tp=tp)
        if record.value is None:
            slot.status, slot.rejected = "dead_letter", True
            slot.reason_code, slot.reason = "empty_value", "The message has no value (a Kafka tombstone)."
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

    def _dispatch(self, dispatch: Dispatch, slots: list[_Slot]) -> None:
        if not slots:
            return
        self.stats.dispatched += len(slots)
        try:
            outcomes = dispatch([s.incoming for s in slots if s.incoming is not None])
            if len(outcomes) != len(slots):
                raise RuntimeError(f"dispatch returned {len(outcomes)} outcomes for {len(slots)} events")
        except Exception as exc:  # noqa: BLE001 - the batch is simply not durable yet
            # The type only: exception text may quote event content.
            log.error("dispatch failed (%s); %d events will be retried", type(exc).__name__, len(slots))
            log.debug("dispatch failure", exc_info=True)
            for slot in slots:
                slot.status = "retry"
            return
        for slot, outcome in zip(slots, outcomes):
            slot.status = outcome.status
            slot.results = list(outcome.results)
            slot.reason_code, slot.reason, slot.details = outcome.reason_code, outcome.reason, outcome.details

    def _publish(self, producer: KafkaProducer, slot: _Slot) -> None:
        rec = slot.record
        source = [
            (H_SOURCE_TOPIC, rec.topic.encode()),
            (H_SOURCE_PARTITION, str(rec.partition).encode()),
            (H_SOURCE_OFFSET, str(rec.offset).encode()),
        ]
        if slot.status == "dead_letter":
            ours = [
                (H_REASON_CODE, (slot.reason_code or "unspecified").encode()),
                (H_REASON, (slot.reason or "").encode()),
                *source,
                (H_REJECTED_AT, _now_iso().encode()),
            ]
            if slot.details is not None:
                ours.append((H_DETAILS, _json_bytes(slot.details)))
            # Keep the producer's own headers (tracing ids...) next to ours.
            original = [(k, v) for k, v in (rec.headers or []) if not k.startswith("ehrw-")]
            self._send(producer, slot, self.dlq_topic, rec.key, rec.value, original + ours)
        results = list(slot.results)
        if slot.incoming is not None:
            results += [
                {"order": _order_ref(order), "status": "skipped", "reason_code": code}
                for order, code in slot.incoming.event.skipped
            ]
        for result in results:
            order = result.get("order")
            key = str(order).encode() if order is not None else rec.key
            self._send(producer, slot, self.result_topic, key, _json_bytes(result), source)

    def _send(
        self,
        producer: KafkaProducer,
        slot: _Slot,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        try:
            slot.futures.append(producer.send(topic, key=key, value=value, headers=headers))
        except KafkaError as exc:
            # Raised before sending (metadata unavailable, record too large...): the outcome is not
            # durable, so the record is retried rather than the consumer crashing.
            name = type(exc).__name__
            log.error("%s@%d: cannot publish to %s (%s)", _tp(slot.tp), slot.record.offset, topic, name)
            slot.futures.append(_FailedSend())

    def _count_durable(self, slot: _Slot) -> None:
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
            # A later commit covers these offsets; a crash before then only causes a harmless replay.
            self.stats.commit_failures += 1
            log.warning("commit failed (%s); continuing", type(exc).__name__)
            return False
        for tp, om in offsets.items():
            log.debug("committed %s up to %d", _tp(tp), om.offset)
        self.stats.committed += records
        return True

    def _back_off(self, consumer: KafkaConsumer, retry_at: dict[TopicPartition, int]) -> None:
        for tp, offset in retry_at.items():
            try:
                consumer.seek(tp, offset)
            except (ValueError, KafkaError):  # revoked meanwhile: its new owner reads from the commit
                log.info("%s no longer assigned; its new owner will retry offset %d", _tp(tp), offset)
        delay = self._retry_delay_s
        # Sleeping past max_poll_interval_ms would get this consumer evicted from the group.
        cap = min(self.retry_backoff_max_s, self.max_poll_interval_ms / 2000)
        self._retry_delay_s = min(delay * 2, cap)
        log.info("retrying %s in %.1fs", ", ".join(f"{_tp(tp)}@{o}" for tp, o in retry_at.items()), delay)
        self._stop.wait(min(delay, cap))


def _json_bytes(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _order_ref(order_id: str) -> str:
    # The same "ServiceRequest/{id}" form the workers use in their result events.
    return order_id if "/" in order_id else f"ServiceRequest/{order_id}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _tp(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


def _tps(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(sorted(_tp(tp) for tp in tps))
