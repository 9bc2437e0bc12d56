"""Wires logs, metrics, health endpoints and traces into the Celery worker and the consumer.

Imported by :mod:`workers.app`, so every ``celery -A workers worker`` gets, through Celery signals:
JSON (or text) logs with Celery's records redacted, ``/metrics``/``/healthz``/``/readyz`` served
by the main process on ``EHRW_WORKER_HTTP_PORT``, per-order metrics from the pool children, the
log context (task, order, event) of each task, and the trace context from the task headers.
``ehr-worker consume`` calls :func:`start_consumer_observability`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

from workers import logs, metrics, tracing
from workers.clients import kafka_client_config, redis_url
from workers.health import fhir_check, kafka_check, models_check, redis_check, start_server
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)

# The task header naming the Kafka record an order came from ("topic[partition]@offset").
EVENT_HEADER = "ehrw_event"
_servers: list[Any] = []
_task_tokens: dict[str, Any] = {}
_task_spans: dict[str, Any] = {}


def task_options(topic: str, partition: int, offset: int, order: str | None) -> dict[str, Any]:
    """Extra ``apply_async`` options for one order: the event it came from and the trace context
    as task headers, and an ``argsrepr`` of ids only, so neither the worker's "received" log nor
    Flower ever shows the order itself."""
    headers = {
        EVENT_HEADER: f"{topic}[{partition}]@{offset}",
        **tracing.inject_headers(topic, partition, offset),
    }
    return {"headers": headers, "argsrepr": repr([order or "order"]), "kwargsrepr": "{}"}


def _order_of(args: Any) -> str | None:
    item = args[0] if isinstance(args, (list, tuple)) and args else None
    if not isinstance(item, dict):
        return None
    sr = item.get("service_request")
    if isinstance(sr, dict) and sr.get("id"):
        return f"ServiceRequest/{sr['id']}"
    ref = item.get("reference")
    return ref if isinstance(ref, str) else None


# -- Celery worker -------------------------------------------------------------------------------
@signals.setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    """Connected, so Celery leaves logging to us: one redacting handler for every record."""
    settings = get_settings()
    level = loglevel if isinstance(loglevel, int) else settings.log_level
    logs.configure(settings.log_format, level)


@signals.celeryd_init.connect
def _early_logging(instance: Any = None, **_: Any) -> None:
    """Before Celery's own start-up checks warn (e.g. about running as root): route warnings too."""
    settings = get_settings()
    logs.configure(settings.log_format, settings.log_level)
    # The start-up banner is printed, not logged: in JSON mode it would break "one object per line".
    if settings.log_format == "json" and instance is not None:
        instance.quiet = True


@signals.worker_init.connect
def _worker_init(**_: Any) -> None:
    if metrics.MULTIPROC_DIR_FROM_ENV:
        metrics.reset_files()


@signals.worker_ready.connect
def _worker_ready(**_: Any) -> None:
    """The main process serves the metrics of all its pool children (after the pool has forked)."""
    s = get_settings()
    checks = {
        "redis": redis_check(redis_url(s)),
        "fhir": fhir_check(s.fhir_base_url),
        "models": models_check(s.model_registry),
    }
    _serve(s, s.worker_http_port, checks, "worker")
    log.info("worker ready (pid %d, queue %s)", os.getpid(), s.celery_queue)


@signals.worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    while _servers:
        _servers.pop().stop()


@signals.worker_process_init.connect
def _child_init(**_: Any) -> None:
    tracing.configure(get_settings(), role="worker")


@signals.worker_process_shutdown.connect
def _child_shutdown(pid: int | None = None, **_: Any) -> None:
    metrics.process_exited(pid or os.getpid())


@signals.task_prerun.connect
def _task_prerun(task_id: str | None = None, task: Any = None, args: Any = None, **_: Any) -> None:
    metrics.orders_in_flight.inc()
    event = getattr(getattr(task, "request", None), EVENT_HEADER, None) if task is not None else None
    if event is None and task is not None:
        event = (getattr(task.request, "headers", None) or {}).get(EVENT_HEADER)
    if task_id:
        order = _order_of(args)
        _task_tokens[task_id] = logs.bind_for_task(task_id=task_id, order=order, event=event)
        headers = getattr(getattr(task, "request", None), "headers", None) or {}
        if not headers and task is not None:  # protocol 2 puts custom headers on the request itself
            headers = {k: getattr(task.request, k, None) for k in ("traceparent", "tracestate")}
        _task_spans[task_id] = tracing.start_task_span(
            {k: v for k, v in headers.items() if v},
            "ehrw.order",
            {"ehrw.order": order or "", "ehrw.event": event or ""},
        )


@signals.task_postrun.connect
def _task_postrun(task_id: str | None = None, retval: Any = None, state: str | None = None, **_: Any) -> None:
    metrics.orders_in_flight.dec()
    if state == "SUCCESS":
        metrics.record_order_outcome(retval)
    tracing.end_task_span(_task_spans.pop(task_id, None) if task_id else None, state)
    token = _task_tokens.pop(task_id, None) if task_id else None
    if token is not None:
        logs.unbind(token)


@signals.task_retry.connect
def _task_retry(**_: Any) -> None:
    metrics.task_retries.inc()


@signals.task_failure.connect
def _task_failure(exception: BaseException | None = None, **_: Any) -> None:
    metrics.attempts_exhausted.labels(type(exception).__name__ if exception else "unknown").inc()


# -- consumer ------------------------------------------------------------------------------------
def start_consumer_observability(settings: Settings) -> metrics.ConsumerMetrics:
    """Logs, traces and the consumer's HTTP endpoints; returns the observer for the consumer."""
    logs.configure(settings.log_format, settings.log_level)
    if metrics.MULTIPROC_DIR_FROM_ENV:
        metrics.reset_files()
    tracing.configure(settings, role="consumer")
    checks = {
        "kafka": kafka_check(settings.kafka_bootstrap, kafka_client_config(settings)),
        "redis": redis_check(redis_url(settings)),
        "fhir": fhir_check(settings.fhir_base_url),
    }
    _serve(settings, settings.consumer_http_port, checks, "consumer")
    return metrics.ConsumerMetrics()


def _serve(settings: Settings, port: int, checks: dict, service: str) -> None:
    collectors = [metrics.QueueDepth(settings.redis_url, settings.celery_queue)]
    server = start_server(settings.http_host, port, checks, service=service, collectors=collectors)
    if server is not None:
        _servers.append(server)
