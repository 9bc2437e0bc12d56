"""Orders in, write-backs out: the work of a task, free of Celery so it can be tested and
benchmarked directly.

A task handles a micro-batch of orders (:func:`suggest_for_orders`; one order is a batch of one,
:func:`suggest_for_order`): each order is read if the event only named it, checked, enriched with its
context, the models run over the batch's texts at once, each order's write-back Bundle is built and
validated on its own, and all of them go to the FHIR server as **one transaction**
(:mod:`schemas.writeback_batch`). The transaction is atomic, so each order is all-or-nothing, and
every entry is a conditional create, so a replay writes nothing twice. When the server refuses the
batch (one bad entry fails it), each order is written alone, so one bad order never blocks the
others: it alone is ``rejected``.

The outcome (:class:`schemas.outcomes.OrderOutcome`) is the result event published to the
suggestions topic. Transient FHIR errors and deployment problems propagate (the task reports them
for the whole batch; the consumer waits and re-sends); permanent ones become a ``rejected`` outcome
that the consumer sends to the dead-letter topic with the server's OperationOutcome (codes only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from connectors.fhir import FhirClient, FhirPermanentError, entry_status
from schemas.events import EventRejected, OrderItem, skip_reason, validate_fetched_order
from schemas.labels import ModelOutput
from schemas.outcomes import OrderOutcome, outcome_codes
from schemas.references import order_id_reference, parse_reference, parse_relative_reference
from schemas.text import build_model_input, clinical_text, context_references, is_imaging_order
from schemas.writeback import WritebackSchemaError, build_writeback_bundle
from schemas.writeback_batch import combine_transactions, split_response
from workers import logs, metrics, tracing  # Operations (issue 9)
from workers.supersede import VOID_ORDER_REASONS, cancel_open_tasks, prepare_supersede, write_with_supersede

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
    return predict_protocols(model, [sr], [text], top_k)[0]


def predict_protocols(model: Classifier, srs: Sequence[dict], texts: list[str], top_k: int) -> list[ModelOutput]:
    """:func:`predict_protocol` for several orders in one batched model call."""
    order_weights = getattr(model, "order_weights", None)
    weights = order_weights(list(srs)) if order_weights is not None else None
    if weights is None:
        return model.predict(texts, top_k=top_k)
    return model.predict(texts, top_k=top_k, weights=weights)  # type: ignore[call-arg]


@dataclass
class _Order:
    """One order of a micro-batch on its way through the stages: ``outcome`` is final once set;
    ``partial`` is the outcome being built while its Bundle waits to be written."""

    outcome: OrderOutcome | None = None
    partial: OrderOutcome | None = None
    sr: dict[str, Any] = field(default_factory=dict)
    context: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    protocol: ModelOutput | None = None
    diagnosis: ModelOutput | None = None
    bundle: dict[str, Any] | None = None
    log_fields: Mapping[str, Any] = field(default_factory=dict)  # ids for its log lines (task id, event)


def _resolve(item: OrderItem, fhir: FhirClient, fallback: dict[str, Any] | None) -> _Order:
    """The order to work on (read when the event only named it), or its final outcome already."""
    if item.service_request is not None:
        return _Order(sr=item.service_request)
    assert item.reference is not None
    try:
        sr = fhir.read(item.reference)
    except FhirPermanentError as exc:
        if fallback is None or exc.status not in (404, 410):
            return _Order(outcome={
                "order": item.reference,
                "status": "rejected",
                "reason_code": "order_not_found" if exc.status in (404, 410) else "order_not_readable",
                "reason": f"The FHIR server answered {exc.status} when reading {item.reference}.",
                "operation_outcome": outcome_codes(exc.operation_outcome),
            })  # fmt: skip
        sr = fallback  # the server does not hold this version: the event's own (decrypted) copy
    try:  # exactly the checks an inline order gets, so a fetched order cannot crash the task
        validate_fetched_order(sr, item.reference)
    except EventRejected as exc:
        return _Order(outcome={"order": item.reference, "status": "rejected", "reason_code": exc.code,
                               "reason": exc.message})  # fmt: skip
    reason = skip_reason(sr)
    if reason:
        skipped: OrderOutcome = {"order": order_id_reference(sr["id"]), "status": "skipped", "reason_code": reason}
        if reason in VOID_ORDER_REASONS:  # a void order withdraws its untouched suggestions
            skipped["cancelled"] = cancel_open_tasks(fhir, sr["id"], reason)
        return _Order(outcome=skipped)
    return _Order(sr=sr)


def _run_models(orders: list[_Order], models: ModelSet, top_k: int) -> None:
    """Both models over the batch, each in one call on the orders it applies to."""
    imaging, clinical = [], []
    for o in orders:
        run_protocol, run_diagnosis = applicable_models(o.sr, o.context)
        if run_protocol:
            imaging.append(o)
        if run_diagnosis:
            clinical.append(o)
    if imaging:
        outputs = predict_protocols(models.protocol, [o.sr for o in imaging], [o.text for o in imaging], top_k)
        for o, out in zip(imaging, outputs):
            o.protocol = out
    if clinical:
        # a model may read the order its own way (the phenotype ranker reads the full clinical text)
        reader = getattr(models.diagnosis, "input_text", None)
        texts = [reader(o.sr, o.context) if reader else o.text for o in clinical]
        for o, out in zip(clinical, models.diagnosis.predict(texts, top_k=top_k)):
            o.diagnosis = out


def _prepare(o: _Order, recorded: datetime) -> None:
    """The order's outcome so far and its write-back Bundle (or its final outcome: nothing to write,
    or a Bundle that is not valid FHIR)."""
    order = order_id_reference(o.sr["id"])
    outcome: OrderOutcome = {
        "order": order,
        "status": "no_suggestion",
        "imaging": o.protocol is not None,
        "protocol": o.protocol.to_json() if o.protocol else None,
        "diagnosis": o.diagnosis.to_json() if o.diagnosis else None,
    }
    if not worth_writing(o.protocol, o.diagnosis):
        # Nothing to write: not an imaging order and no confident diagnosis. Recorded, not an error.
        outcome["resources"] = {}
        o.outcome = outcome
        return
    try:
        o.bundle = build_writeback_bundle(o.sr, o.protocol, o.diagnosis, recorded=recorded)
    except WritebackSchemaError as exc:
        with logs.bind(**o.log_fields):  # loud: every order of this model would fail alike
            log.error("order %s: %s", order, exc)
        o.outcome = {**outcome, "status": "rejected", "reason_code": "invalid_writeback", "reason": str(exc)[:500]}
        return
    o.partial = outcome  # completed by the write


def _written(o: _Order, response: dict[str, Any], superseded: list[str]) -> None:
    assert o.partial is not None
    written, created, existing = _written_resources(response)
    o.outcome = {**o.partial, "status": "written", "resources": written, "created": created, "existing": existing}
    if superseded:
        o.outcome["superseded"] = superseded
    with logs.bind(**o.log_fields):
        log.info("order %s written: %d created, %d already present", o.outcome["order"], created, existing)


def _write_alone(fhir: FhirClient, o: _Order) -> None:
    """One order's own transaction (with its supersede cancellations); a refusal rejects it alone."""
    assert o.bundle is not None and o.partial is not None
    try:
        response = write_with_supersede(fhir, o.bundle, o.sr)  # cancels older versions' open Tasks
    except FhirPermanentError as exc:
        o.outcome = {
            **o.partial,
            "status": "rejected",
            "reason_code": "fhir_rejected_writeback",
            "reason": f"The FHIR server refused the write-back transaction with {exc.status}.",
            "operation_outcome": outcome_codes(exc.operation_outcome),
        }
        return
    _written(o, response, response["superseded"])


