"""What can go wrong talking to the FHIR server, sorted by who has to act.

- ``FhirTransientError``: 429, 5xx, 409, timeouts and connection errors, after the client's own
  quick retries. The event is fine; retry later, honouring ``retry_after``.
- ``FhirPermanentError``: the server refused this request for this event's sake (422 invalid,
  404/410 order not found...). Retrying cannot help; the event goes to the dead-letter topic.
- ``FhirConfigurationError``: the deployment is wrong, not the event: credentials or scopes refused
  (token endpoint 4xx, 401/403 after one token refresh), a base URL that is no FHIR server (404
  on ``metadata``), a proxy timing requests out (408), duplicates on the server breaking
  conditional creates (412). Every event would fail alike, so the consumer stops taking events,
  reports unhealthy and retries with backoff; it never dead-letters for these. ``variable`` names
  the setting to fix.

Every error keeps the server's OperationOutcome reduced to codes (:func:`schemas.outcomes.outcome_codes`)
and its message names status, operation, issue codes and element paths only, never server text:
servers quote request bodies (patient data) in ``diagnostics``.

All three rebuild from ``args`` alone (``cls(*exc.args)``), as Celery does when a task's exception
crosses the JSON result backend, so ``status`` and friends survive that trip.
"""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime

from schemas.outcomes import outcome_code_summary, outcome_codes

__all__ = [
    "FhirConfigurationError",
    "FhirError",
    "FhirPermanentError",
    "FhirTransientError",
    "outcome_summary",
    "parse_retry_after",
]


class FhirError(Exception):
    """Base class of the errors this client raises."""


class FhirTransientError(FhirError):
    """A failure worth retrying later: 429, 5xx, 409, a timeout or a connection error."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
        operation_outcome: dict | None = None,
    ) -> None:
        operation_outcome = outcome_codes(operation_outcome)
        super().__init__(message, status, retry_after, operation_outcome)
        self.status = status
        self.retry_after = retry_after
        self.operation_outcome = operation_outcome

    def __str__(self) -> str:
        return str(self.args[0])


class FhirPermanentError(FhirError):
    """The server refused the request for a reason a retry cannot fix (4xx other than 409/429)."""

    def __init__(
        self,
        status: int,
        operation_outcome: dict | None = None,
        operation: str = "request",
        detail: str = "",
    ) -> None:
        operation_outcome = outcome_codes(operation_outcome)
        super().__init__(status, operation_outcome, operation, detail)
        self.status = status
        self.operation_outcome = operation_outcome
        self.operation = operation
        self.detail = detail

    def __str__(self) -> str:
        text = f"{self.operation} failed with HTTP {self.status}"
        if self.detail:
            text += f": {self.detail}"
        issues = outcome_summary(self.operation_outcome)
        return f"{text}: {issues}" if issues else text


class FhirConfigurationError(FhirError):
    """The deployment's problem, not the event's: pause, report unhealthy, retry with backoff.

    ``status``: the HTTP status (None when no answer was involved); ``variable``: the ``EHRW_*``
    setting(s) to check; ``retry_after``: the server's Retry-After when it sent one.
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        variable: str = "",
        retry_after: float | None = None,
        operation_outcome: dict | None = None,
    ) -> None:
        operation_outcome = outcome_codes(operation_outcome)
        super().__init__(message, status, variable, retry_after, operation_outcome)
        self.status = status
        self.variable = variable
        self.retry_after = retry_after
        self.operation_outcome = operation_outcome

    def __str__(self) -> str:
        text = str(self.args[0])
        return f"{text} (check {self.variable})" if self.variable and self.variable not in text else text


def outcome_summary(outcome: dict | None, *, max_issues: int = 5) -> str:
    """``"[required] Task.status; [invalid] Task.for"`` from an OperationOutcome: codes and element
    paths only (diagnostics may quote patient data)."""
    return outcome_code_summary(outcome, max_issues=max_issues)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait per a ``Retry-After`` header (delta-seconds or HTTP date); None if absent/garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
