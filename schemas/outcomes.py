"""What happened to one order: the result the worker publishes to the suggestions topic and the
consumer reads to decide between commit and dead-letter. Ids, codes and counts only, never text."""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

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
