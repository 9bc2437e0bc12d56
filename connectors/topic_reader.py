"""Reading a whole topic, every partition from its beginning to its end, without trusting ListOffsets.

Tansu answers ListOffsets (``end_offsets``) with 1 for every partition of a multi-partition
topic, whatever it holds, so a reader that stops at the end offsets stops early. The high
watermark in each fetch response is right, so a partition is read to its end when the position
reaches the high watermark the broker reported for it; a partition that never reports one (a
broker that omits it) counts as read once nothing has arrived for ``idle_s``.

Used by the DLQ tools (:mod:`connectors.dlq_replay`), the chaos table and the tests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord


def read_records(
    bootstrap: str,
    topic: str,
    *,
    idle_s: float = 3.0,
    timeout_s: float = 120.0,
    client_config: Mapping[str, Any] | None = None,
) -> list[ConsumerRecord]:
    """Every record of ``topic`` as of now, in partition and offset order.

    Raises ``TimeoutError`` when the partitions are still short of their high watermark after
    ``timeout_s``."""
    config: dict[str, Any] = {"max_partition_fetch_bytes": 4 << 20, **dict(client_config or {})}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, **config)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while True:
            polled = consumer.poll(timeout_ms=200)
            for batch in polled.values():
                records.extend(batch)
            if polled:
                last = time.monotonic()
            if all(_at_end(consumer, tp) for tp in tps) and not polled:
                break
            if time.monotonic() - last >= idle_s:
                break  # no high watermark reported for some partition, and nothing new: read
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} from {bootstrap} took longer than {timeout_s:.0f}s")
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def _at_end(consumer: KafkaConsumer, tp: TopicPartition) -> bool:
    highwater = consumer.highwater(tp)
    return highwater is not None and consumer.position(tp) >= highwater
