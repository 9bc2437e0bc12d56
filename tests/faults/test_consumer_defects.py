"""Issue 8, consumer side: each defect reproduced against a real broker (Tansu), scripted dispatchers.

Every test here failed on the code before the fix (a crash loop, an endless retry, a missing
parameter or a rebalance) and passes now.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections import Counter

import pytest
from kafka import KafkaProducer

from connectors.kafka import EventConsumer, EventOutcome, Incoming
from connectors.retry import RedisAttempts
from tests.test_connectors_kafka import (
    _committed,
    _consumer,
    _names,
    _order_ids,
    _publish,
    _raw,
    _read_all,
    _result,
    _sr,
)

pytestmark = pytest.mark.services

NULL = b"\x00<null>"  # stands for a null header value in _publish_raw


def _publish_raw(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None, list]]) -> None:
    """Publish what other clients (librdkafka, Java) can produce but kafka-python's producer refuses:
    a null value without a key, a header with a null value. The record encoder writes both; only
    ``send``'s argument checks refuse them, so the nulls are swapped in at the encoder."""
    from kafka.record.default_records import DefaultRecordBatchBuilder

    encode = DefaultRecordBatchBuilder.append

    def encode_with_nulls(self, offset, timestamp, key, value, headers, *args, **kwargs):
        headers = [(k, None if v == NULL else v) for k, v in headers]
        return encode(self, offset, timestamp, key, value, headers, *args, **kwargs)

    DefaultRecordBatchBuilder.append = encode_with_nulls
    try:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                 value_serializer=lambda v: None if v == NULL else v)  # fmt: skip
        for key, value, headers in records:
            producer.send(topic, key=key, value=NULL if value is None else value, headers=headers)
        producer.flush()
        producer.close()
    finally:
        DefaultRecordBatchBuilder.append = encode


def _done_except(poison: set[str], seen: Counter, *, kind: str = "event", **retry) -> callable:
    def dispatch(batch: list[Incoming]) -> list[EventOutcome]:
        outcomes = []
        for inc in batch:
            (oid,) = _order_ids(inc)
            seen[oid] += 1
            if oid in poison:
                outcomes.append(EventOutcome("retry", reason_code="task_error", error_type="KeyError",
                                             retry_kind=kind, **retry))  # fmt: skip
            else:
                outcomes.append(EventOutcome("done", results=[_result(inc)]))
        return outcomes

    return dispatch


def test_poison_event_is_dead_lettered_after_its_attempt_budget_across_restarts(bootstrap):
    """Defect 1: the budget is kept in Redis, so a new consumer continues the count."""
    names = _names("poison")
    events = [
        ("good-1", _raw(_sr("good-1"))),
        ("poison-1", _raw(_sr("poison-1"))),
        ("good-2", _raw(_sr("good-2"))),
    ]
    ledger_prefix = f"test:attempts:{uuid.uuid4().hex[:8]}:"
    seen: Counter[str] = Counter()
    first = _consumer(
        bootstrap,
        names,
        max_attempts=3,
        attempts=RedisAttempts(os.environ["EHRW_REDIS_URL"], prefix=ledger_prefix),
    )
    _publish(bootstrap, names["topic"], events)
    stop = threading.Event()
    inner = _done_except({"poison-1"}, seen)

    def dispatch_then_crash(batch):
        out = inner(batch)
        if seen["poison-1"] >= 2:
            stop.set()  # the consumer "dies" after two failed attempts
        return out

    first.run(dispatch_then_crash, stop=stop, idle_timeout_s=30)
    assert seen["poison-1"] == 2 and _read_all(bootstrap, names["dlq_topic"]) == []

    again = _consumer(
        bootstrap,
        names,
        max_attempts=3,
        attempts=RedisAttempts(os.environ["EHRW_REDIS_URL"], prefix=ledger_prefix),
    )
    stats = again.run(inner, max_events=2, idle_timeout_s=30)
    assert seen["poison-1"] == 3  # one more attempt, not three more
    assert stats.attempts_exhausted == 1
    (dead,) = _read_all(bootstrap, names["dlq_topic"])
    headers = dict(dead.headers)
    assert dead.value == events[1][1]
    assert headers["ehrw-reason-code"] == b"attempts_exhausted" and headers["ehrw-attempts"] == b"3"
    details = json.loads(headers["ehrw-details"])
    assert details == {"attempts": 3, "last_reason_code": "task_error", "last_error_type": "KeyError"}
    assert _committed(bootstrap, names["topic"], names["group"]) == {0: 3}
    results = [r.key.decode() for r in _read_all(bootstrap, names["result_topic"])]
    assert results == ["ServiceRequest/good-1", "ServiceRequest/good-2"]


