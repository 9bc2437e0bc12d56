"""connectors.kafka against a real Kafka-compatible broker (Tansu), with scripted dispatchers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from connectors.embedded import EmbeddedServices
from connectors.kafka import EventConsumer, EventOutcome, Incoming, ensure_topics

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory) -> Iterator[str]:
    with EmbeddedServices(tmp_path_factory.mktemp("kafka"), fhir=False, redis=False) as services:
        yield services.kafka_bootstrap


def _names(prefix: str) -> dict[str, str]:
    tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return {"topic": f"ev-{tag}", "dlq_topic": f"dlq-{tag}", "result_topic": f"res-{tag}",
            "group": f"g-{tag}"}  # fmt: skip


def _consumer(bootstrap: str, names: dict[str, str], *, partitions: int = 1, **kw) -> EventConsumer:
    ensure_topics(bootstrap, [names["topic"]], partitions=partitions)
    ensure_topics(bootstrap, [names["dlq_topic"], names["result_topic"]], partitions=1)
    kw.setdefault("retry_backoff_s", 0.2)
    return EventConsumer(bootstrap=bootstrap, **names, **kw)


def _publish(
    bootstrap: str, topic: str, events: list[tuple[str | None, bytes]], partition: int | None = None
) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in events:
        producer.send(topic, key=key.encode() if key else None, value=value, partition=partition,
                      headers=[("traceparent", b"00-abc-01")])  # fmt: skip
    producer.flush()
    producer.close()


def _read_all(bootstrap: str, topic: str) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        records: list = []
        deadline = time.monotonic() + 20
        while any(consumer.position(p) < end[p] for p in parts) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def _committed(bootstrap: str, topic: str, group: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in consumer.partitions_for_topic(topic)}
    finally:
        consumer.close()


def _sr(order_id: str, **changes) -> dict:
    sr = {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "code": {"text": "CT head without contrast"},
    }
    sr.update(changes)
    return {k: v for k, v in sr.items() if v is not None}


def _raw(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def _order_ids(inc: Incoming) -> list[str]:
    return [item.service_request["id"] for item in inc.event.items]


def _result(inc: Incoming) -> dict:
    return {"order": f"ServiceRequest/{_order_ids(inc)[0]}", "status": "written"}


def test_ensure_topics_is_idempotent(bootstrap):
    a, b = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    assert ensure_topics(bootstrap, [a, b, a], partitions=2) == [a, b]
    assert ensure_topics(bootstrap, [a, b]) == []
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        assert consumer.partitions_for_topic(a) == {0, 1}
    finally:
        consumer.close()


def test_outcomes_dead_letters_results_and_commits(bootstrap):
    names = _names("mixed")
    bundle = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": _sr("x")}]})
    events: list[tuple[str | None, bytes]] = [
        ("sr-1", _raw(_sr("sr-1"))),  # 0 done
        (None, b"not json{"),  # 1
        ("b-1", bundle[:40].encode()),  # 2 truncated Bundle
        ("p-1", _raw({"resourceType": "Patient", "id": "p-1"})),  # 3
        ("sr-x", _raw(_sr("sr-x", subject=None))),  # 4
        ("sr-y", _raw(_sr("sr-y", status="bogus"))),  # 5
        ("sr-2", _raw(_sr("sr-2"))),  # 6 retry once, then done
        ("sr-3", _raw(_sr("sr-3", status="completed"))),  # 7 skipped, never dispatched
        ("sr-4", _raw(_sr("sr-4"))),  # 8 permanent failure -> dead letter with details
        ("sr-5", _raw(_sr("sr-5"))),  # 9 done
    ]
    consumer = _consumer(bootstrap, names, max_in_flight=4)
    _publish(bootstrap, names["topic"], events)

    seen: Counter[str] = Counter()
    batch_sizes: list[int] = []
    outcome_400 = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "structure"}]}

    def dispatch(batch: list[Incoming]) -> list[EventOutcome]:
        batch_sizes.append(len(batch))
        outcomes = []
        for inc in batch:
            (oid,) = _order_ids(inc)
            seen[oid] += 1
            result = {"order": f"ServiceRequest/{oid}", "status": "written"}
            if oid == "sr-2" and seen[oid] == 1:
                outcomes.append(EventOutcome("retry", reason_code="fhir_unavailable"))
            elif oid == "sr-4":
                outcomes.append(
                    EventOutcome(
                        "dead_letter",
                        results=[{**result, "status": "rejected"}],
                        reason_code="fhir_rejected_writeback",
                        reason="The FHIR server refused the write-back transaction with 400.",
                        details={"operation_outcome": outcome_400},
                    )
                )
            else:
                outcomes.append(EventOutcome("done", results=[result]))
        return outcomes

    stats = consumer.run(dispatch, max_events=len(events), idle_timeout_s=30)

    assert max(batch_sizes) <= 4
    assert seen == {"sr-1": 1, "sr-2": 2, "sr-4": 1, "sr-5": 1}
    assert (stats.dead_lettered, stats.rejected, stats.skipped, stats.written) == (6, 5, 1, 4)
    assert stats.retried >= 1 and stats.committed == len(events)
    assert _committed(bootstrap, names["topic"], names["group"]) == {0: len(events)}

    dlq = _read_all(bootstrap, names["dlq_topic"])
    assert [int(dict(r.headers)["ehrw-source-offset"]) for r in dlq] == [1, 2, 3, 4, 5, 8]
    codes = [dict(r.headers)["ehrw-reason-code"].decode() for r in dlq]
    assert codes == ["not_json", "not_json", "unsupported_resource_type", "missing_subject", "invalid_status",
                     "fhir_rejected_writeback"]  # fmt: skip
    for record in dlq:
        headers = dict(record.headers)
        offset = int(headers["ehrw-source-offset"])
        key, value = events[offset]
        assert record.value == value  # the original bytes, untouched
        assert record.key == (key.encode() if key else None)
        assert headers["ehrw-source-topic"].decode() == names["topic"]
        assert headers["ehrw-source-partition"] == b"0"
        assert headers["ehrw-reason"] and headers["ehrw-rejected-at"].endswith(b"Z")
        assert headers["traceparent"] == b"00-abc-01"  # the producer's own headers travel along
    assert json.loads(dict(dlq[-1].headers)["ehrw-details"]) == {"operation_outcome": outcome_400}

    results = [(r.key.decode(), json.loads(r.value)) for r in _read_all(bootstrap, names["result_topic"])]
    assert [(k, v["status"]) for k, v in results] == [
        ("ServiceRequest/sr-1", "written"),
        ("ServiceRequest/sr-2", "written"),  # once, although dispatched twice
        ("ServiceRequest/sr-3", "skipped"),
        ("ServiceRequest/sr-4", "rejected"),
        ("ServiceRequest/sr-5", "written"),
    ]
    skipped = {"order": "ServiceRequest/sr-3", "status": "skipped", "reason_code": "status_completed"}
    assert results[2][1] == skipped

    # A new consumer in the same group starts after the committed position: only new events.
    _publish(bootstrap, names["topic"], [("sr-6", _raw(_sr("sr-6")))])
    seen.clear()
    again = _consumer(bootstrap, names, max_in_flight=4).run(dispatch, max_events=1, idle_timeout_s=30)
    assert seen == {"sr-6": 1} and again.consumed == 1
    assert _committed(bootstrap, names["topic"], names["group"]) == {0: len(events) + 1}


def test_dispatch_exception_retries_batch_and_partitions_flow(bootstrap):
    names = _names("exc")
    consumer = _consumer(bootstrap, names, partitions=3, max_in_flight=3)
    for p in range(3):
        orders = [(f"o-{p}-{i}", _raw(_sr(f"o-{p}-{i}"))) for i in range(4)]
        _publish(bootstrap, names["topic"], orders, partition=p)

    calls = {"n": 0}
    order: dict[int, list[int]] = {}

    def dispatch(batch: list[Incoming]) -> list[EventOutcome]:
        calls["n"] += 1
        assert len(batch) <= 3  # backpressure: never more than max_in_flight at once
        if calls["n"] == 2:
            raise ConnectionError("worker pool unavailable")
        for inc in batch:
            order.setdefault(inc.partition, []).append(inc.offset)
        return [EventOutcome("done", results=[_result(i)]) for i in batch]

    stats = consumer.run(dispatch, max_events=12, idle_timeout_s=30)
    assert stats.committed == 12 and stats.retried >= 1
    assert _committed(bootstrap, names["topic"], names["group"]) == {0: 4, 1: 4, 2: 4}
    for offsets in order.values():
        assert offsets == sorted(offsets) == [0, 1, 2, 3]  # in order; the failed batch ran again
    results = _read_all(bootstrap, names["result_topic"])
    expected = sorted(f"ServiceRequest/o-{p}-{i}" for p in range(3) for i in range(4))
    assert sorted(r.key.decode() for r in results) == expected


def test_stop_event_and_idle_timeout(bootstrap):
    names = _names("stop")
    consumer = _consumer(bootstrap, names)
    stop = threading.Event()
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("stats", consumer.run(lambda b: [], stop=stop)))
    thread.start()
    time.sleep(1.0)
    stop.set()
    thread.join(timeout=15)
    assert not thread.is_alive() and box["stats"].consumed == 0

    start = time.monotonic()
    _consumer(bootstrap, names).run(lambda b: [], idle_timeout_s=1.0)
    assert time.monotonic() - start < 15
