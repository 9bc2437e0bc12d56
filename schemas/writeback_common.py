"""What the write-back's resources share: the project's code and naming systems, the idempotency
keys (one per order version and model), conditional-create entries, the AIAST security label and
the small codings every suggestion resource uses. :mod:`schemas.writeback` builds the Bundle."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from schemas.labels import ModelOutput, Prediction
from schemas.references import ID_RE

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

HL7_CS = "http://terminology.hl7.org/CodeSystem"
KEY_VERSION = "ehrw-suggestion-v1"  # part of every key: bump only to deliberately re-suggest everything
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://ehr-worker.dev/fhir/writeback")
_PROBABILITY_DIGITS = 4  # calibrated probabilities carry no more meaning than this


@dataclass(frozen=True)
class OrderContext:
    """What every suggestion resource of one order names: the order (the version the models read),
    its patient and encounter (references only), and when the suggestion was recorded."""

    order_ref: str
    subject: dict[str, Any]
    encounter: dict[str, Any] | None
    when: str


# --------------------------------------------------------------------------- keys


def suggestion_identifier(service_request: dict[str, Any], model: str, model_version: str) -> str:
    """The idempotency key of a suggestion: a hash of (order id, order version, model, model
    version). The order version is ``meta.versionId``, or a hash of the order's canonical JSON
    (``meta`` excluded) when the server gives none, so an edited order gets a new suggestion."""
    order_id, order_version = order_id_of(service_request), _order_version(service_request)
    return key_hash(KEY_VERSION, "ServiceRequest", order_id, order_version, model, model_version)

def order_idempotency_key(service_request: dict[str, Any]) -> str:
    """The key of one version of an order (id + ``meta.versionId``, or a content hash without
    one): replays of the same order version share it, an edited order gets a new one."""
    return key_hash(KEY_VERSION, "ServiceRequest", order_id_of(service_request), _order_version(service_request))

def _order_version(service_request: dict[str, Any]) -> str:
    version = (service_request.get("meta") or {}).get("versionId")
    if isinstance(version, str) and ID_RE.fullmatch(version):
        return f"v:{version}"
    content = {k: v for k, v in service_request.items() if k != "meta"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()

def key_hash(*parts: str) -> str:
    # Unit separator between parts: no concatenation of different parts can collide.
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:32]

def full_url(resource_type: str, key: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, f'{resource_type}|{key}')}"

def device_identifier_value(model: str, model_version: str) -> str:
    """``{model}@{version}``: no ``|`` (the token search separator) between the two."""
    return f"{model}@{model_version}"

def token_query(param: str, system: str, value: str) -> str:
    """``param=system|value`` for ifNoneExist: FHIR search escapes for ``\\ | $ ,`` in the value,
    then URL-encoding of anything else that is not plain (``+``, ``&``, space...). Hex keys and
    ordinary model names pass unchanged."""
    escaped = value.replace("\\", "\\\\").replace("|", "\\|").replace("$", "\\$").replace(",", "\\,")
    return f"{param}={system}|{quote(escaped, safe='-._~:@/')}"


# --------------------------------------------------------------------------- entries and codings


def conditional_entry(resource: dict[str, Any], key: str, if_none_exist: str) -> dict[str, Any]:
    resource_type = resource["resourceType"]
    return {
        "fullUrl": full_url(resource_type, key),
        "resource": resource,
        "request": {"method": "POST", "url": resource_type, "ifNoneExist": if_none_exist},
    }

def aiast_meta(**extra: Any) -> dict[str, Any]:
    return {"security": [dict(AIAST)], **extra}

def suggestion_coding(code: str) -> dict[str, str]:
    return {"system": SUGGESTION_SYSTEM, "code": code, "display": SUGGESTION_CODES[code]}

def suggestion_concept(code: str) -> dict[str, Any]:
    return {"coding": [suggestion_coding(code)], "text": SUGGESTION_CODES[code]}

def prediction_concept(prediction: Prediction) -> dict[str, Any]:
    coding = {"system": prediction.system, "code": prediction.code, "display": prediction.display}
    return {"coding": [coding], "text": prediction.display}

def rounded_probability(prediction: Prediction) -> float:
    return round(prediction.probability, _PROBABILITY_DIGITS)

def model_note(output: ModelOutput) -> str:
    verdict = "abstained (no label reached" if output.abstained else "suggestion (top label reached"
    return (
        f"AI-generated by {output.model} {output.model_version}: {verdict} the calibrated probability "
        f"threshold {output.threshold:g}). Not verified by a clinician."
    )

def order_id_of(service_request: dict[str, Any]) -> str:
    order_id = service_request.get("id")
    if not isinstance(order_id, str) or not ID_RE.fullmatch(order_id):
        raise ValueError("the ServiceRequest has no valid id")
    return order_id
