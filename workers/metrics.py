"""Prometheus metrics of the consumer and of every Celery worker (prometheus-client).

Every process writes its samples to memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR`` (the
client's multiprocess mode), so the prefork pool's children count into the same figures that the
worker's main process serves on ``/metrics`` (:mod:`workers.health`). When the variable is not set,
a private folder is created here, before ``prometheus_client`` is imported (the client picks its
storage at import time) and inherited by the pool children through ``fork``.

Labels carry codes only (reason codes, model names and versions, partitions): never an order id
(unbounded) and never patient text.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from schemas.tasks import TASKS

ENV = "PROMETHEUS_MULTIPROC_DIR"


_PRIVATE = "EHRW_METRICS_PRIVATE_DIR"


def _multiprocess_dir() -> tuple[Path, bool]:
    """The folder, and whether the operator chose it (then it is emptied at start-up)."""
    path = os.environ.get(ENV)
    # A folder another interpreter made for itself (inherited by a subprocess) is not ours to share.
    if path and path != os.environ.get(_PRIVATE):
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path), True
    path = tempfile.mkdtemp(prefix="ehrw-metrics-")
    os.environ[ENV] = os.environ[_PRIVATE] = path
    owner = os.getpid()
    # Only the process that made it removes it; forked pool children share it.
    def remove_if_owner() -> None:
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove_if_owner)
    return Path(path), False


MULTIPROC_DIR, MULTIPROC_DIR_FROM_ENV = _multiprocess_dir()

# prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is imported, so only after it is set.
from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_END_TO_END = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)

# -- consumer ------------------------------------------------------------------------------------
events_consumed = Counter(
    "ehrw_events_consumed", "Kafka records polled (a record polled again after a retry counts again)."
)
events_finished = Counter(
    "ehrw_events_finished", "Records whose outcome is durable and whose offset is committed.", ["outcome"]
)
events_dead_lettered = Counter(
    "ehrw_events_dead_lettered", "Records acknowledged on the dead-letter topic, by reason code.", ["reason"]
)
orders_skipped = Counter(
    "ehrw_orders_skipped",
    "Orders in consumed events that are not actionable (not dead-lettered), by reason.",
    ["reason"],
)
events_retried = Counter("ehrw_events_retried", "Records sent back to be consumed again (not durable yet).")
results_published = Counter(
    "ehrw_result_events",
    "Result events published to the suggestions topic, one per order, by status.",
    ["status"],
)
produce_to_durable = Histogram(
    "ehrw_produce_to_durable_seconds",
    "From the Kafka record's timestamp to its outcome being durable (written or dead-lettered).",
    buckets=_END_TO_END,
)
consumer_lag = Gauge(
    "ehrw_consumer_lag",
    "Records in the partition after the consumer's position, as of the last poll.",
    ["topic", "partition"],
    multiprocess_mode="mostrecent",
)

# -- workers -------------------------------------------------------------------------------------
orders_processed = Counter(
    "ehrw_orders_processed",
    "Orders a worker finished, by status (written, no_suggestion, skipped, rejected).",
    ["status"],
)
suggestions_written = Counter(
    "ehrw_suggestions_written",
    "Suggestions written to FHIR (protocol Task, diagnosis RiskAssessment), by model and version.",
    ["model", "version"],
)
abstentions = Counter(
    "ehrw_abstentions", "Model answers below the calibrated confidence threshold.", ["model"]
)
task_retries = Counter("ehrw_task_retries", "Celery task retries after a transient FHIR error.")
attempts_exhausted = Counter(
    "ehrw_task_attempts_exhausted",
    "Tasks that failed for good (retries exhausted or unexpected error).",
    ["error"],
)
inference_seconds = Histogram(
    "ehrw_inference_seconds", "Model inference time per order.", ["model"], buckets=_LATENCY
)
writeback_seconds = Histogram(
    "ehrw_writeback_seconds", "FHIR write-back transaction time per order.", buckets=_LATENCY
)
orders_in_flight = Gauge(
    "ehrw_orders_in_flight", "Orders being processed by worker processes now.", multiprocess_mode="livesum"
)
model_loaded = Gauge(
    "ehrw_model_loaded",
    "1 for the model version a live worker process serves (0 for one it switched away from).",
    ["task", "version"],
    multiprocess_mode="livemax",
)
model_switches = Counter(
    "ehrw_model_switches",
    "Model roll-outs noticed between tasks, by result (switched, refused).",
    ["task", "result"],
)


# -- recording helpers ---------------------------------------------------------------------------
@contextmanager
def timed(histogram: Any) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - start)


def record_order_outcome(outcome: Any) -> None:
    """Count one task's return value (the result event of :func:`workers.pipeline.suggest_for_order`)."""
    if not isinstance(outcome, dict):
        return
    status = str(outcome.get("status") or "unknown")
    orders_processed.labels(status).inc()
    for key in TASKS:
        out = outcome.get(key)
        if not isinstance(out, dict):
            continue
        model = str(out.get("model") or key)
        if out.get("abstained"):
            abstentions.labels(model).inc()
        # A protocol Task is written even when the model abstains; a RiskAssessment only when it answers.
        if status == "written" and (key == "protocol" or not out.get("abstained")):
            suggestions_written.labels(model, str(out.get("model_version") or "unknown")).inc()


