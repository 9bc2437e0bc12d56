"""Model outputs -> one FHIR R4 transaction Bundle of suggestions (HL7 "AI Transparency on FHIR").

The Bundle holds, each created with conditional create (``ifNoneExist``) so that replaying an
event creates nothing twice:

- a ``Device`` per model whose output is written (name, version, model card), keyed by
  ``DEVICE_IDENTIFIER_SYSTEM|{model}@{version}``;
- the protocol ``Task`` (always, for an imaging order; on abstention without a suggested protocol
  but with the ranked alternatives);
- the diagnosis ``RiskAssessment`` (only when the model did not abstain);
- a ``Provenance`` naming the Device(s) as authors and the order as source.

Task and Device are found again by ``identifier``. Provenance has no ``identifier`` element, and
RiskAssessment's identifier search is not indexed everywhere, so their keys also ride in
``meta.tag`` and their ``ifNoneExist`` searches ``_tag``, a base parameter all servers index.

Every resource carries ``meta.security`` AIAST. Entries reference each other by ``urn:uuid``
fullUrls (uuid5 of the idempotency key): the server resolves them to the resource it created or,
when ``ifNoneExist`` matched, to the one that already exists. Output is deterministic for equal
inputs, except for ``recorded``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from schemas.labels import ModelOutput, Prediction
from schemas.references import order_reference
from schemas.validation import r4_schema_errors
from schemas.writeback_common import (
    AIAST,
    DEVICE_IDENTIFIER_SYSTEM,
    HL7_CS,
    IDENTIFIER_SYSTEM,
    KEY_VERSION,
    MODEL_SYSTEM,
    NO_CONFIDENT_PROTOCOL,
    PROTOCOL_SUGGESTED,
    PROVENANCE_TAG_SYSTEM,
    SUGGESTION_CODES,
    SUGGESTION_SYSTEM,
    OrderContext,
    aiast_meta,
    conditional_entry,
    device_identifier_value,
    full_url,
    key_hash,
    model_note,
    order_id_of,
    order_idempotency_key,
    prediction_concept,
    rounded_probability,
    suggestion_coding,
    suggestion_concept,
    suggestion_identifier,
    token_query,
)
from schemas.writeback_diagnosis import (
    HPO_SYSTEM,
    PHENOTYPE_INTERPRETATION,
    phenotype_observation,
    risk_assessment,
)

# The systems and keys live in schemas.writeback_common; they are re-exported here, with the Bundle.
__all__ = [
    "ABSTAINED_ALTERNATIVES",
    "AIAST",
    "DEVICE_IDENTIFIER_SYSTEM",
    "HPO_SYSTEM",
    "IDENTIFIER_SYSTEM",
    "MODEL_SYSTEM",
    "NO_CONFIDENT_PROTOCOL",
    "PROTOCOL_SUGGESTED",
    "PROVENANCE_TAG_SYSTEM",
    "SUGGESTION_CODES",
    "SUGGESTION_SYSTEM",
    "WritebackSchemaError",
    "build_writeback_bundle",
    "check_writeback_bundle",
    "device_identifier_value",
    "order_idempotency_key",
    "suggestion_codesystem",
    "suggestion_identifier",
]

# Below the threshold the Task lists this many ranked protocols for the radiologist to choose from.
ABSTAINED_ALTERNATIVES = 3

_PRIORITIES = frozenset({"routine", "urgent", "asap", "stat"})


# --------------------------------------------------------------------------- the Bundle


def build_writeback_bundle(
    service_request: dict[str, Any],
    protocol: ModelOutput | None,
    diagnosis: ModelOutput | None,
    *,
    recorded: datetime | None = None,
) -> dict[str, Any]:
    """The transaction Bundle for one order's suggestions.

    ``protocol``: the protocol model's output for an imaging order (``None`` for other orders).
    ``diagnosis``: the diagnosis model's output (``None`` when it did not run); abstained -> no
    RiskAssessment. When nothing is left to write the Bundle has no ``entry`` (callers skip
    posting it). ``recorded`` defaults to now; a naive datetime is taken as UTC.
    """
    order_id = order_id_of(service_request)
    subject = _patient_reference(service_request.get("subject"))
    if subject is None:
        raise ValueError(f"ServiceRequest {order_id} has no subject reference or identifier")
    order = OrderContext(
        order_ref=order_reference(service_request),
        subject=subject,
        encounter=_plain_reference(service_request.get("encounter")),
        when=_instant(recorded or datetime.now(timezone.utc)),
    )

    entries: list[dict[str, Any]] = []
    devices: dict[str, str] = {}  # device fullUrl -> model label, in insertion order
    targets: list[tuple[str, str]] = []  # (fullUrl, key) of the suggestion resources

    def add_device(output: ModelOutput) -> str:
        entry = _device_entry(output)
        if entry["fullUrl"] not in devices:
            devices[entry["fullUrl"]] = device_identifier_value(output.model, output.model_version)
            entries.append(entry)
        return entry["fullUrl"]

    if protocol is not None:
        device_url = add_device(protocol)
        key = suggestion_identifier(service_request, protocol.model, protocol.model_version)
        priority = service_request.get("priority")  # a stat order's protocol Task is stat too
        task = _task(
            protocol,
            order,
            key=key,
            priority=priority if isinstance(priority, str) and priority in _PRIORITIES else None,
            device_url=device_url,
        )
        entries.append(conditional_entry(task, key, token_query("identifier", IDENTIFIER_SYSTEM, key)))
        targets.append((entries[-1]["fullUrl"], key))

    if diagnosis is not None and not diagnosis.abstained and diagnosis.predictions:
        device_url = add_device(diagnosis)
        key = suggestion_identifier(service_request, diagnosis.model, diagnosis.model_version)
        observations = [
            phenotype_observation(ph, order, key=key, device_url=device_url)
            for ph in diagnosis.phenotypes
            if ph.get("status") in PHENOTYPE_INTERPRETATION and str(ph.get("code", "")).startswith("HP:")
        ]
        for obs in observations:
            obs_key = obs["identifier"][0]["value"]
            entries.append(conditional_entry(obs, obs_key, token_query("identifier", IDENTIFIER_SYSTEM, obs_key)))
            targets.append((entries[-1]["fullUrl"], obs_key))
        risk = risk_assessment(
            diagnosis,
            order,
            key=key,
            device_url=device_url,
            basis=[full_url("Observation", o["identifier"][0]["value"]) for o in observations],
        )
        # R4 defines RiskAssessment?identifier, but servers do not all index it (sekmet does not);
        # _tag is a base parameter every server indexes, so the key rides in meta.tag as well.
        entries.append(conditional_entry(risk, key, token_query("_tag", PROVENANCE_TAG_SYSTEM, key)))
        targets.append((entries[-1]["fullUrl"], key))

    bundle: dict[str, Any] = {"resourceType": "Bundle", "meta": aiast_meta(), "type": "transaction"}
    if not targets:
        return bundle

    provenance_key = key_hash(KEY_VERSION, "Provenance", *sorted(key for _, key in targets))
    provenance = _provenance(order, key=provenance_key, targets=[url for url, _ in targets], devices=devices)
    tag_query = token_query("_tag", PROVENANCE_TAG_SYSTEM, provenance_key)
    entries.append(conditional_entry(provenance, provenance_key, tag_query))
    bundle["identifier"] = {"system": IDENTIFIER_SYSTEM, "value": provenance_key}
    bundle["entry"] = entries
    check_writeback_bundle(bundle)
    return bundle


class WritebackSchemaError(ValueError):
    """The write-back Bundle this worker built is not valid FHIR R4, so it was not sent.

    Never the order's fault: a bug in ehr-worker or a model whose labels break an R4 datatype (an
    empty or space-containing code). Permanent: a retry builds the same Bundle. ``errors`` are
    schema paths and keywords, free of values, so they can be logged and dead-lettered.
    """

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        shown = "; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")
        super().__init__(
            f"the write-back Bundle is not valid FHIR R4, nothing was sent: {shown}. "
            "Fix the model's labels (catalog) or report an ehr-worker bug."
        )


def check_writeback_bundle(bundle: dict[str, Any]) -> None:
    """Validate an outgoing Bundle against the FHIR R4 JSON schema (the validator is compiled once,
    ~3 ms per Bundle); raises :class:`WritebackSchemaError`. The server is no check: sekmet, like
    several production servers, stores invalid codes."""
    errors = r4_schema_errors(bundle)
    if errors:
        raise WritebackSchemaError(errors)


def _device_entry(output: ModelOutput) -> dict[str, Any]:
    value = device_identifier_value(output.model, output.model_version)
    device: dict[str, Any] = {
        "resourceType": "Device",
        "meta": aiast_meta(),
        "identifier": [{"system": DEVICE_IDENTIFIER_SYSTEM, "value": value}],
        "status": "active",
        "deviceName": [{"name": output.model, "type": "model-name"}],
        "type": {"text": "AI model"},
        "version": [{"value": output.model_version}],
    }
    if output.model_card_url:
        device["note"] = [{"text": f"Model card: {output.model_card_url}"}]
    return {
        "fullUrl": full_url("Device", value),
        "resource": device,
        "request": {
            "method": "POST",
            "url": "Device",
            "ifNoneExist": token_query("identifier", DEVICE_IDENTIFIER_SYSTEM, value),
        },
    }


def _task(
    output: ModelOutput, order: OrderContext, *, key: str, priority: str | None, device_url: str
) -> dict[str, Any]:
    ranked = list(output.predictions)
    if not output.abstained and not ranked:
        raise ValueError(f"{output.model} did not abstain but returned no prediction")
    inputs: list[dict[str, Any]] = []
    if not output.abstained:
        suggested, ranked = ranked[0], ranked[1:]
        inputs += [
            _concept_input("suggested-protocol", suggested),
            _decimal_input("suggested-protocol-probability", suggested),
        ]
    else:
        ranked = ranked[:ABSTAINED_ALTERNATIVES]
    for alternative in ranked:  # pairs in rank order: each probability follows its protocol
        inputs += [
            _concept_input("alternative-protocol", alternative),
            _decimal_input("alternative-protocol-probability", alternative),
        ]
    notes = [{"text": model_note(output)}]
    if output.alternative is not None:
        # flagged, never substituted: protocoling performs the exam that was ordered
        inputs += [
            _concept_input("indication-suggests-other-exam", output.alternative),
            _decimal_input("indication-suggests-other-exam-probability", output.alternative),
        ]
        notes.append({"text": _other_exam_note(output.alternative)})
    status_code = "no-confident-suggestion" if output.abstained else "protocol-suggested"
    task = {
        "resourceType": "Task",
        "meta": aiast_meta(),
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": key}],
        "status": "requested",
        "businessStatus": suggestion_concept(status_code),
        "intent": "proposal",
        "priority": priority,
        "code": suggestion_concept("protocol-order"),
        "description": "AI-suggested imaging protocol for this order; a clinician accepts or overrides it.",
        "focus": {"reference": order.order_ref},
        "for": order.subject,
        "encounter": order.encounter,
        "authoredOn": order.when,
        "lastModified": order.when,
        "requester": {"reference": device_url},
        "note": notes,
        "input": inputs or None,
    }
    return {k: v for k, v in task.items() if v is not None}


def _provenance(
    order: OrderContext, *, key: str, targets: list[str], devices: dict[str, str]
) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "meta": aiast_meta(tag=[{"system": PROVENANCE_TAG_SYSTEM, "code": key}]),
        "target": [{"reference": url} for url in targets],
        "recorded": order.when,
        "activity": {
            "coding": [{"system": f"{HL7_CS}/v3-DataOperation", "code": "CREATE", "display": "create"}]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": f"{HL7_CS}/provenance-participant-type",
                            "code": "author",
                            "display": "Author",
                        }
                    ]
                },
                "who": {"reference": url, "display": label},
            }
            for url, label in devices.items()
        ],
        "entity": [{"role": "source", "what": {"reference": order.order_ref}}],
    }


def suggestion_codesystem() -> dict[str, Any]:
    """The CodeSystem of SUGGESTION_SYSTEM (Task code, businessStatus and input types), to publish."""
    return {
        "resourceType": "CodeSystem",
        "id": "ehr-worker-suggestion",
        "url": SUGGESTION_SYSTEM,
        "version": "1.0.0",
        "name": "EhrWorkerSuggestion",
        "title": "ehr-worker suggestion workflow codes",
        "status": "active",
        "experimental": False,
        "publisher": "ehr-worker",
        "description": "Codes ehr-worker uses in the Tasks and RiskAssessments it writes.",
        "caseSensitive": True,
        "content": "complete",
        "count": len(SUGGESTION_CODES),
        "concept": [{"code": code, "display": display} for code, display in SUGGESTION_CODES.items()],
    }


# --------------------------------------------------------------------------- small helpers


def _input_type(type_code: str) -> dict[str, Any]:
    # text is the code itself, so consumers can match input types without reading codings
    return {"coding": [suggestion_coding(type_code)], "text": type_code}


def _concept_input(type_code: str, prediction: Prediction) -> dict[str, Any]:
    return {"type": _input_type(type_code), "valueCodeableConcept": prediction_concept(prediction)}


def _decimal_input(type_code: str, prediction: Prediction) -> dict[str, Any]:
    return {"type": _input_type(type_code), "valueDecimal": rounded_probability(prediction)}


def _other_exam_note(alternative: Prediction) -> str:
    return (
        f"Flag for the radiologist: the indication may call for another exam than the one ordered "
        f"({alternative.display}, probability {rounded_probability(alternative):g} when not restricted to the ordered exam). "
        "The suggestions above protocol the ordered exam."
    )


def _patient_reference(subject: Any) -> dict[str, Any] | None:
    """The order's subject without its display: the patient's name need not be copied around."""
    if not isinstance(subject, dict):
        return None
    kept = {k: subject[k] for k in ("reference", "type", "identifier") if subject.get(k)}
    return kept if ("reference" in kept or "identifier" in kept) else None


def _plain_reference(reference: Any) -> dict[str, Any] | None:
    if isinstance(reference, dict) and isinstance(reference.get("reference"), str):
        return {"reference": reference["reference"]}
    return None


def _instant(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
