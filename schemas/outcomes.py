"""Outcomes, as ids and codes only: what happened to one order (:class:`OrderOutcome`, the result
event the worker publishes and the consumer reads), and a FHIR server's OperationOutcome reduced to
codes (:func:`outcome_codes`).

The reduced OperationOutcome is the only form of it that leaves the FHIR client. Servers write free text into ``issue.diagnostics`` and ``issue.details.text`` and often quote the
request in it: a rejected Task's note, a patient's name, a value that failed a pattern. That text
must not reach logs, exceptions, dead-letter headers or result events, so everything the worker
keeps of an outcome is: ``severity``, ``code`` (both bound to small FHIR value sets),
``details.coding`` system/code pairs that look like codes, and ``expression``/``location`` paths
that look like FHIRPath element paths (``Task.for``, ``Bundle.entry[2].resource.code``). A path
with a literal in it (``where(name = 'Ada')``) is dropped whole.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal, NotRequired, Required, TypedDict

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing.TypeIs from Python 3.13

__all__ = [
    "NOT_FINAL_STATUSES",
    "ORDER_STATUSES",
    "NotFinalOutcome",
    "NotFinalStatus",
    "OrderOutcome",
    "OrderStatus",
    "RetryDetails",
    "TaskResult",
    "is_final",
    "outcome_code_summary",
    "outcome_codes",
]

ISSUE_SEVERITIES = frozenset({"fatal", "error", "warning", "information"})
_CODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}")
_SYSTEM_RE = re.compile(r"(?:https?|urn|oid)[A-Za-z0-9._:/\-#]{1,200}")
# Element names, [index], dots; no quotes, spaces or operators, so no literal can hide in it.
_PATH_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\[\d{1,6}\])?(?:\.[A-Za-z_][A-Za-z0-9_]*(?:\[\d{1,6}\])?){0,30}")
MAX_ISSUES = 20
_MAX_PATHS = 5
_MAX_CODINGS = 5


def outcome_codes(outcome: Any) -> dict[str, Any] | None:
    """``{"resourceType": "OperationOutcome", "issue": [{"severity", "code", "details"?,
    "expression"?}]}`` keeping only codes and element paths; ``None`` for anything that is not an
    OperationOutcome. Idempotent: reducing a reduced outcome changes nothing."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return None
    issues = outcome.get("issue")
    reduced: list[dict[str, Any]] = []
    for issue in issues if isinstance(issues, list) else []:
        if not isinstance(issue, dict):
            continue
        severity = issue.get("severity")
        code = issue.get("code")
        kept: dict[str, Any] = {
            "severity": severity if isinstance(severity, str) and severity in ISSUE_SEVERITIES else "error",
            "code": code if isinstance(code, str) and _CODE_RE.fullmatch(code) else "unknown",
        }
        codings = _codings((issue.get("details") or {}) if isinstance(issue.get("details"), dict) else {})
        if codings:
            kept["details"] = {"coding": codings}
        paths = _paths(issue.get("expression")) or _paths(issue.get("location"))
        if paths:
            kept["expression"] = paths
        reduced.append(kept)
        if len(reduced) == MAX_ISSUES:
            break
    return {"resourceType": "OperationOutcome", "issue": reduced}


def outcome_code_summary(outcome: Any, *, max_issues: int = 5) -> str:
    """``"[error invalid] Task.for; [error required] Task.status"``: codes and paths, for messages."""
    reduced = outcome_codes(outcome)
    if reduced is None:
        return ""
    parts = []
    for issue in reduced["issue"][:max_issues]:
        where = ", ".join(issue.get("expression", []))
        parts.append(f"[{issue['code']}] {where}".rstrip())
    hidden = len(reduced["issue"]) - max_issues
    if hidden > 0:
        parts.append(f"(+{hidden} more issues)")
    return "; ".join(parts)


def _codings(details: dict[str, Any]) -> list[dict[str, str]]:
    codings = details.get("coding")
    kept: list[dict[str, str]] = []
    for coding in codings if isinstance(codings, list) else []:
        if not isinstance(coding, dict):
            continue
        code, system = coding.get("code"), coding.get("system")
        if isinstance(code, str) and _CODE_RE.fullmatch(code):
            entry = {"code": code}
            if isinstance(system, str) and _SYSTEM_RE.fullmatch(system):
                entry["system"] = system
            kept.append(entry)
        if len(kept) == _MAX_CODINGS:
            break
    return kept


def _paths(values: Any) -> list[str]:
    paths = [v for v in values if isinstance(v, str) and _PATH_RE.fullmatch(v)] if isinstance(values, list) else []
    return paths[:_MAX_PATHS]


# -- one order's outcome ------------------------------------------------------------------------

# written: suggestions written back; no_suggestion: nothing confident to write (not an error);
# skipped: not an order this worker acts on; rejected: a permanent problem (dead-letter topic)
OrderStatus = Literal["written", "no_suggestion", "skipped", "rejected"]
ORDER_STATUSES: tuple[OrderStatus, ...] = ("written", "no_suggestion", "skipped", "rejected")


class OrderOutcome(TypedDict):
    order: str  # "ServiceRequest/<id>" (or the reference the event named)
    status: OrderStatus
    reason_code: NotRequired[str]  # skipped / rejected: a stable code (schemas.rejections)
    reason: NotRequired[str]  # rejected: what went wrong, naming ids and codes only
    operation_outcome: NotRequired[dict[str, Any] | None]  # rejected by FHIR: the server's OperationOutcome
    imaging: NotRequired[bool]  # whether the protocol model ran
    protocol: NotRequired[dict[str, Any] | None]  # ModelOutput.to_json() of the protocol model
    diagnosis: NotRequired[dict[str, Any] | None]  # ... of the diagnosis model
    resources: NotRequired[dict[str, list[str]]]  # written: resource type -> "Type/id" references
    created: NotRequired[int]  # written: resources the transaction created
    existing: NotRequired[int]  # written: resources that were already there (a redelivered order)
    superseded: NotRequired[list[str]]  # written: older versions' open Tasks cancelled ("Task/id")
    cancelled: NotRequired[list[str]]  # skipped as void: its open Tasks cancelled ("Task/id")


# What a task reports when the order has no final outcome yet; the consumer decides about retrying.
# unavailable: a dependency is down (wait, do not spend the event's budget); deployment_error:
# credentials/base URL/payload key wrong (pause, never dead-letter); failed: this order failed (a
# bug, a timeout, a lost worker), spending the event's budget.
NotFinalStatus = Literal["unavailable", "deployment_error", "failed"]
NOT_FINAL_STATUSES: tuple[NotFinalStatus, ...] = ("unavailable", "deployment_error", "failed")


class RetryDetails(TypedDict, total=False):
    error_type: str  # failed: the exception's type name (never its text)
    http_status: int | None  # unavailable / deployment_error: the FHIR server's answer
    retry_after: float | None  # unavailable: the server's Retry-After, seconds


class NotFinalOutcome(RetryDetails):
    order: Required[str | None]  # the reference the task was given, when known
    status: Required[NotFinalStatus]
    reason_code: Required[str]


# The result of one order's task, as the dispatcher reads it back from the result backend.
TaskResult = OrderOutcome | NotFinalOutcome


def is_final(result: TaskResult) -> TypeIs[OrderOutcome]:
    """Whether a task result is the order's outcome (``ORDER_STATUSES``) rather than a retry."""
    return result.get("status") in ORDER_STATUSES
