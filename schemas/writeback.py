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

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from schemas.labels import ModelOutput, Prediction
from schemas.references import ID_RE, order_reference
from schemas.validation import r4_schema_errors

IDENTIFIER_SYSTEM = "https://ehr-worker.dev/fhir/NamingSystem/suggestion-key"
# meta.tag system carrying the idempotency key where ifNoneExist searches _tag (Provenance,
# RiskAssessment).
PROVENANCE_TAG_SYSTEM = "https://ehr-worker.dev/fhir/CodeSystem/suggestion-key"
DEVICE_IDENTIFIER_SYSTEM = "https://ehr-worker.dev/fhir/NamingSystem/model"
# Project codes for workflow concepts (Task code, businessStatus, input types).
SUGGESTION_SYSTEM = "https://ehr-worker.dev/fhir/CodeSystem/suggestion"
MODEL_SYSTEM = "https://ehr-worker.dev/fhir/CodeSystem/model"

AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "artificial intelligence asserted",
}
PROTOCOL_SUGGESTED = "Protocol suggested"
NO_CONFIDENT_PROTOCOL = "No confident protocol suggestion; ranked alternatives attached"

# Display texts of the SUGGESTION_SYSTEM codes; suggestion_codesystem() publishes them.
SUGGESTION_CODES = {
    "protocol-order": "Protocol the imaging order",
    "protocol-suggested": PROTOCOL_SUGGESTED,
    "no-confident-suggestion": NO_CONFIDENT_PROTOCOL,
    "suggested-protocol": "Suggested protocol",
    "suggested-protocol-probability": "Calibrated probability of the suggested protocol",
    "alternative-protocol": "Alternative protocol",
    "alternative-protocol-probability": "Calibrated probability of the alternative protocol above",
    "rare-disease-differential": "Rare disease differential diagnosis",
    "indication-suggests-other-exam": "Protocol of another exam than the one ordered that the indication may call for",
    "indication-suggests-other-exam-probability": "Calibrated probability of that protocol, unrestricted by the order",
}
# Below the threshold the Task lists this many ranked protocols for the radiologist to choose from.
ABSTAINED_ALTERNATIVES = 3

_HL7_CS = "http://terminology.hl7.org/CodeSystem"
_KEY_VERSION = "ehrw-suggestion-v1"  # part of every key: bump only to deliberately re-suggest everything
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://ehr-worker.dev/fhir/writeback")
_PROBABILITY_DIGITS = 4  # calibrated probabilities carry no more meaning than this
_PRIORITIES = frozenset({"routine", "urgent", "asap", "stat"})


# --------------------------------------------------------------------------- keys


def suggestion_identifier(service_request: dict[str, Any], model: str, model_version: str) -> str:
    """The idempotency key of a suggestion: a hash of (order id, order version, model, model
    version). The order version is ``meta.versionId``, or a hash of the order's canonical JSON
    (``meta`` excluded) when the server gives none, so an edited order gets a new suggestion."""
    order_id, order_version = _order_id(service_request), _order_version(service_request)
    return _hash(_KEY_VERSION, "ServiceRequest", order_id, order_version, model, model_version)


def order_idempotency_key(service_request: dict[str, Any]) -> str:
    """The key of one version of an order (id + ``meta.versionId``, or a content hash without
    one): replays of the same order version share it, an edited order gets a new one."""
    return _hash(_KEY_VERSION, "ServiceRequest", _order_id(service_request), _order_version(service_request))


def _order_version(service_request: dict[str, Any]) -> str:
    version = (service_request.get("meta") or {}).get("versionId")
    if isinstance(version, str) and ID_RE.fullmatch(version):
        return f"v:{version}"
    content = {k: v for k, v in service_request.items() if k != "meta"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _hash(*parts: str) -> str:
    # Unit separator between parts: no concatenation of different parts can collide.
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:32]


def _full_url(resource_type: str, key: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, f'{resource_type}|{key}')}"


def device_identifier_value(model: str, model_version: str) -> str:
    """``{model}@{version}``: no ``|`` (the token search separator) between the two."""
    return f"{model}@{model_version}"