def test_outages_and_deployment_problems_never_spend_the_budget_or_dead_letter(bootstrap):
    """Defect 5: an expired token (deployment) pauses consumption and reports unhealthy; an
    outage (unavailable) waits. Neither dead-letters, however often it happens."""
    names = _names("deploy")
    events = [(f"o-{i}", _raw(_sr(f"o-{i}"))) for i in range(3)]
    consumer = _consumer(bootstrap, names, max_attempts=2, retry_backoff_s=0.1, retry_backoff_max_s=0.2)
    _publish(bootstrap, names["topic"], events)
    calls = {"n": 0}
    health: list[bool] = []

    def dispatch(batch: list[Incoming]) -> list[EventOutcome]:
        calls["n"] += 1
        health.append(consumer.health.healthy)
        if calls["n"] <= 4:
            kind = "deployment" if calls["n"] % 2 else "unavailable"
            return [EventOutcome("retry", reason_code="fhir_deployment", retry_kind=kind) for _ in batch]
        return [EventOutcome("done", results=[_result(i)]) for i in batch]

    stats = consumer.run(dispatch, max_events=3, idle_timeout_s=30)
    assert _read_all(bootstrap, names["dlq_topic"]) == []
    assert stats.deployment_pauses == 2 and stats.committed == 3
    assert health[0] is True and False in health and consumer.health.healthy


def test_records_kafka_python_refuses_to_resend_are_dead_lettered_not_crash_looped(bootstrap):
    """Defect 2: a null header value (TypeError) and a keyless tombstone (ValueError) used to
    crash the consumer on every restart."""
    names = _names("refused")
    consumer = _consumer(bootstrap, names)
    _publish_raw(
        bootstrap,
        names["topic"],
        [
            (None, b"not json {", [("traceparent", b"00-x-01"), ("null-one", NULL)]),
            (None, None, []),
            (b"sr-ok", _raw(_sr("sr-ok")), [("empty", NULL)]),
        ],
    )
    stats = consumer.run(lambda b: [EventOutcome("done", results=[_result(i)]) for i in b], max_events=3,
                         idle_timeout_s=30)  # fmt: skip
    assert stats.committed == 3 and stats.dead_lettered == 2
    bad_json, tombstone = _read_all(bootstrap, names["dlq_topic"])
    h = dict(bad_json.headers)
    assert bad_json.value == b"not json {" and h["traceparent"] == b"00-x-01"
    assert h["ehrw-null-headers"] == b"null-one" and h["ehrw-reason-code"] == b"not_json"
    h = dict(tombstone.headers)
    assert (
        tombstone.value == b""
        and h["ehrw-original-null"] == b"true"
        and h["ehrw-reason-code"] == b"empty_value"
    )
    assert [r.key for r in _read_all(bootstrap, names["result_topic"])] == [b"ServiceRequest/sr-ok"]


def test_oversized_events_are_rejected_by_size_and_dead_lettered_as_a_truncated_copy(bootstrap):
    """Defect 7: a 1.2 MiB event is rejected before parsing and, too large for the dead-letter
    topic, sent as a truncated copy with its sha256 and size (it used to retry for ever)."""
    names = _names("large")
    big = json.dumps({"resourceType": "Bundle", "type": "collection",
                      "entry": [{"resource": _sr(f"b-{i}", note=[{"text": "x" * 600}])} for i in range(2000)]}).encode()  # fmt: skip
    assert len(big) > 1024 * 1024
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    producer.send(names["topic"], key=b"big", value=big)
    producer.send(names["topic"], key=b"sr-after", value=_raw(_sr("sr-after")))
    producer.flush()
    producer.close()
    consumer = _consumer(bootstrap, names)
    stop = threading.Event()
    threading.Timer(60, stop.set).start()  # the old consumer retried this for ever
    stats = consumer.run(lambda b: [EventOutcome("done", results=[_result(i)]) for i in b], max_events=2,
                         idle_timeout_s=30, stop=stop)  # fmt: skip
    stop.set()
    assert stats.committed == 2 and stats.too_large == 1 and stats.truncated == 1
    (dead,) = _read_all(bootstrap, names["dlq_topic"])
    h = dict(dead.headers)
    assert h["ehrw-reason-code"] == b"event_too_large" and h["ehrw-truncated"] == b"true"
    assert h["ehrw-original-size"] == str(len(big)).encode()
    assert h["ehrw-original-sha256"] == hashlib.sha256(big).hexdigest().encode()
    assert 0 < len(dead.value) < 1_000_000 and big.startswith(dead.value)
    assert b"x" * 20 not in h["ehrw-reason"]  # the reason names sizes, never content


