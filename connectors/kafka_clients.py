"""Kafka clients other than the event consumer: the producer of outcomes and topic creation.

Shared by the consumer (:mod:`connectors.kafka`), the DLQ tools, the local stack and the chaos
run, so every outcome producer has the same durability settings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)

# Producer sends that Kafka has not acknowledged within this time fail, so flush() is bounded.
_DELIVERY_TIMEOUT_MS = 30_000


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
