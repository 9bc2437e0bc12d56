"""ehr-worker end to end: orders produced to a fresh Kafka topic, the real consumer and dispatcher in
this process, a real ``celery worker``, the FHIR server; until every offset is committed.

Throughput is orders / (first order produced -> last offset committed). Latency is per order, from
the moment it was handed to the Kafka producer to the moment the dispatcher saw its written outcome
(produce -> written), and to its offset commit (produce -> committed). The orders are produced as
one burst (as fast as the producer goes, while the pipeline already runs), so at large N latency
is mostly queueing: it shows how long a burst of N orders takes to drain.

Two warm-up orders go first (the consumer's group join and each pool process's first order are not
timed); the burst starts when the first of them is dispatched.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from connectors.kafka import ConsumerStats, ensure_topics, make_producer
from models.measure import percentile
from schemas.tasks import TASKS
from workers.bench.progress import progress_bar
from workers.dispatch import CeleryDispatcher, build_consumer, build_dispatcher
from workers.settings import Settings

WARMUP_ORDERS = 2


class _Clock:
    """When the burst started, when each order was produced / written / committed."""

    def __init__(self, total: int, progress: bool) -> None:
        self.produced: dict[str, float] = {}
        self.position: dict[str, tuple[int, int]] = {}  # order id -> (partition, offset)
        self.written: dict[str, float] = {}
        self.committed_at: list[tuple[float, int]] = []
        self.commits: list[tuple[float, dict[int, int]]] = []  # when, partition -> next offset
        self.first_dispatch = threading.Event()
        self.burst_start: float | None = None
        self.burst_end: float | None = None
        self.bar = progress_bar(total=total, enabled=progress, desc="ehr-worker end to end (Kafka -> Celery -> FHIR)")

    def committed(self) -> dict[str, float]:
        """When each produced order's offset was first covered by a commit."""
        out: dict[str, float] = {}
        for oid, (partition, offset) in self.position.items():
            for when, offsets in self.commits:
                if offsets.get(partition, -1) > offset:
                    out[oid] = when
                    break
        return out

    def on_commit(self, value: int) -> None:
        now = time.time()
        self.committed_at.append((now, value))
        self.bar.n = value
        self.bar.refresh()


def _timed_stats(clock: _Clock) -> ConsumerStats:
    class TimedStats(ConsumerStats):
        def __setattr__(self, name: str, value: Any) -> None:
            object.__setattr__(self, name, value)
            if name == "committed":
                clock.on_commit(value)

    return TimedStats()


def _timed_dispatcher(settings: Settings, clock: _Clock) -> CeleryDispatcher:
    """The configured dispatcher, noting when each order's final result arrives (``_record``)."""
    inner = build_dispatcher(settings)

    class Timed(type(inner)):  # type: ignore[misc]
        def _record(self, event, tid, result):  # noqa: ANN001
            order = str(result.get("order") or "")
            clock.written.setdefault(order.rsplit("/", 1)[-1], time.time())
            return super()._record(event, tid, result)

    inner.__class__ = Timed
    return inner


class _Outcomes:
    """Counts what the rounds returned (order statuses, resources, models used)."""

    def __init__(self, dispatcher: CeleryDispatcher, clock: _Clock) -> None:
        self.dispatcher = dispatcher
        self.clock = clock
        self.accepts_keepalive = getattr(dispatcher, "accepts_keepalive", False)
        self.statuses: dict[str, int] = {}
        self.event_statuses: dict[str, int] = {}
        self.created = 0
        self.models: set[str] = set()

    def __call__(self, batch, keepalive=None):  # noqa: ANN001
        self.clock.first_dispatch.set()
        outcomes = self.dispatcher(batch, keepalive) if keepalive is not None else self.dispatcher(batch)
        for out in outcomes:
            self.event_statuses[out.status] = self.event_statuses.get(out.status, 0) + 1
            for r in out.results:
                s = str(r.get("status"))
                self.statuses[s] = self.statuses.get(s, 0) + 1
                self.created += int(r.get("created") or 0)
                for task in TASKS:
                    if isinstance(r.get(task), dict):
                        self.models.add(f"{r[task].get('model')}@{r[task].get('model_version')}")
        return outcomes

    def finished(self, incomings) -> None:  # noqa: ANN001
        self.dispatcher.finished(incomings)


