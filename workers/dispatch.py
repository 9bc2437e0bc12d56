"""Hands a consumer batch to the Celery workers and turns task results into event outcomes.

Every order of the batch is sent at once (the consumer already bounds the batch size), then the
results are collected. An event is ``done`` when all its orders were written or skipped,
``dead_letter`` when one was permanently rejected, and ``retry`` when any task failed
transiently, timed out or lost its worker: its offset then stays uncommitted and the event comes
back; the idempotent write-back makes that replay harmless.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from celery.result import AsyncResult

from connectors.kafka import EventConsumer, EventOutcome, Incoming
from schemas.events import OrderItem
from workers.observability import task_options  # Operations (issue 9)
from workers.settings import Settings
from workers.tasks import suggest

log = logging.getLogger(__name__)


def order_item_payload(item: OrderItem) -> dict[str, Any]:
    return {k: v for k, v in asdict(item).items() if v is not None}


def _collect(result: AsyncResult, deadline: float) -> dict[str, Any] | Exception:
    try:
        return result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=True, disable_sync_subtasks=False)
    except Exception as exc:  # noqa: BLE001 - any task failure means "not durable yet"
        return exc
    finally:
        result.forget()


def outcome_for_event(results: list[dict[str, Any] | Exception]) -> EventOutcome:
    failures = [r for r in results if isinstance(r, Exception)]
    if failures:
        first = failures[0]
        return EventOutcome(status="retry", reason_code="task_failed", reason=f"{type(first).__name__}: {first}"[:300])
    done: list[dict[str, Any]] = [r for r in results if not isinstance(r, Exception)]
    rejected = [r for r in done if r.get("status") == "rejected"]
    if rejected:
        first = rejected[0]
        return EventOutcome(
            status="dead_letter",
            results=done,
            reason_code=first.get("reason_code"),
            reason=first.get("reason"),
            details={"order": first.get("order"), "operation_outcome": first.get("operation_outcome")},
        )
    return EventOutcome(status="done", results=done)


class CeleryDispatcher:
    """``dispatch`` callable for :class:`connectors.kafka.EventConsumer`."""

    def __init__(self, *, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s

    def __call__(self, batch: list[Incoming]) -> list[EventOutcome]:
        pending = [
            [
                # Operations (issue 9): event/trace headers, and an argsrepr of ids only (logs, Flower).
                suggest.apply_async(
                    args=[order_item_payload(i)], **task_options(inc.topic, inc.partition, inc.offset, i.order_id)
                )
                for i in inc.event.items
            ]
            for inc in batch
        ]
        deadline = time.monotonic() + self.timeout_s
        outcomes = [outcome_for_event([_collect(r, deadline) for r in results]) for results in pending]
        for inc, out in zip(batch, outcomes):
            if out.status != "done":
                log.warning("event %s[%d]@%d: %s (%s)", inc.topic, inc.partition, inc.offset, out.status, out.reason_code)
        return outcomes


def build_dispatcher(settings: Settings) -> CeleryDispatcher:
    """A dispatcher that never outwaits the consumer's group membership (see Settings)."""
    return CeleryDispatcher(timeout_s=min(settings.task_timeout_s, 0.8 * settings.kafka_max_poll_interval_ms / 1000))


def build_consumer(settings: Settings, **overrides: object) -> EventConsumer:
    """The event consumer as configured by ``EHRW_*``; ``overrides`` replace single arguments (tests)."""
    kwargs: dict[str, object] = {
        "bootstrap": settings.kafka_bootstrap,
        "topic": settings.kafka_topic,
        "group": settings.kafka_group,
        "dlq_topic": settings.kafka_dlq_topic,
        "result_topic": settings.kafka_result_topic,
        "max_in_flight": settings.max_in_flight,
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
    }
    kwargs.update(overrides)
    return EventConsumer(**kwargs)  # type: ignore[arg-type]
