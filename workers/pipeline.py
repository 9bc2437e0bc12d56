"""One order in, one write-back out: the work of a task, free of Celery so it can be tested and
benchmarked directly.

The outcome (:class:`schemas.outcomes.OrderOutcome`) is the result event published to the suggestions topic. Transient FHIR errors
propagate (the Celery task retries them); permanent ones become a ``rejected`` outcome that the
consumer sends to the dead-letter topic with the server's OperationOutcome.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from connectors.fhir import FhirClient, FhirPermanentError, entry_status
from schemas.events import EventRejected, OrderItem, skip_reason, validate_fetched_order
from schemas.labels import ModelOutput
from schemas.outcomes import OrderOutcome, outcome_codes
from schemas.references import order_id_reference, parse_reference, parse_relative_reference
from schemas.text import build_model_input, clinical_text, context_references, is_imaging_order
from schemas.writeback import WritebackSchemaError, build_writeback_bundle
from workers import metrics, tracing  # Operations (issue 9)
from workers.supersede import VOID_ORDER_REASONS, cancel_open_tasks, write_with_supersede

log = logging.getLogger(__name__)

# Only resource types whose content build_model_input knows how to use are worth a round trip.
_CONTEXT_TYPES = {"Condition", "Observation", "DocumentReference", "AllergyIntolerance", "Binary"}


class Classifier(Protocol):
    def predict(self, texts: list[str], top_k: int = 5) -> list[ModelOutput]: ...


@dataclass
class ModelSet:
    protocol: Classifier
    diagnosis: Classifier


def applicable_models(sr: dict, context: Sequence[dict] = ()) -> tuple[bool, bool]:
    """``(protocol, diagnosis)``: whether each model runs on this order. The protocol model for
    imaging orders, the diagnosis model when the order (or its context) carries clinical text."""
    return is_imaging_order(sr), bool(clinical_text(sr, context))


def worth_writing(protocol: ModelOutput | None, diagnosis: ModelOutput | None) -> bool:
    """Whether there is a suggestion to write back: a protocol, or a diagnosis that did not abstain."""
    return protocol is not None or (diagnosis is not None and not diagnosis.abstained)


def _fetch_context(fhir: FhirClient, sr: dict) -> list[dict]:
    context: list[dict] = []
    for ref in context_references(sr):
        parsed = parse_relative_reference(ref)
        if parsed is None or parsed.resource_type not in _CONTEXT_TYPES:
            continue
        try:
            context.append(fhir.read(ref))
        except FhirPermanentError as exc:
            # A dangling reference is the order's problem, not a reason to drop the suggestion.
            log.info("context %s not readable (%s); continuing without it", ref, exc.status)
    return context


def _written_resources(response: dict) -> tuple[dict[str, list[str]], int, int]:
    written: dict[str, list[str]] = {}
    created = existing = 0
    for entry in response.get("entry", []):
        resp = entry.get("response", {})
        location = parse_reference(resp.get("location", "") or "")
        if location is not None:
            written.setdefault(location.resource_type, []).append(location.relative_unversioned)
        status = entry_status(entry)
        if status == 201:
            created += 1
        elif 200 <= status < 300:
            existing += 1
    return written, created, existing


def predict_protocol(model: Classifier, sr: dict, text: str, top_k: int) -> ModelOutput:
    """The protocol model restricted to the protocols of the exam the order names (its code); a
    classifier without ``order_weights`` (or an order naming no exam) is not restricted."""
    order_weights = getattr(model, "order_weights", None)
    weights = order_weights([sr]) if order_weights is not None else None
    if weights is None:
        return model.predict([text], top_k=top_k)[0]
    return model.predict([text], top_k=top_k, weights=weights)[0]  # type: ignore[call-arg]


def suggest_for_order(
    item: OrderItem,
    fhir: FhirClient,
    models: ModelSet,
    *,
    enrich_context: bool = True,
    top_k: int = 5,
    recorded: datetime | None = None,
    fallback: dict[str, Any] | None = None,
) -> OrderOutcome:
    """Run the applicable models on one order and write the suggestions back in one transaction.

    ``fallback``: the event's own copy of a referenced order (see :mod:`workers.payload`), used
    when the server does not hold that version (404/410)."""
    if item.service_request is not None:
        sr = item.service_request
    else:
        assert item.reference is not None
        try:
            sr = fhir.read(item.reference)
        except FhirPermanentError as exc:
            if fallback is None or exc.status not in (404, 410):
                return {
                    "order": item.reference,
                    "status": "rejected",
                    "reason_code": "order_not_found" if exc.status in (404, 410) else "order_not_readable",
                    "reason": f"The FHIR server answered {exc.status} when reading {item.reference}.",
                    "operation_outcome": outcome_codes(exc.operation_outcome),
                }
            sr = fallback  # the server does not hold this version: the event's own (decrypted) copy
        try:  # exactly the checks an inline order gets, so a fetched order cannot crash the task
            validate_fetched_order(sr, item.reference)
        except EventRejected as exc:
            return {"order": item.reference, "status": "rejected", "reason_code": exc.code, "reason": exc.message}
        reason = skip_reason(sr)
        if reason:
            skipped: OrderOutcome = {"order": order_id_reference(sr["id"]), "status": "skipped", "reason_code": reason}
            if reason in VOID_ORDER_REASONS:  # a void order withdraws its untouched suggestions
                skipped["cancelled"] = cancel_open_tasks(fhir, sr["id"], reason)
            return skipped

    order = order_id_reference(sr["id"])
    context = _fetch_context(fhir, sr) if enrich_context else []
    text = build_model_input(sr, context)

    run_protocol, run_diagnosis = applicable_models(sr, context)
    protocol = predict_protocol(models.protocol, sr, text, top_k) if run_protocol else None
    # a model may read the order its own way (the phenotype ranker reads the full clinical text)
    dx_text = getattr(models.diagnosis, "input_text", lambda s, c: text)(sr, context)
    diagnosis = models.diagnosis.predict([dx_text], top_k=top_k)[0] if run_diagnosis else None
    outcome: OrderOutcome = {
        "order": order,
        "status": "no_suggestion",
        "imaging": protocol is not None,
        "protocol": protocol.to_json() if protocol else None,
        "diagnosis": diagnosis.to_json() if diagnosis else None,
    }
    if not worth_writing(protocol, diagnosis):
        # Nothing to write: not an imaging order and no confident diagnosis. Recorded, not an error.
        outcome["resources"] = {}
        return outcome

    try:
        bundle = build_writeback_bundle(sr, protocol, diagnosis, recorded=recorded or datetime.now(timezone.utc))
    except WritebackSchemaError as exc:
        log.error("order %s: %s", order, exc)  # loud: every order of this model would fail alike
        outcome.update({"status": "rejected", "reason_code": "invalid_writeback", "reason": str(exc)[:500]})
        return outcome
    try:
        with metrics.timed(metrics.writeback_seconds), tracing.span("ehrw.fhir.transaction"):  # Operations (issue 9)
            response = write_with_supersede(fhir, bundle, sr)  # cancels older versions' open Tasks
    except FhirPermanentError as exc:
        outcome.update({
            "status": "rejected",
            "reason_code": "fhir_rejected_writeback",
            "reason": f"The FHIR server refused the write-back transaction with {exc.status}.",
            "operation_outcome": outcome_codes(exc.operation_outcome),
        })
        return outcome
    written, created, existing = _written_resources(response)
    outcome.update({"status": "written", "resources": written, "created": created, "existing": existing})
    if response["superseded"]:
        outcome["superseded"] = response["superseded"]
    log.info("order %s written: %d created, %d already present", order, created, existing)
    return outcome
