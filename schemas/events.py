"""Kafka event values -> the orders to work on.

Four shapes are accepted (DESIGN.md "Events accepted"):

1. a ``ServiceRequest`` resource;
2. a ``Bundle`` (collection, batch, transaction, searchset, history) holding ServiceRequests;
   other entries are ignored;
3. an R4 Subscriptions-Backport notification (``history`` Bundle whose first entry is a
   ``Parameters`` SubscriptionStatus): full-resource focus entries become orders, id-only ones
   become references that the worker fetches, handshakes and heartbeats carry no orders;
4. a CloudEvents 1.0 envelope naming the resource (``subject``, Azure FHIR event ``data`` or a
   Google Healthcare resource name): a reference that the worker fetches.

Every failure raises :class:`EventRejected` with a stable ``code`` and a sentence. The sentence
names the problem by field path, id, code or JSON position and never quotes free text from the
event (notes, names, narrative): it goes to logs and to the dead-letter headers. The dead-letter
record keeps the original bytes, so one bad ServiceRequest rejects its whole event (a Bundle is
never half-processed) without losing the good orders: they can be replayed from the DLQ once
fixed.

Valid but non-actionable orders (see :func:`skip_reason`) are returned in ``ParsedEvent.skipped``
to be counted, not dead-lettered.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from schemas.orders import VOID_REASONS, skip_reason, validate_service_request
from schemas.references import ID_RE, RESOURCE_TYPE_RE, ParsedReference, parse_reference
from schemas.rejections import FIELD_NAME_RE, REASON_CODES, EventRejected, code_repr, json_type

__all__ = [
    "REASON_CODES",
    "EventRejected",
    "OrderItem",
    "ParsedEvent",
    "parse_event",
    "skip_reason",
    "validate_fetched_order",
    "validate_service_request",
]

BUNDLE_TYPES = frozenset(
    {
        "document",
        "message",
        "transaction",
        "transaction-response",
        "batch",
        "batch-response",
        "history",
        "searchset",
        "collection",
    }
)
ACCEPTED_BUNDLE_TYPES = frozenset({"collection", "batch", "transaction", "searchset", "history"})

# SubscriptionStatus ``type`` codes (R4 Subscriptions Backport IG).
NOTIFICATION_TYPES = frozenset(
    {"handshake", "heartbeat", "event-notification", "query-status", "query-event"}
)
_NOTIFICATIONS_WITH_EVENTS = frozenset({"event-notification", "query-event"})
SUBSCRIPTION_STATUSES = frozenset({"requested", "active", "error", "off", "entered-in-error"})


@dataclass
class OrderItem:
    """One order to work on: the resource itself, or a reference (``ServiceRequest/1`` or
    ``ServiceRequest/1/_history/2``) that the worker reads from its FHIR server. Exactly one is set."""

    service_request: dict[str, Any] | None = None
    reference: str | None = None

    def __post_init__(self) -> None:
        if (self.service_request is None) == (self.reference is None):
            raise ValueError("OrderItem needs exactly one of service_request and reference")

    @property
    def order_id(self) -> str:
        """The ServiceRequest id (for Kafka keys, logs and metrics)."""
        if self.service_request is not None:
            return str(self.service_request.get("id"))
        parsed = parse_reference(self.reference)
        return parsed.id if parsed else str(self.reference)


@dataclass
class ParsedEvent:
    """Orders to work on and ``(order id, reason code)`` of the valid orders that need no work.
    ``kind`` says which event shape it was: resource, bundle, notification or cloudevent."""

    items: list[OrderItem]
    skipped: list[tuple[str, str]]
    kind: str = "resource"

    @property
    def void_orders(self) -> list[tuple[str, str]]:
        """``(order id, reason code)`` of the void skipped orders: their open suggestions get cancelled."""
        return [(order_id, code) for order_id, code in self.skipped if code in VOID_REASONS]


# --------------------------------------------------------------------------- entry point


def parse_event(raw: bytes) -> ParsedEvent:
    """Parse and validate one Kafka message value; raises :class:`EventRejected`."""
    doc = _load_json(raw)
    if not isinstance(doc, dict):
        raise EventRejected("not_an_object", f"The event is a JSON {json_type(doc)}, not an object.")
    if "resourceType" in doc:
        return _parse_resource(doc)
    if "specversion" in doc:
        return _parse_cloudevent(doc)
    raise EventRejected(
        "unsupported_resource_type",
        "The event is neither a FHIR resource (no resourceType) nor a CloudEvent (no specversion).",
    )


def validate_fetched_order(resource: Any, reference: str) -> dict[str, Any]:
    """Check an order read from the FHIR server for a reference (a CloudEvent or an id-only
    notification) exactly as an inline one is checked, and that it is the order the reference
    names; returns it, or raises :class:`EventRejected`.

    The server's answer is as untrusted as the event: the same validator runs on it, so a fetched
    order can only ever be worked on, skipped or rejected, never crash the task.
    """
    wanted = parse_reference(reference)
    if wanted is None or wanted.resource_type != "ServiceRequest":
        raise EventRejected("invalid_structure", "The order reference is not 'ServiceRequest/{id}'.")
    validate_service_request(resource, path=wanted.relative)
    where = f"The order read for {wanted.relative}"
    if resource["id"] != wanted.id:
        raise EventRejected("invalid_structure", f"{where} has a different id.")
    version = (resource.get("meta") or {}).get("versionId") if isinstance(resource.get("meta"), dict) else None
    if wanted.version and version is not None and version != wanted.version:
        raise EventRejected("invalid_structure", f"{where} is another version (meta.versionId).")
    return resource


def _parse_resource(doc: dict[str, Any]) -> ParsedEvent:
    resource_type = doc.get("resourceType")
    if resource_type == "ServiceRequest":
        validate_service_request(doc)
        return _classify([doc], kind="resource")
    if resource_type == "Bundle":
        return _parse_bundle(doc)
    raise EventRejected(
        "unsupported_resource_type",
        f"resourceType {code_repr(resource_type, RESOURCE_TYPE_RE)} is not accepted; "
        "expected a ServiceRequest, a Bundle of them, a subscription notification or a CloudEvent.",
    )


# --------------------------------------------------------------------------- JSON


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # FHIR JSON forbids repeated keys; silently keeping the last one would let
    # {"status": "active", "status": "completed"} mean different things to different parsers.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(raw: bytes | bytearray | memoryview | str) -> Any:
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"The event is not UTF-8: invalid byte at offset {exc.start}."
            raise EventRejected("not_utf8", message) from None
    text = text.removeprefix("\ufeff")  # tolerated by RFC 8259 parsers; some producers add it
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno} (char {exc.pos})"
        raise EventRejected("not_json", f"The event is not valid JSON: {exc.msg}: {where}.") from None
    except _DuplicateKey as exc:
        raise EventRejected(
            "not_json", f"The event repeats the key {code_repr(exc.key, FIELD_NAME_RE)} in one object."
        ) from None
    except RecursionError:
        raise EventRejected("not_json", "The event is nested too deeply to parse.") from None
    except ValueError:
        raise EventRejected("not_json", "The event contains NaN or Infinity: not valid JSON.") from None


def _classify(service_requests: list[dict[str, Any]], *, kind: str) -> ParsedEvent:
    event = ParsedEvent(items=[], skipped=[], kind=kind)
    for sr in service_requests:
        reason = skip_reason(sr)
        if reason:
            event.skipped.append((sr["id"], reason))
        else:
            event.items.append(OrderItem(service_request=sr))
    return event


# --------------------------------------------------------------------------- Bundle


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise EventRejected("invalid_structure", "Bundle.entry is not an array.")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise EventRejected("invalid_structure", f"Bundle.entry[{i}] is not an object.")
        if "resource" in entry and not isinstance(entry["resource"], dict):
            raise EventRejected("invalid_structure", f"Bundle.entry[{i}].resource is not an object.")
    return entries


def _deleted_service_request(entry: dict[str, Any]) -> str | None:
    """The id of a ServiceRequest that a resource-less DELETE entry names, else None."""
    request = entry.get("request")
    if not isinstance(request, dict) or request.get("method") != "DELETE":
        return None
    parsed = parse_reference(request.get("url")) or parse_reference(entry.get("fullUrl"))
    return parsed.id if parsed and parsed.resource_type == "ServiceRequest" else None


def _parse_bundle(bundle: dict[str, Any]) -> ParsedEvent:
    bundle_type = bundle.get("type")
    entries = _entries(bundle)
    if bundle_type == "history" and _first_resource_type(entries) == "Parameters":
        return _parse_notification(entries)
    if not _is_code(bundle_type, BUNDLE_TYPES):
        raise EventRejected("invalid_structure", "Bundle.type is missing or not a valid bundle-type code.")
    if bundle_type not in ACCEPTED_BUNDLE_TYPES:
        accepted = ", ".join(sorted(ACCEPTED_BUNDLE_TYPES))
        message = f"Bundle type {bundle_type!r} is not accepted; expected one of {accepted}."
        raise EventRejected("unsupported_resource_type", message)

    # A history Bundle lists versions newest first: only the newest version of an order is
    # worked on, and an order whose newest entry is a DELETE is not worked on at all.
    newest_only = bundle_type == "history"
    seen: set[str] = set()
    orders: list[dict[str, Any]] = []
    position: dict[str, int] = {}  # order id -> index in orders
    skipped: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource")
        if resource is None:
            deleted = _deleted_service_request(entry)
            if deleted and deleted not in seen:
                skipped.append((deleted, "deleted"))
                seen.add(deleted)
            continue
        if resource.get("resourceType") != "ServiceRequest":
            continue
        search = entry.get("search")
        if bundle_type == "searchset" and isinstance(search, dict) and search.get("mode") == "include":
            continue  # included alongside the matches, not itself a result
        validate_service_request(resource, path=f"Bundle.entry[{i}].resource")
        order_id = resource["id"]
        if order_id in seen:
            # One order once per event: the same id twice would be two tasks racing on one
            # order. A later entry wins only with a higher numeric meta.versionId.
            kept = position.get(order_id)
            if not newest_only and kept is not None and _newer(resource, orders[kept]):
                orders[kept] = resource
                skipped.append((order_id, "superseded"))
            else:
                skipped.append((order_id, "superseded" if newest_only else "duplicate"))
            continue
        seen.add(order_id)
        position[order_id] = len(orders)
        orders.append(resource)

    event = _classify(orders, kind="bundle")
    event.skipped = skipped + event.skipped
    if not event.items and not event.skipped:
        raise EventRejected("no_service_request", f"The {bundle_type} Bundle holds no ServiceRequest.")
    return event


def _newer(candidate: dict[str, Any], kept: dict[str, Any]) -> bool:
    new, old = (str((o.get("meta") or {}).get("versionId") or "") for o in (candidate, kept))
    return new.isdigit() and old.isdigit() and int(new) > int(old)


def _first_resource_type(entries: list[dict[str, Any]]) -> Any:
    return (entries[0].get("resource") or {}).get("resourceType") if entries else None


# --------------------------------------------------------------------------- subscription notification


def _parse_notification(entries: list[dict[str, Any]]) -> ParsedEvent:
    """An R4 Subscriptions-Backport notification Bundle (entry[0] is the SubscriptionStatus)."""
    parameters = _status_parameters(entries[0]["resource"])
    notification_type = _single_value(parameters, "type", "valueCode")
    if not _is_code(notification_type, NOTIFICATION_TYPES):
        problem = "is missing" if notification_type is None else f"{code_repr(notification_type)} is invalid"
        raise EventRejected("invalid_notification", f"SubscriptionStatus parameter 'type' {problem}.")
    subscription = _single_value(parameters, "subscription", "valueReference")
    if not isinstance(subscription, dict) or not isinstance(subscription.get("reference"), str):
        raise EventRejected(
            "invalid_notification", "SubscriptionStatus parameter 'subscription' has no reference."
        )
    status = _single_value(parameters, "status", "valueCode")
    if status is not None and not _is_code(status, SUBSCRIPTION_STATUSES):
        raise EventRejected(
            "invalid_notification", f"SubscriptionStatus parameter 'status' {code_repr(status)} is not valid."
        )

    event = ParsedEvent(items=[], skipped=[], kind="notification")
    if notification_type not in _NOTIFICATIONS_WITH_EVENTS:
        return event  # handshake, heartbeat, query-status: valid, nothing to do

    full: list[dict[str, Any]] = []
    references: list[str] = []
    covered: set[str] = set()
    for i, entry in enumerate(entries[1:], start=1):
        resource = entry.get("resource")
        if resource is not None:
            if resource.get("resourceType") == "ServiceRequest":
                validate_service_request(resource, path=f"Bundle.entry[{i}].resource")
                if resource["id"] not in covered:
                    full.append(resource)
                    covered.add(resource["id"])
            continue
        deleted = _deleted_service_request(entry)
        if deleted:
            event.skipped.append((deleted, "deleted"))
            covered.add(deleted)
            continue
        url = entry["request"].get("url") if isinstance(entry.get("request"), dict) else None
        parsed = parse_reference(entry.get("fullUrl")) or parse_reference(url)
        if parsed and parsed.resource_type == "ServiceRequest" and parsed.id not in covered:
            references.append(parsed.relative)
            covered.add(parsed.id)

    # id-only notifications may carry the focus only inside notification-event (no entries).
    for focus in _event_focus_references(parameters):
        parsed = parse_reference(focus)
        if parsed and parsed.resource_type == "ServiceRequest" and parsed.id not in covered:
            references.append(parsed.relative)
            covered.add(parsed.id)

    classified = _classify(full, kind="notification")
    event.items = classified.items + [OrderItem(reference=ref) for ref in references]
    event.skipped += classified.skipped
    if not event.items and not event.skipped:
        raise EventRejected(
            "no_service_request", f"The {notification_type} notification has no ServiceRequest focus."
        )
    return event


def _status_parameters(status: dict[str, Any]) -> list[dict[str, Any]]:
    parameters = status.get("parameter")
    if not isinstance(parameters, list) or not parameters:
        raise EventRejected(
            "invalid_notification", "SubscriptionStatus (Bundle.entry[0].resource) has no parameter."
        )
    for i, parameter in enumerate(parameters):
        if not isinstance(parameter, dict) or not isinstance(parameter.get("name"), str):
            raise EventRejected("invalid_notification", f"SubscriptionStatus parameter[{i}] has no name.")
    return parameters


def _single_value(parameters: list[dict[str, Any]], name: str, value_key: str) -> Any:
    values = [p.get(value_key) for p in parameters if p["name"] == name]
    if len(values) > 1:
        raise EventRejected("invalid_notification", f"SubscriptionStatus parameter {name!r} is repeated.")
    return values[0] if values else None


def _event_focus_references(parameters: list[dict[str, Any]]) -> list[Any]:
    focus: list[Any] = []
    for parameter in parameters:
        if parameter["name"] != "notification-event":
            continue
        parts = parameter.get("part")
        for part in parts if isinstance(parts, list) else []:
            reference = part.get("valueReference") if isinstance(part, dict) else None
            if isinstance(reference, dict) and part.get("name") == "focus":
                focus.append(reference.get("reference"))
    return focus


# --------------------------------------------------------------------------- CloudEvents


def _parse_cloudevent(event: dict[str, Any]) -> ParsedEvent:
    """A CloudEvents 1.0 envelope (structured mode) that names a ServiceRequest.

    The resource comes from ``data`` (Azure Health Data Services: ``resourceType``,
    ``resourceFhirId``, ``resourceVersionId``; Google Cloud Healthcare: the resource name string;
    or a full resource) or from ``subject`` (``ServiceRequest/1`` or a URL ending so). Absolute
    bases are dropped: the worker reads from the FHIR server it is configured for.
    """
    for attribute in ("specversion", "id", "source", "type"):
        value = event.get(attribute)
        if not isinstance(value, str) or not value.strip():
            raise EventRejected(
                "invalid_cloudevent", f"CloudEvent attribute {attribute!r} is missing, empty or not a string."
            )
    if event["specversion"] != "1.0":
        spec = code_repr(event["specversion"])
        raise EventRejected("invalid_cloudevent", f"CloudEvent specversion {spec} is not 1.0.")
    deleted = "deleted" in event["type"].lower()

    data = _cloudevent_data(event)
    version: str | None = None
    target: ParsedReference | None = None
    if isinstance(data, dict) and "resourceFhirId" in data:
        target, version = _azure_target(data)
    elif isinstance(data, dict) and "resourceType" in data:
        if not deleted:  # the resource itself, inline: validated like an event of its own
            return _with_kind(_parse_resource(data), "cloudevent")
        target = parse_reference(f"{data.get('resourceType')}/{data.get('id')}")
    elif isinstance(data, str):
        target = parse_reference(data.strip())

    subject = event.get("subject")
    subject_target = parse_reference(subject) if isinstance(subject, str) else None
    if target and subject_target and target.relative_unversioned != subject_target.relative_unversioned:
        raise EventRejected("invalid_cloudevent", "CloudEvent subject and data name different resources.")
    target = target or subject_target
    if target is None:
        raise EventRejected(
            "invalid_cloudevent",
            "CloudEvent names no resource: expected subject 'ServiceRequest/{id}' or data naming it.",
        )
    if target.resource_type != "ServiceRequest":
        message = f"The CloudEvent concerns a {target.resource_type}, not a ServiceRequest."
        raise EventRejected("unsupported_resource_type", message)
    if deleted:
        return ParsedEvent(items=[], skipped=[(target.id, "deleted")], kind="cloudevent")
    reference = f"ServiceRequest/{target.id}"
    version = version or target.version
    if version:
        reference += f"/_history/{version}"
    return ParsedEvent(items=[OrderItem(reference=reference)], skipped=[], kind="cloudevent")


def _cloudevent_data(event: dict[str, Any]) -> Any:
    if "data" in event:
        return event["data"]
    if "data_base64" not in event:
        return None
    try:
        payload = base64.b64decode(event["data_base64"], validate=True)
        text = payload.decode("utf-8")
    except (binascii.Error, TypeError, ValueError):
        raise EventRejected("invalid_cloudevent", "CloudEvent data_base64 is not base64 UTF-8.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # e.g. a Google Healthcare resource name


def _azure_target(data: dict[str, Any]) -> tuple[ParsedReference, str | None]:
    resource_type, resource_id = data.get("resourceType"), data.get("resourceFhirId")
    version = data.get("resourceVersionId")
    if not isinstance(resource_type, str) or not RESOURCE_TYPE_RE.fullmatch(resource_type):
        raise EventRejected("invalid_cloudevent", "CloudEvent data.resourceType is not a resource type.")
    if not isinstance(resource_id, str) or not ID_RE.fullmatch(resource_id):
        raise EventRejected("invalid_cloudevent", "CloudEvent data.resourceFhirId is not a FHIR id.")
    if isinstance(version, bool) or (version is not None and not isinstance(version, (int, str))):
        raise EventRejected("invalid_cloudevent", "CloudEvent data.resourceVersionId is not a version id.")
    version_text = None if version is None else str(version)
    if version_text is not None and not ID_RE.fullmatch(version_text):
        raise EventRejected("invalid_cloudevent", "CloudEvent data.resourceVersionId is not a version id.")
    return ParsedReference(resource_type, resource_id, version_text), version_text


def _with_kind(event: ParsedEvent, kind: str) -> ParsedEvent:
    event.kind = kind
    return event


def _is_code(value: Any, codes: frozenset[str]) -> bool:
    return isinstance(value, str) and value in codes
