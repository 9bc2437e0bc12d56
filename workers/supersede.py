"""A newer order version's suggestion supersedes the older ones; a void order withdraws them.

A protocol Task is written per (order version, model version). When version N of an order gets
its suggestion, the worker's still-untouched Tasks (status ``requested``) for older versions of
that order are set to ``cancelled`` with ``statusReason`` "Superseded by version N of the order",
in the same transaction as the new suggestion. When an order becomes ``revoked`` or
``entered-in-error``, its untouched Tasks are cancelled in a transaction of their own.

Each cancellation is a PUT with ``ifMatch`` on the Task version that was read, so a Task a
clinician moved meanwhile (accepted, in progress) is never overwritten: the server answers 412,
and the worker reads again and rebuilds (a bounded number of times). Tasks past ``requested``
belong to the clinician's workflow and are left alone. Replays are harmless: a cancelled Task is no
longer found, and conditional creates find the suggestion already written. An old version whose
event comes late (a dead-letter replay) gets its Task written already cancelled when a newer
(numeric) version has one.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from connectors.fhir import FhirClient, FhirPermanentError
from schemas.outcomes import OrderOutcome
from schemas.references import order_id_reference, parse_reference
from schemas.writeback import IDENTIFIER_SYSTEM, check_writeback_bundle

log = logging.getLogger(__name__)

OPEN_STATUSES = ("requested",)  # untouched suggestions; anything later is a clinician's
VOID_ORDER_REASONS = {
    "status_revoked": "The order was revoked",
    "status_entered_in_error": "The order was entered in error",
}
_MAX_ATTEMPTS = 3


def open_suggestion_tasks(fhir: FhirClient, order_id: str) -> list[dict[str, Any]]:
    """The worker's own Tasks in an open status whose focus is any version of the order."""
    return suggestion_tasks(fhir, order_id, statuses=OPEN_STATUSES)


