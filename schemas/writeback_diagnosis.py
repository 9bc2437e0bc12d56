"""The diagnosis model's part of the write-back: a ``RiskAssessment`` ranking rare diseases (each
with its codings and the coded features for and against it) and one ``Observation`` per recognised
HPO phenotype (Phenopackets on FHIR), which the RiskAssessment names as its basis."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas.labels import ModelOutput, Prediction
from schemas.writeback_common import (
    HL7_CS,
    IDENTIFIER_SYSTEM,
    KEY_VERSION,
    MODEL_SYSTEM,
    PROVENANCE_TAG_SYSTEM,
    OrderContext,
    aiast_meta,
    key_hash,
    model_note,
    prediction_concept,
    rounded_probability,
    suggestion_concept,
)

HPO_SYSTEM = "http://human-phenotype-ontology.org"
_INTERPRETATION_SYSTEM = f"{HL7_CS}/v3-ObservationInterpretation"
# Phenopackets on FHIR: a phenotypic feature is an Observation coded with the HPO term; an excluded
# feature has interpretation NEG (and value false), an observed one POS (value true).
PHENOTYPE_INTERPRETATION = {"present": ("POS", "Positive", True), "excluded": ("NEG", "Negative", False)}


def risk_assessment(
    output: ModelOutput, order: OrderContext, *, key: str, device_url: str, basis: Sequence[str] = ()
) -> dict[str, Any]:
    """The ranked rare-disease differential; ``basis``: the fullUrls of the phenotype Observations."""
    risk = {
        "resourceType": "RiskAssessment",
        "meta": aiast_meta(tag=[{"system": PROVENANCE_TAG_SYSTEM, "code": key}]),
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
        "code": suggestion_concept("rare-disease-differential"),
        "subject": order.subject,
        "encounter": order.encounter,
        "occurrenceDateTime": order.when,
        "performer": {"reference": device_url},
        "basis": [{"reference": order.order_ref}] + [{"reference": url} for url in basis],
        "prediction": [_risk_prediction(p) for p in output.predictions],
        "note": [{"text": model_note(output)}],
    }
    return {k: v for k, v in risk.items() if v is not None}

def _risk_prediction(p: Prediction) -> dict[str, Any]:
    outcome = prediction_concept(p)
    outcome["coding"] += [{"system": s, "code": c, "display": d} for s, c, d in p.codings]
    out: dict[str, Any] = {"outcome": outcome, "probabilityDecimal": rounded_probability(p)}
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


def phenotype_observation(phenotype: dict[str, str], order: OrderContext, *, key: str, device_url: str) -> dict[str, Any]:
    """One recognised HPO feature, present (POS) or excluded (NEG), keyed under the suggestion ``key``."""
    code, label, status = str(phenotype["code"]), str(phenotype.get("label", "")), phenotype["status"]
    interp, interp_display, value = PHENOTYPE_INTERPRETATION[status]
    obs_key = key_hash(KEY_VERSION, "Observation", key, code, status)
    obs = {
        "resourceType": "Observation",
        "meta": aiast_meta(),
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": obs_key}],
        "basedOn": [{"reference": order.order_ref}],
        "status": "preliminary",
        "category": [{"coding": [{"system": f"{HL7_CS}/observation-category", "code": "exam", "display": "Exam"}]}],
        "code": {"coding": [{"system": HPO_SYSTEM, "code": code, "display": label}], "text": label},
        "subject": order.subject,
        "encounter": order.encounter,
        "issued": order.when,
        "device": {"reference": device_url},
        "valueBoolean": value,
        "interpretation": [{"coding": [{"system": _INTERPRETATION_SYSTEM, "code": interp, "display": interp_display}]}],
        "method": {"text": "AI concept recognition from the order's clinical text"},
    }
    return {k: v for k, v in obs.items() if v is not None}