def _token_query(param: str, system: str, value: str) -> str:
    """``param=system|value`` for ifNoneExist: FHIR search escapes for ``\\ | $ ,`` in the value,
    then URL-encoding of anything else that is not plain (``+``, ``&``, space...). Hex keys and
    ordinary model names pass unchanged."""
    escaped = value.replace("\\", "\\\\").replace("|", "\\|").replace("$", "\\$").replace(",", "\\,")
    return f"{param}={system}|{quote(escaped, safe='-._~:@/')}"


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
    order_id = _order_id(service_request)
    subject = _patient_reference(service_request.get("subject"))
    if subject is None:
        raise ValueError(f"ServiceRequest {order_id} has no subject reference or identifier")
    when = _instant(recorded or datetime.now(timezone.utc))
    order_ref = order_reference(service_request)
    encounter = _plain_reference(service_request.get("encounter"))

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
            key=key,
            order_ref=order_ref,
            subject=subject,
            encounter=encounter,
            priority=priority if isinstance(priority, str) and priority in _PRIORITIES else None,
            device_url=device_url,
            when=when,
        )
        entries.append(_entry(task, key, _token_query("identifier", IDENTIFIER_SYSTEM, key)))
        targets.append((entries[-1]["fullUrl"], key))

    if diagnosis is not None and not diagnosis.abstained and diagnosis.predictions:
        device_url = add_device(diagnosis)
        key = suggestion_identifier(service_request, diagnosis.model, diagnosis.model_version)
        observations = [
            _phenotype_observation(ph, key=key, order_ref=order_ref, subject=subject, encounter=encounter,
                                   device_url=device_url, when=when)
            for ph in diagnosis.phenotypes
            if ph.get("status") in _PHENOTYPE_INTERPRETATION and str(ph.get("code", "")).startswith("HP:")
        ]
        for obs in observations:
            obs_key = obs["identifier"][0]["value"]
            entries.append(_entry(obs, obs_key, _token_query("identifier", IDENTIFIER_SYSTEM, obs_key)))
            targets.append((entries[-1]["fullUrl"], obs_key))
        risk = _risk_assessment(
            diagnosis,
            key=key,
            order_ref=order_ref,
            subject=subject,
            encounter=encounter,
            device_url=device_url,
            when=when,
            basis=[_full_url("Observation", o["identifier"][0]["value"]) for o in observations],
        )
        # R4 defines RiskAssessment?identifier, but servers do not all index it (sekmet does not);
        # _tag is a base parameter every server indexes, so the key rides in meta.tag as well.
        entries.append(_entry(risk, key, _token_query("_tag", PROVENANCE_TAG_SYSTEM, key)))
        targets.append((entries[-1]["fullUrl"], key))

    bundle: dict[str, Any] = {"resourceType": "Bundle", "meta": _meta(), "type": "transaction"}
    if not targets:
        return bundle

    provenance_key = _hash(_KEY_VERSION, "Provenance", *sorted(key for _, key in targets))
    provenance = _provenance(
        key=provenance_key,
        targets=[url for url, _ in targets],
        order_ref=order_ref,
        devices=devices,
        when=when,
    )
    tag_query = _token_query("_tag", PROVENANCE_TAG_SYSTEM, provenance_key)
    entries.append(_entry(provenance, provenance_key, tag_query))
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


def _entry(resource: dict[str, Any], key: str, if_none_exist: str) -> dict[str, Any]:
    resource_type = resource["resourceType"]
    return {
        "fullUrl": _full_url(resource_type, key),
        "resource": resource,
        "request": {"method": "POST", "url": resource_type, "ifNoneExist": if_none_exist},
    }


def _meta(**extra: Any) -> dict[str, Any]:
    return {"security": [dict(AIAST)], **extra}