def suggestion_tasks(
    fhir: FhirClient, order_id: str, *, statuses: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """The worker's own Tasks (any status, or one of ``statuses``) focusing any version of the order."""
    query = [("focus", f"ServiceRequest/{order_id}")] + ([("status", ",".join(statuses))] if statuses else [])
    ours = []
    for task in fhir.search("Task", query):
        identifiers = task.get("identifier") or []
        focus = parse_reference((task.get("focus") or {}).get("reference"))
        if (
            (statuses is None or task.get("status") in statuses)
            and any(isinstance(i, dict) and i.get("system") == IDENTIFIER_SYSTEM for i in identifiers)
            and focus is not None
            and focus.resource_type == "ServiceRequest"
            and focus.id == order_id
        ):
            ours.append(task)
    return ours


def cancellation_entries(
    tasks: list[dict[str, Any]], *, reason: str, newer_than: str | None = None, when: datetime | None = None
) -> list[dict[str, Any]]:
    """Conditional-update entries setting each Task to ``cancelled``. With ``newer_than`` (the
    order version now suggested) only Tasks for older versions are included."""
    stamp = (when or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    entries = []
    for task in tasks:
        version = parse_reference(task["focus"]["reference"]).version  # type: ignore[union-attr]
        if newer_than is not None and not _older(version, newer_than):
            continue
        meta = {k: v for k, v in (task.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
        cancelled = {**task, "meta": meta, "status": "cancelled", "statusReason": {"text": reason}, "lastModified": stamp}
        entries.append(
            {
                "fullUrl": f"Task/{task['id']}",
                "resource": cancelled,
                "request": {"method": "PUT", "url": f"Task/{task['id']}", "ifMatch": f'W/"{task["meta"]["versionId"]}"'},
            }
        )
    return entries


def prepare_supersede(
    fhir: FhirClient, bundle: dict[str, Any], service_request: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(full, extra)``: the write-back ``bundle`` with cancellations of the order's older open Tasks
    added at its end (``extra``), or with its Task born cancelled when a newer order version has one
    (a late replay). Without ``meta.versionId`` on the order, or without a Task in the Bundle,
    ``(bundle, [])``: versions cannot be ordered, nothing is superseded."""
    version = (service_request.get("meta") or {}).get("versionId")
    if not isinstance(version, str) or not any(
        (e.get("resource") or {}).get("resourceType") == "Task" for e in bundle.get("entry") or []
    ):
        return bundle, []
    tasks = suggestion_tasks(fhir, service_request["id"])
    newest = _newest_numeric_version(tasks)
    if newest is not None and version.isdigit() and int(version) < int(newest):
        # A late event (a replay of an old version): its Task is born cancelled, newer stays open.
        full, extra = _born_superseded(bundle, newest), []
    else:
        open_tasks = [t for t in tasks if t.get("status") in OPEN_STATUSES]
        extra = cancellation_entries(open_tasks, reason=f"Superseded by version {version} of the order", newer_than=version)
        full = {**bundle, "entry": [*bundle["entry"], *extra]} if extra else bundle
    if full is not bundle:
        check_writeback_bundle(full)
    return full, extra


def write_with_supersede(fhir: FhirClient, bundle: dict[str, Any], service_request: dict[str, Any]) -> dict[str, Any]:
    """POST the write-back ``bundle`` as :func:`prepare_supersede` extends it; returns the
    transaction response for ``bundle``'s own entries, plus ``"superseded"``: the Task references
    cancelled. A Task that changed meanwhile (412) is read again, a bounded number of times."""
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        full, extra = prepare_supersede(fhir, bundle, service_request)
        try:
            response = fhir.transaction(full)
        except FhirPermanentError as exc:
            if exc.status != 412 or attempt == _MAX_ATTEMPTS:
                raise
            log.info("order %s: a Task changed while superseding (412); reading again", service_request["id"])
            continue
        # Responses come in request order: the cancellations are the tail.
        own = len(bundle["entry"])
        return {**response, "entry": (response.get("entry") or [])[:own], "superseded": [e["request"]["url"] for e in extra]}
    raise AssertionError("unreachable")


def cancel_open_tasks(fhir: FhirClient, order_id: str, reason_code: str) -> list[str]:
    """Cancel the order's open suggestion Tasks because the order is void (``reason_code`` from
    :data:`VOID_ORDER_REASONS`); returns the Task references cancelled (``[]`` on a replay)."""
    reason = VOID_ORDER_REASONS[reason_code]
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        entries = cancellation_entries(open_suggestion_tasks(fhir, order_id), reason=reason)
        if not entries:
            return []
        try:
            fhir.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
            return [e["request"]["url"] for e in entries]
        except FhirPermanentError as exc:
            if exc.status != 412 or attempt == _MAX_ATTEMPTS:
                raise
    return []


def cancel_void_order(fhir: FhirClient, reference: str, reason_code: str) -> OrderOutcome:
    """The result of an inline void order (``ServiceRequest/{id}``, a code of
    :data:`VOID_ORDER_REASONS`): its open suggestion Tasks cancelled, reported as ``skipped``."""
    parsed = parse_reference(reference)
    if parsed is None or parsed.resource_type != "ServiceRequest" or reason_code not in VOID_ORDER_REASONS:
        raise ValueError("a void-order task needs a ServiceRequest reference and a void reason code")
    cancelled = cancel_open_tasks(fhir, parsed.id, reason_code)
    return {"order": order_id_reference(parsed.id), "status": "skipped", "reason_code": reason_code, "cancelled": cancelled}


def _newest_numeric_version(tasks: list[dict[str, Any]]) -> str | None:
    """The highest numeric order version the Tasks focus (non-numeric ids cannot be ordered)."""
    versions = [parse_reference(t["focus"]["reference"]).version for t in tasks]  # type: ignore[union-attr]
    numeric = [v for v in versions if v is not None and v.isdigit()]
    return max(numeric, key=int) if numeric else None


def _born_superseded(bundle: dict[str, Any], newest: str) -> dict[str, Any]:
    entries = []
    for entry in bundle["entry"]:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Task":
            reason = {"text": f"Superseded by version {newest} of the order"}
            entry = {**entry, "resource": {**resource, "status": "cancelled", "statusReason": reason}}
        entries.append(entry)
    return {**bundle, "entry": entries}


def _older(version: str | None, current: str) -> bool:
    """Is a Task's focus version older than ``current``? Numeric versions (most servers) compare as
    numbers; other ids only as "different" (the consumer keeps one order's events in order)."""
    if version is None:
        return False  # an unversioned focus cannot be placed; leave it
    if version.isdigit() and current.isdigit():
        return int(version) < int(current)
    return version != current