def _write_batch(fhir: FhirClient, pending: list[_Order]) -> None:
    """All pending orders in one transaction; refused (any 4xx), each order alone."""
    if len(pending) == 1:
        _write_alone(fhir, pending[0])
        return
    prepared = [prepare_supersede(fhir, o.bundle, o.sr) for o in pending]  # type: ignore[arg-type]
    combined = combine_transactions([full for full, _ in prepared])
    try:
        response = fhir.transaction(combined.bundle)
    except FhirPermanentError as exc:
        log.info("a transaction of %d orders was refused (%s); writing each order alone", len(pending), exc.status)
        for o in pending:
            _write_alone(fhir, o)
        return
    for o, part, (_, extra) in zip(pending, split_response(combined, response), prepared):
        own = len(o.bundle["entry"])  # type: ignore[index]
        _written(o, {**part, "entry": part["entry"][:own]}, [e["request"]["url"] for e in extra])


def suggest_for_orders(
    items: Sequence[tuple[OrderItem, dict[str, Any] | None]],
    fhir: FhirClient,
    models: ModelSet,
    *,
    enrich_context: bool = True,
    top_k: int = 5,
    recorded: datetime | None = None,
    log_fields: Sequence[Mapping[str, Any]] | None = None,
) -> list[OrderOutcome]:
    """Suggestions for a micro-batch of orders, written back in one transaction (see the module
    docstring); one outcome per item, in order. ``items``: ``(order, fallback)``, the fallback being
    the event's own copy of a referenced order (see :mod:`workers.payload`), used when the server
    does not hold that version (404/410). ``log_fields``: per item, ids its log lines carry."""
    orders = [_resolve(item, fhir, fallback) for item, fallback in items]
    for o, fields in zip(orders, log_fields or ()):
        o.log_fields = fields
    work = [o for o in orders if o.outcome is None]
    for o in work:
        o.context = _fetch_context(fhir, o.sr) if enrich_context else []
        o.text = build_model_input(o.sr, o.context)
    _run_models(work, models, top_k)
    when = recorded or datetime.now(timezone.utc)
    for o in work:
        _prepare(o, when)
    pending = [o for o in work if o.outcome is None]
    if pending:
        started = time.perf_counter()
        with tracing.span("ehrw.fhir.transaction"):  # Operations (issue 9)
            _write_batch(fhir, pending)
        share = (time.perf_counter() - started) / len(pending)  # the write-back time per order
        for _ in pending:
            metrics.writeback_seconds.observe(share)
    outcomes = [o.outcome for o in orders]
    assert all(out is not None for out in outcomes)
    return outcomes  # type: ignore[return-value]


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
    """Run the applicable models on one order and write the suggestions back in one transaction
    (a micro-batch of one)."""
    return suggest_for_orders([(item, fallback)], fhir, models, enrich_context=enrich_context, top_k=top_k,
                              recorded=recorded)[0]