class ConsumerMetrics:
    """The observer :class:`connectors.kafka.EventConsumer` reports to (see its ``observer``)."""

    def polled(self, consumer: Any, records: list[Any]) -> None:
        from workers import tracing

        events_consumed.inc(len(records))
        tracing.remember_record_contexts(records)
        for tp in consumer.assignment() or ():
            try:
                position = consumer.position(tp, timeout_ms=500)
                end = consumer.highwater(tp)  # from the last fetch response; None before one
            except Exception:  # noqa: BLE001, S112 - lag is best effort; a rebalance may be under way
                continue
            if end is not None and position is not None:
                consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, end - position))

    def durable(
        self,
        record: Any,
        *,
        status: str,
        reason_code: str | None,
        results: Iterable[dict],
        skipped: Iterable[tuple[str, str]],
    ) -> None:
        events_finished.labels(status).inc()
        if status == "dead_letter":
            events_dead_lettered.labels(reason_code or "unspecified").inc()
        for _, code in skipped:
            orders_skipped.labels(code).inc()
            results_published.labels("skipped").inc()
        for result in results:
            results_published.labels(str(result.get("status") or "unknown")).inc()
        timestamp_ms = getattr(record, "timestamp", None)
        if isinstance(timestamp_ms, (int, float)) and timestamp_ms > 0:
            produce_to_durable.observe(max(0.0, time.time() - timestamp_ms / 1000))

    def retried(self, count: int) -> None:
        events_retried.inc(count)


class QueueDepth(Collector):
    """``ehrw_celery_queue_depth``: tasks waiting in the Redis broker, read at scrape time."""

    def __init__(self, redis_url: str, queue: str) -> None:
        self.redis_url = redis_url
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import redis

        family = GaugeMetricFamily(
            "ehrw_celery_queue_depth", "Celery tasks waiting in the broker queue.", labels=["queue"]
        )
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
            try:
                family.add_metric([self.queue], float(cast(int, client.llen(self.queue))))  # a sync client
            finally:
                client.close()
        except Exception:  # noqa: BLE001, S110 - /readyz reports Redis; a scrape must still answer
            pass
        yield family


def exposition(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """The text exposition of every process's samples in the multiprocess folder, plus ``extra``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(MULTIPROC_DIR))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def loaded_versions() -> dict[str, set[str]]:
    """``{task: versions}`` that live processes of this service report serving (ehrw_model_loaded == 1)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(MULTIPROC_DIR))
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        if family.name == "ehrw_model_loaded":
            for sample in family.samples:
                if sample.value == 1:
                    out.setdefault(sample.labels["task"], set()).add(sample.labels["version"])
    return out


def process_exited(pid: int) -> None:
    """Drop a dead pool child's live gauges (in-flight orders, loaded models)."""
    multiprocess.mark_process_dead(pid, str(MULTIPROC_DIR))


def reset_files() -> None:
    """Remove samples left by an earlier run in a folder given by the environment (call at start-up,
    before any process of this run has written one)."""
    for path in MULTIPROC_DIR.glob("*.db"):
        path.unlink(missing_ok=True)
