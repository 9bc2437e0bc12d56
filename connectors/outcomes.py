"""Publishing one batch's outcomes: dead letters and result events, whatever the record held.

Nothing here raises to the consumer: a send kafka-python refuses becomes a smaller copy (see
:mod:`connectors.dlq`), a failed future means "not durable yet" (the record is retried), and a
record of which no copy at all can be sent is counted as ``unsendable`` and skipped rather than
retried for ever.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kafka import KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from connectors.dlq import DeadLetter, dead_letter_record, json_bytes, minimal_dead_letter, reason_headers
from connectors.retry import RetryKind
from schemas.events import ParsedEvent
from schemas.outcomes import ORDER_STATUSES

log = logging.getLogger(__name__)

# Result statuses that are an order's final word (the others ask the consumer to retry).
FINAL_RESULT_STATUSES = frozenset(ORDER_STATUSES)


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


class FailedSend:
    """Stands in for the future of a send that raised before it was queued. ``permanent``: no copy
    of the record can ever be sent (counted as skipped rather than retried forever)."""

    is_done = True

    def __init__(self, permanent: bool = False) -> None:
        self.permanent = permanent

    def succeeded(self) -> bool:
        return self.permanent


@dataclass
class Slot:
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


class OutcomePublisher:
    """Sends the dead letters and result events of a batch's final records."""

    def __init__(
        self, stats: ConsumerStats, *, dlq_topic: str, result_topic: str, dlq_max_bytes: int
    ) -> None:
        self.stats = stats
        self.dlq_topic = dlq_topic
        self.result_topic = result_topic
        self.dlq_max_bytes = dlq_max_bytes

    def publish(self, producer: KafkaProducer, slot: Slot) -> None:
        rec = slot.record
        if slot.status == "dead_letter":
            ours = reason_headers(
                topic=rec.topic, partition=rec.partition, offset=rec.offset,
                reason_code=slot.reason_code, reason=slot.reason, details=slot.details, attempts=slot.attempts,
            )  # fmt: skip
            try:
                slot.dead_letter = dead_letter_record(
                    rec.key, rec.value, rec.headers, ours, max_bytes=self.dlq_max_bytes
                )
            except Exception as exc:  # noqa: BLE001 - a record we cannot even copy: the minimal one
                log.error(
                    "%s@%d: cannot copy the record (%s)", tp_name(slot.tp), rec.offset, type(exc).__name__
                )
                slot.dead_letter = minimal_dead_letter(DeadLetter(None, b"", ours))
            if slot.dead_letter.value is not rec.value and any(
                n == "ehrw-truncated" for n, _ in slot.dead_letter.headers
            ):
                self.stats.truncated += 1
            self._send_dead_letter(producer, slot, slot.dead_letter)
        source = [
            ("ehrw-source-topic", rec.topic.encode()),
            ("ehrw-source-partition", str(rec.partition).encode()),
            ("ehrw-source-offset", str(rec.offset).encode()),
        ]
        results = list(slot.results)
        if slot.incoming is not None:
            reported = {r.get("order") for r in results}  # void orders' tasks report themselves
            results += [
                {"order": order_ref(order), "status": "skipped", "reason_code": code}
                for order, code in slot.incoming.event.skipped
                if order_ref(order) not in reported
            ]
        for result in results:
            order = result.get("order")
            key = (
                str(order).encode()
                if order is not None
                else (rec.key if isinstance(rec.key, bytes) else None)
            )
            self.send(producer, slot, self.result_topic, key, json_bytes(result), source)

    def _send_dead_letter(self, producer: KafkaProducer, slot: Slot, record: DeadLetter) -> None:
        future = self.send(
            producer, slot, self.dlq_topic, record.key, record.value, record.headers, final=False
        )
        if future is None:  # refused before sending (size, a value kafka-python rejects): the minimal copy
            slot.dead_letter = minimal_dead_letter(record)
            self.stats.truncated += 1
            future = self.send(
                producer, slot, self.dlq_topic, None, slot.dead_letter.value, slot.dead_letter.headers
            )
        slot.dead_letter_future = future

    def resend_refused_dead_letters(self, producer: KafkaProducer, slots: list[Slot]) -> None:
        """A dead letter the broker refused for good (too large for its limit, invalid record) is
        sent again as the minimal copy, so the record cannot come back forever."""
        again = []
        for slot in slots:
            fut = slot.dead_letter_future
            if fut is None or not fut.is_done or fut.succeeded() or isinstance(fut, FailedSend):
                continue
            exc = getattr(fut, "exception", None)
            if isinstance(exc, KafkaError) and exc.retriable:
                continue
            assert slot.dead_letter is not None
            log.warning("%s@%d: dead letter refused (%s); sending the minimal copy",
                        tp_name(slot.tp), slot.record.offset, type(exc).__name__)  # fmt: skip
            slot.futures.remove(fut)
            slot.dead_letter = minimal_dead_letter(slot.dead_letter)
            self.stats.truncated += 1
            self.send(producer, slot, self.dlq_topic, None, slot.dead_letter.value, slot.dead_letter.headers)
            again.append(slot)
        if again:
            self.flush(producer)

    def send(
        self,
        producer: KafkaProducer,
        slot: Slot,
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
            log.error("%s@%d: cannot publish to %s (%s)", tp_name(slot.tp), slot.record.offset, topic, name)
            if not final and not exc.retriable:
                return None
            future = FailedSend()
        except Exception as exc:  # noqa: BLE001 - TypeError/ValueError: kafka-python refused the record
            log.error(
                "%s@%d: record refused for %s (%s)",
                tp_name(slot.tp),
                slot.record.offset,
                topic,
                type(exc).__name__,
            )
            if not final:
                return None
            self.stats.unsendable += 1
            future = FailedSend(permanent=True)  # no copy can ever be sent: skip rather than loop
        slot.futures.append(future)
        return future

    def flush(self, producer: KafkaProducer) -> None:
        try:
            producer.flush()
        except KafkaError as exc:  # not-done futures count as failed
            log.warning("producer flush failed (%s); unacknowledged outcomes are retried", type(exc).__name__)


def order_ref(order_id: str) -> str:
    # The same "ServiceRequest/{id}" form the workers use in their result events.
    return order_id if "/" in order_id else f"ServiceRequest/{order_id}"


def tp_name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"
