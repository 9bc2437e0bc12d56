"""From a polled Kafka record to a :class:`connectors.outcomes.Slot`: the size limit, then parsing.

Every record becomes a slot, whatever its bytes: a tombstone (``empty_value``) or a record above
``max_event_bytes`` (``event_too_large``, judged by size before any parsing) is rejected at once;
a parser rejection keeps its code; a parser bug is a rejection too (``parse_error``), never an
exception that would stall the partition. An event with nothing to dispatch (only orders this
worker does not act on) is ``done`` here.
"""

from __future__ import annotations

import logging

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from connectors.outcomes import ConsumerStats, Incoming, Slot, tp_name
from schemas.events import EventRejected, parse_event

log = logging.getLogger(__name__)

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024


def read_record(record: ConsumerRecord, max_event_bytes: int, stats: ConsumerStats) -> Slot:
    """The record's slot: rejected (status ``dead_letter``), ``done``, or with an ``incoming`` to dispatch."""
    tp = TopicPartition(record.topic, record.partition)
    slot = Slot(record=record, tp=tp)
    size = len(record.value) if isinstance(record.value, (bytes, bytearray)) else 0
    if record.value is None:
        slot.status, slot.rejected = "dead_letter", True
        slot.reason_code, slot.reason = "empty_value", "The message has no value (a Kafka tombstone)."
    elif size > max_event_bytes:
        slot.status, slot.rejected = "dead_letter", True
        slot.reason_code = "event_too_large"
        slot.reason = (
            f"The event is {size} bytes; the limit is {max_event_bytes} (EHRW_MAX_EVENT_BYTES). "
            "Send large Bundles as several events."
        )
        stats.too_large += 1
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
            log.error("%s@%d: parser raised %s", tp_name(tp), record.offset, type(exc).__name__)
        else:
            slot.incoming = Incoming(record.topic, record.partition, record.offset, record.key, record.value, event)
            if not event.items and not event.void_orders:  # only orders this worker does not act on
                slot.status = "done"
    if slot.rejected:
        log.info("%s@%d rejected: %s", tp_name(tp), record.offset, slot.reason_code)
    return slot
