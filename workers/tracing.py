"""OpenTelemetry traces: one trace per event, consumer -> Celery task -> models -> FHIR write.

Off unless ``EHRW_OTEL_ENABLED=true``; spans go to the OTLP/HTTP endpoint ``EHRW_OTEL_ENDPOINT``
(or the standard ``OTEL_EXPORTER_OTLP_*`` variables when it is unset). The W3C trace context
travels in the Kafka record's headers (``traceparent``, kept by the dead-letter topic and by a DLQ
replay) and in the Celery task's headers. Span attributes are ids and codes, never order text.

Every function is a cheap no-op while tracing is off, so the hooks cost nothing by default.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from workers.settings import Settings

log = logging.getLogger(__name__)

_enabled = False
_record_contexts: dict[tuple[str, int, int], dict[str, str]] = {}
_MAX_REMEMBERED = 10_000


def enabled() -> bool:
    return _enabled


def configure(settings: Settings, *, role: str) -> None:
    """Install the tracer provider of this process (call once per process, after any fork)."""
    global _enabled
    if not settings.otel_enabled or _enabled:
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": settings.otel_service_name, "service.component": role})
    provider = TracerProvider(resource=resource)
    exporter = (
        OTLPSpanExporter(endpoint=settings.otel_endpoint) if settings.otel_endpoint else OTLPSpanExporter()
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _enabled = True
    log.info(
        "tracing on (%s), exporting to %s",
        role,
        settings.otel_endpoint or "the OTEL_EXPORTER_OTLP_* endpoint",
    )


def remember_record_contexts(records: Iterable[Any]) -> None:
    """Keep the ``traceparent``/``tracestate`` headers of polled Kafka records, by coordinates."""
    if not _enabled:
        return
    if len(_record_contexts) > _MAX_REMEMBERED:
        _record_contexts.clear()
    for rec in records:
        carrier = {
            k: v.decode("latin-1") for k, v in (rec.headers or []) if k in ("traceparent", "tracestate") and v
        }
        if carrier:
            _record_contexts[(rec.topic, rec.partition, rec.offset)] = carrier


def inject_headers(
    topic: str | None = None, partition: int | None = None, offset: int | None = None
) -> dict[str, str]:
    """The trace context for a Celery task's headers: a ``dispatch`` span of the event's trace
    (continuing the producer's trace when its Kafka record carried one)."""
    if not _enabled:
        return {}
    from opentelemetry import propagate, trace

    parent = None
    if topic is not None:
        carrier = _record_contexts.pop((topic, int(partition or 0), int(offset or 0)), None)
        parent = propagate.extract(carrier) if carrier else None
    tracer = trace.get_tracer("ehr-worker")
    attributes: dict[str, str | int] = {"messaging.destination.name": topic or "", "messaging.kafka.partition": partition or 0}
    with tracer.start_as_current_span("ehrw.dispatch", context=parent, attributes=attributes) as span:
        if offset is not None:
            span.set_attribute("messaging.kafka.offset", offset)
        headers: dict[str, str] = {}
        propagate.inject(headers)
        return headers


def start_task_span(headers: dict[str, Any] | None, name: str, attributes: dict[str, Any]) -> Any:
    """Start a span continuing the trace in a task's headers and make it current; returns a handle
    for :func:`end_task_span` (None while tracing is off)."""
    if not _enabled:
        return None
    from opentelemetry import context, propagate, trace

    carrier = {k: str(v) for k, v in (headers or {}).items() if k in ("traceparent", "tracestate")}
    span = trace.get_tracer("ehr-worker").start_span(
        name, context=propagate.extract(carrier), attributes=attributes
    )
    token = context.attach(trace.set_span_in_context(span))
    return span, token


def end_task_span(handle: Any, status: str | None = None) -> None:
    if handle is None:
        return
    from opentelemetry import context

    span, token = handle
    if status:
        span.set_attribute("ehrw.status", status)
    span.end()
    context.detach(token)


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A child span of the current one (model inference, FHIR write); nothing while tracing is off."""
    if not _enabled:
        yield
        return
    from opentelemetry import trace

    with trace.get_tracer("ehr-worker").start_as_current_span(name, attributes=attributes):
        yield