def _publish_burst(bootstrap: str, topic: str, orders: list[dict], clock: _Clock) -> None:
    producer = make_producer(bootstrap, linger_ms=5)
    try:
        clock.burst_start = time.time()
        futures = []
        for sr in orders:
            clock.produced[sr["id"]] = time.time()
            futures.append((sr["id"], producer.send(topic, key=sr["id"].encode(), value=json.dumps(sr).encode())))
        producer.flush()
        clock.burst_end = time.time()
        for oid, future in futures:
            meta = future.get(timeout=30)
            clock.position[oid] = (meta.partition, meta.offset)
    finally:
        producer.close()


def _latency(start: dict[str, float], end: dict[str, float]) -> dict[str, float | int]:
    ms = [(end[k] - t0) * 1000.0 for k, t0 in start.items() if k in end]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), **{f"p{q}_ms": round(percentile(ms, q), 1) for q in (50, 95, 99)}, "max_ms": round(max(ms), 1)}


def measure_pipeline(settings: Settings, orders: list[dict], warmup: list[dict], *, progress: bool = True,
                     idle_timeout_s: float = 120.0, on_start=None) -> dict:  # noqa: ANN001
    """The warm-up orders, then ``orders`` as a burst, through Kafka, the consumer, Celery and FHIR.
    ``settings`` name a fresh topic and group; ``on_start()`` is called as the burst starts."""
    ensure_topics(settings.kafka_bootstrap, [settings.kafka_topic, settings.kafka_dlq_topic, settings.kafka_result_topic])
    producer = make_producer(settings.kafka_bootstrap)
    try:
        for sr in warmup:
            producer.send(settings.kafka_topic, key=sr["id"].encode(), value=json.dumps(sr).encode())
        producer.flush()
    finally:
        producer.close()

    total = len(orders) + len(warmup)
    clock = _Clock(total, progress)
    consumer = build_consumer(settings, stats=_timed_stats(clock))
    commit = consumer._commit

    def timed_commit(kafka_consumer, offsets, records):  # noqa: ANN001
        ok = commit(kafka_consumer, offsets, records)
        if ok:
            clock.commits.append((time.time(), {tp.partition: om.offset for tp, om in offsets.items()}))
        return ok

    consumer._commit = timed_commit  # type: ignore[method-assign]
    dispatcher = _Outcomes(_timed_dispatcher(settings, clock), clock)
    box: dict[str, Any] = {}

    def burst() -> None:
        clock.first_dispatch.wait()
        if on_start is not None:
            on_start()
        try:
            _publish_burst(settings.kafka_bootstrap, settings.kafka_topic, orders, clock)
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["error"] = exc

    publisher = threading.Thread(target=burst, name="bench-burst", daemon=True)
    publisher.start()
    t0 = time.perf_counter()
    try:
        stats = consumer.run(dispatcher, max_events=total, idle_timeout_s=idle_timeout_s)
    finally:
        clock.first_dispatch.set()
        publisher.join(timeout=60)
        clock.bar.close()
    wall = time.perf_counter() - t0
    if "error" in box:
        raise RuntimeError(f"producing the orders failed: {type(box['error']).__name__}")
    if stats.committed < total or clock.burst_start is None or not clock.committed_at:
        raise RuntimeError(f"the pipeline committed {stats.committed} of {total} events: {stats.as_dict()}")
    last_commit = clock.committed_at[-1][0]
    seconds = last_commit - clock.burst_start
    committed = clock.committed()
    return {
        "orders": len(orders),
        "seconds": round(seconds, 3),
        "orders_per_s": round(len(orders) / seconds, 2),
        "produce_seconds": round((clock.burst_end or last_commit) - clock.burst_start, 3),
        "latency_produce_to_written": _latency(clock.produced, clock.written),
        "latency_produce_to_committed": _latency(clock.produced, committed),
        "wall_s_including_group_join": round(wall, 3),
        "order_outcomes": dict(sorted(dispatcher.statuses.items())),
        "event_outcomes": dict(sorted(dispatcher.event_statuses.items())),
        "resources_created": dispatcher.created,
        "models_used": sorted(dispatcher.models),  # as the worker reported them (registry may change)
        "consumer": stats.as_dict(),
    }