def _device_entry(output: ModelOutput) -> dict[str, Any]:
    value = device_identifier_value(output.model, output.model_version)
    device: dict[str, Any] = {
        "resourceType": "Device",
        "meta": _meta(),
        "identifier": [{"system": DEVICE_IDENTIFIER_SYSTEM, "value": value}],
        "status": "active",
        "deviceName": [{"name": output.model, "type": "model-name"}],
        "type": {"text": "AI model"},
        "version": [{"value": output.model_version}],
    }
    if output.model_card_url:
        device["note"] = [{"text": f"Model card: {output.model_card_url}"}]
    return {
        "fullUrl": _full_url("Device", value),
        "resource": device,
        "request": {
            "method": "POST",
            "url": "Device",
            "ifNoneExist": _token_query("identifier", DEVICE_IDENTIFIER_SYSTEM, value),
        },
    }


def _task(
    output: ModelOutput,
    *,
    key: str,
    order_ref: str,
    subject: dict[str, Any],
    encounter: dict[str, Any] | None,
    priority: str | None,
    device_url: str,
    when: str,
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
    notes = [{"text": _model_note(output)}]
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
        "meta": _meta(),
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": key}],
        "status": "requested",
        "businessStatus": _suggestion_concept(status_code),
        "intent": "proposal",
        "priority": priority,
        "code": _suggestion_concept("protocol-order"),
        "description": "AI-suggested imaging protocol for this order; a clinician accepts or overrides it.",
        "focus": {"reference": order_ref},
        "for": subject,
        "encounter": encounter,
        "authoredOn": when,
        "lastModified": when,
        "requester": {"reference": device_url},
        "note": notes,
        "input": inputs or None,
    }
    return {k: v for k, v in task.items() if v is not None}


def _risk_assessment(
    output: ModelOutput,
    *,
    key: str,
    order_ref: str,
    subject: dict[str, Any],
    encounter: dict[str, Any] | None,
    device_url: str,
    when: str,
    basis: Sequence[str] = (),
) -> dict[str, Any]:
    risk = {
        "resourceType": "RiskAssessment",
        "meta": _meta(tag=[{"system": PROVENANCE_TAG_SYSTEM, "code": key}]),
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": key}],
        "status": "preliminary",
        "method": {
            "coding": [
                {
                    "system": MODEL_SYSTEM,
                    "version": output.model_version,
                    "code": output.model,
                    "display": output.model,
                }
            ],
            "text": f"{output.model} {output.model_version}",
        },
        "code": _suggestion_concept("rare-disease-differential"),
        "subject": subject,
        "encounter": encounter,
        "occurrenceDateTime": when,
        "performer": {"reference": device_url},
        "basis": [{"reference": order_ref}] + [{"reference": url} for url in basis],
        "prediction": [_risk_prediction(p) for p in output.predictions],
        "note": [{"text": _model_note(output)}],
    }
    return {k: v for k, v in risk.items() if v is not None}


HPO_SYSTEM = "http://human-phenotype-ontology.org"
_INTERPRETATION_SYSTEM = f"{_HL7_CS}/v3-ObservationInterpretation"
# Phenopackets on FHIR: a phenotypic feature is an Observation coded with the HPO term; an excluded
# feature has interpretation NEG (and value false), an observed one POS (value true).
_PHENOTYPE_INTERPRETATION = {"present": ("POS", "Positive", True), "excluded": ("NEG", "Negative", False)}


def _risk_prediction(p: Prediction) -> dict[str, Any]:
    outcome = _prediction_concept(p)
    outcome["coding"] += [{"system": s, "code": c, "display": d} for s, c, d in p.codings]
    out: dict[str, Any] = {"outcome": outcome, "probabilityDecimal": _probability(p)}
    rationale = _rationale(p)
    if rationale:
        out["rationale"] = rationale
    return out


def _rationale(p: Prediction) -> str:
    """The coded features behind a ranked disease: HPO codes and labels only, never note text."""
    parts = []
    if p.supporting:
        parts.append("Supporting features: " + "; ".join(f"{c} {lab}" for c, lab in p.supporting) + ".")
    if p.against:
        parts.append("Absent features that count against it: " + "; ".join(f"{c} {lab}" for c, lab in p.against) + ".")
    return " ".join(parts)


