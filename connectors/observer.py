"""What :class:`connectors.kafka.EventConsumer` reports as it goes, for metrics (issue 9).

Defined here, below the workers layer, so the consumer needs no import of ``workers``; the
implementation is ``workers.metrics.ConsumerMetrics``.
"""

from __future__ import annotations

from typing import Any, Protocol

from schemas.outcomes import OrderOutcome


class ConsumerObserver(Protocol):
    """Told what was polled, what became durable (with reason codes) and what was retried."""

    def polled(self, consumer: Any, records: list[Any]) -> None: ...

    def durable(
        self,
        record: Any,
        *,
        status: str,
        reason_code: str | None,
        results: list[OrderOutcome],
        skipped: list[tuple[str, str]],
    ) -> None: ...

    def retried(self, count: int) -> None: ...
