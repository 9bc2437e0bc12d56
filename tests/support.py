"""Small helpers the integration tests share: publish, read a topic, run the real consumer."""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


@dataclass
class Topics:
    events: str
    dlq: str
    results: str
    group: str

    @classmethod
    def fresh(cls, name: str) -> "Topics":
        tag = f"{name}-{uuid.uuid4().hex[:8]}"
        return cls(f"ev-{tag}", f"dlq-{tag}", f"res-{tag}", f"grp-{tag}")


def publish(bootstrap: str, topic: str, events: list[tuple[str | None, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in events:
        producer.send(topic, key=key.encode() if key else None, value=value)
    producer.flush()
    producer.close()


@dataclass
class Record:
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] = field(default_factory=dict)

    def json(self):
        return json.loads(self.value)


def read_topic(bootstrap: str, topic: str, *, idle_s: float = 3.0) -> list[Record]:
    """Every record of every partition of ``topic``, read to each partition's high watermark
    (Tansu's end offsets are wrong on multi-partition topics: see connectors.topic_reader)."""
    from connectors.topic_reader import read_records

    return [Record(m.key, m.value, dict(m.headers or [])) for m in read_records(bootstrap, topic, idle_s=idle_s)]


def committed_offsets(bootstrap: str, topic: str, group: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return {p: consumer.committed(TopicPartition(topic, p)) for p in parts}
    finally:
        consumer.close()


def settings_for(services, topics: Topics):
    from workers.settings import Settings

    return Settings(
        kafka_bootstrap=services.kafka_bootstrap,
        kafka_topic=topics.events,
        kafka_group=topics.group,
        kafka_dlq_topic=topics.dlq,
        kafka_result_topic=topics.results,
        fhir_base_url=services.fhir_base_url,
        redis_url=services.redis_url,
    )


def make_consumer(services, topics: Topics):
    from connectors.kafka import ensure_topics
    from workers.dispatch import build_consumer

    ensure_topics(services.kafka_bootstrap, [topics.events, topics.dlq, topics.results])
    return build_consumer(settings_for(services, topics))


def consume(services, topics: Topics, *, max_events: int, idle_timeout_s: float = 30.0):
    from workers.dispatch import build_dispatcher

    consumer = make_consumer(services, topics)
    return consumer.run(build_dispatcher(settings_for(services, topics)), max_events=max_events, idle_timeout_s=idle_timeout_s)


def consume_in_thread(services, topics: Topics, *, max_events: int):
    from workers.dispatch import build_dispatcher

    consumer = make_consumer(services, topics)
    dispatcher = build_dispatcher(settings_for(services, topics))
    stop = threading.Event()
    box: dict = {}

    def run() -> None:
        box["stats"] = consumer.run(dispatcher, stop=stop, max_events=max_events)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, stop, box