def _phenotype_observation(
    phenotype: dict[str, str],
    *,
    key: str,
    order_ref: str,
    subject: dict[str, Any],
    encounter: dict[str, Any] | None,
    device_url: str,
    when: str,
) -> dict[str, Any]:
    code, label, status = str(phenotype["code"]), str(phenotype.get("label", "")), phenotype["status"]
    interp, interp_display, value = _PHENOTYPE_INTERPRETATION[status]
    obs_key = _hash(_KEY_VERSION, "Observation", key, code, status)
    obs = {
        "resourceType": "Observation",
        "meta": _meta(),
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": obs_key}],
        "basedOn": [{"reference": order_ref}],
        "status": "preliminary",
        "category": [{"coding": [{"system": f"{_HL7_CS}/observation-category", "code": "exam", "display": "Exam"}]}],
        "code": {"coding": [{"system": HPO_SYSTEM, "code": code, "display": label}], "text": label},
        "subject": subject,
        "encounter": encounter,
        "issued": when,
        "device": {"reference": device_url},
        "valueBoolean": value,
        "interpretation": [{"coding": [{"system": _INTERPRETATION_SYSTEM, "code": interp, "display": interp_display}]}],
        "method": {"text": "AI concept recognition from the order's clinical text"},
    }
    return {k: v for k, v in obs.items() if v is not None}


def _provenance(
    *, key: str, targets: list[str], order_ref: str, devices: dict[str, str], when: str
) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "meta": _meta(tag=[{"system": PROVENANCE_TAG_SYSTEM, "code": key}]),
        "target": [{"reference": url} for url in targets],
        "recorded": when,
        "activity": {
            "coding": [{"system": f"{_HL7_CS}/v3-DataOperation", "code": "CREATE", "display": "create"}]
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": f"{_HL7_CS}/provenance-participant-type",
                            "code": "author",
                            "display": "Author",
                        }
                    ]
                },
                "who": {"reference": url, "display": label},
            }
            for url, label in devices.items()
        ],
        "entity": [{"role": "source", "what": {"reference": order_ref}}],
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


def _suggestion_coding(code: str) -> dict[str, str]:
    return {"system": SUGGESTION_SYSTEM, "code": code, "display": SUGGESTION_CODES[code]}


def _suggestion_concept(code: str) -> dict[str, Any]:
    return {"coding": [_suggestion_coding(code)], "text": SUGGESTION_CODES[code]}


def _input_type(type_code: str) -> dict[str, Any]:
    # text is the code itself, so consumers can match input types without reading codings
    return {"coding": [_suggestion_coding(type_code)], "text": type_code}


def _prediction_concept(prediction: Prediction) -> dict[str, Any]:
    coding = {"system": prediction.system, "code": prediction.code, "display": prediction.display}
    return {"coding": [coding], "text": prediction.display}


def _concept_input(type_code: str, prediction: Prediction) -> dict[str, Any]:
    return {"type": _input_type(type_code), "valueCodeableConcept": _prediction_concept(prediction)}


def _decimal_input(type_code: str, prediction: Prediction) -> dict[str, Any]:
    return {"type": _input_type(type_code), "valueDecimal": _probability(prediction)}


def _probability(prediction: Prediction) -> float:
    return round(prediction.probability, _PROBABILITY_DIGITS)


def _model_note(output: ModelOutput) -> str:
    verdict = "abstained (no label reached" if output.abstained else "suggestion (top label reached"
    return (
        f"AI-generated by {output.model} {output.model_version}: {verdict} the calibrated probability "
        f"threshold {output.threshold:g}). Not verified by a clinician."
    )


def _other_exam_note(alternative: Prediction) -> str:
    return (
        f"Flag for the radiologist: the indication may call for another exam than the one ordered "
        f"({alternative.display}, probability {_probability(alternative):g} when not restricted to the ordered exam). "
        "The suggestions above protocol the ordered exam."
    )


def _order_id(service_request: dict[str, Any]) -> str:
    order_id = service_request.get("id")
    if not isinstance(order_id, str) or not ID_RE.fullmatch(order_id):
        raise ValueError("the ServiceRequest has no valid id")
    return order_id


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