def test_retry_after_is_waited_out_inside_the_group_and_slow_batches_cause_no_rebalance(bootstrap):
    """Defect 3: Retry-After above the poll interval is honoured (the consumer waits, paused, and
    stays in its group), and a dispatch longer than max.poll.interval.ms is not evicted."""
    names = _names("wait")
    consumer = _consumer(
        bootstrap, names, max_poll_interval_ms=2000, session_timeout_ms=6000, max_in_flight=1
    )
    _publish(bootstrap, names["topic"], [("o-1", _raw(_sr("o-1"))), ("o-2", _raw(_sr("o-2")))])
    calls: list[float] = []

    class SlowDispatcher:
        accepts_keepalive = True

        def __call__(self, batch, keepalive):
            calls.append(time.monotonic())
            if len(calls) == 1:
                return [EventOutcome("retry", reason_code="fhir_unavailable", retry_kind="unavailable",
                                     retry_after_s=5.0) for _ in batch]  # fmt: skip
            end = time.monotonic() + 4.0  # twice max.poll.interval.ms
            while time.monotonic() < end:
                keepalive()
                time.sleep(0.1)
            return [EventOutcome("done", results=[_result(i)]) for i in batch]

    stats = consumer.run(SlowDispatcher(), max_events=2, idle_timeout_s=30)
    assert calls[1] - calls[0] >= 5.0
    assert stats.commit_failures == 0 and stats.committed == 2 and stats.waited_s >= 5.0
    assert _committed(bootstrap, names["topic"], names["group"]) == {0: 2}


def test_consumer_without_redis_still_counts_attempts():
    """The ledger never stalls the consumer: an unreachable Redis falls back to memory."""
    ledger = RedisAttempts("redis://127.0.0.1:1/0", prefix="x:")
    assert [ledger.add("k"), ledger.add("k")] == [1, 2]
    ledger.clear(["k"])
    assert ledger.add("k") == 1


def test_event_consumer_rejects_a_zero_budget():
    with pytest.raises(ValueError, match="max_attempts"):
        EventConsumer(bootstrap="x", topic="t", group="g", dlq_topic="d", result_topic="r", max_attempts=0)


def test_a_commit_refused_by_a_rebalance_is_read_again_and_committed(bootstrap):
    """The stuck partition of the rebalance row: a batch whose commit the group refused (a member
    joined or left while it ran) was never committed when the partition stayed with its consumer,
    because kafka-python keeps a kept partition's position past the batch. The records must be read
    again from the first uncommitted one and committed; the last batch of a partition included."""
    names = _names("refused")
    events = [(f"o-{i}", _raw(_sr(f"o-{i}"))) for i in range(5)]
    consumer = _consumer(bootstrap, names)
    _publish(bootstrap, names["topic"], events)
    commit = consumer._commit
    refused = []

    def refused_once(kafka_consumer, offsets, records):
        if offsets and not refused:
            refused.append(dict(offsets))
            return False  # what _commit answers for CommitFailedError / RebalanceInProgressError
        return commit(kafka_consumer, offsets, records)

    consumer._commit = refused_once
    seen: Counter[str] = Counter()
    stats = consumer.run(_done_except(set(), seen), max_events=5, idle_timeout_s=15)
    assert refused and stats.commit_failures == 0  # the refusal was injected, not a real failure
    assert _committed(bootstrap, names["topic"], names["group"]) == {0: 5}
    assert all(seen[f"o-{i}"] == 2 for i in range(5))  # read again after the refusal (harmless: idempotent)
