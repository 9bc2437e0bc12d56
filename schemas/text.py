"""ServiceRequest (+ fetched context) -> model-input text.

:func:`build_model_input` is THE preprocessing function: training and inference both call it, so
any change here changes what every model sees (retrain after changing it). The text is labelled
segments joined by `` | `` in a fixed order, most informative first, because the tokenizer cuts
the tail (the models read ~128 tokens)::

    order: CT abdomen | site: abdomen | detail: with IV contrast | reason: RLQ pain r/o appendicitis
    | note: ... | instructions: ... | category: Imaging | context: condition: ...; observation: ...

It is deterministic (same input, same string), whitespace-normalised, and each segment is capped
so that a huge attached document cannot crowd out the order or cost tokenizer time.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from schemas.catalog import LOINC_SYSTEM
from schemas.fhirjson import clean_text, code_in, codings, first_code, objects
from schemas.imaging import SNOMED_SYSTEM, is_imaging_order, names_imaging_modality
from schemas.references import parse_relative_reference

__all__ = [
    "build_model_input",
    "clinical_text",
    "context_references",
    "is_imaging_order",
    "names_imaging_modality",
    "phenotype_text",
    "service_request_from_text",
]

SEPARATOR = " | "
FIELD_MAX_CHARS = 400  # one segment (e.g. all reasons together)...
_SEGMENT_MAX_CHARS = {"note": 800, "context": 1000}  # ...except the narrative ones
CONTEXT_ITEM_MAX_CHARS = 300  # one context resource
MAX_CONTEXT_REFERENCES = 20  # fetched per order: each is a FHIR round trip
MAX_INPUT_CHARS = 2000  # the whole text: well past 128 tokens, so the tokenizer's cut is what binds
_ATTACHMENT_MAX_B64 = 8000  # decode at most ~6 kB of an attachment (a multiple of 4)
# Work per event is bounded whatever its size (a 1 MB order must cost milliseconds, not minutes):
# a join stops once it is longer than any segment may be, looks at most _MAX_VALUES values, and a
# string is cleaned up to _RAW_TEXT_MAX_CHARS. Below these bounds the text is exactly what the
# unbounded rules give, so training and inference agree on every real order.
_JOIN_BUDGET_CHARS = MAX_INPUT_CHARS + 1
_MAX_VALUES = 256
_RAW_TEXT_MAX_CHARS = 8 * MAX_INPUT_CHARS

# Context resource types that build_model_input renders (so worth fetching).
CONTEXT_RESOURCE_TYPES = frozenset(
    {
        "Condition",
        "Observation",
        "DocumentReference",
        "Binary",
        "AllergyIntolerance",
        "DiagnosticReport",
        "Procedure",
    }
)

# SNOMED display semantic tags add nothing for the model ("Biopsy of colon (procedure)").
_SEMANTIC_TAG = re.compile(
    r"\s*\((?:procedure|regime/therapy|finding|disorder|observable entity|situation|qualifier value|"
    r"body structure|morphologic abnormality|substance|product|clinical drug|event)\)\s*$",
    re.IGNORECASE,
)
_SYSTEM_NAMES = {LOINC_SYSTEM: "loinc", SNOMED_SYSTEM: "snomed", "http://www.ama-assn.org/go/cpt": "cpt"}

# --------------------------------------------------------------------------- public API


def build_model_input(service_request: dict[str, Any], context: Sequence[dict[str, Any]] = ()) -> str:
    """The model-input text for an order and the context resources fetched for it."""
    order = _order_segments(service_request)
    return _join(order + _clinical_segments(service_request, context, with_extras=True))


def clinical_text(service_request: dict[str, Any], context: Sequence[dict[str, Any]] = ()) -> str:
    """The free-text part only (reason, notes, context) in the same format, or ``""`` when there is
    none: the diagnosis model runs only when this is non-empty."""
    return _join(_clinical_segments(service_request, context, with_extras=False))


PHENOTYPE_TEXT_MAX_CHARS = 20000


def phenotype_text(service_request: dict[str, Any], context: Sequence[dict[str, Any]] = ()) -> str:
    """The clinical free text in full (reasons, notes, context resources) for phenotype recognition
    (models.diagnosis). Unlike :func:`build_model_input` no segment is cut at a few hundred characters:
    a case description's findings run through all of it. Parts are joined by `` | `` (a sentence end
    for concept recognition, so no negation scope crosses from one part into the next)."""
    reasons = [_concept_text(c) for c in objects(service_request.get("reasonCode"))]
    reasons += [clean_text(r.get("display")) for r in objects(service_request.get("reasonReference"))]
    notes = [clean_text(n.get("text")) for n in objects(service_request.get("note"))]
    rendered = [_render_context(r) for r in _context_resources(service_request, context)]
    parts = [p for p in reasons + notes + rendered if p]
    return SEPARATOR.join(dict.fromkeys(parts))[:PHENOTYPE_TEXT_MAX_CHARS]


def context_references(service_request: dict[str, Any]) -> list[str]:
    """References worth fetching for enrichment: reasonReference and supportingInfo that name a
    resource type :func:`build_model_input` renders, in order, without duplicates.

    Only relative references (``Condition/1``) are returned: the worker must not send its FHIR
    credentials to whatever host an absolute URL in an order names. Contained (``#x``) resources
    are already in the order and are rendered from there.
    """
    references: dict[str, None] = {}  # ordered and O(1) membership
    sr = service_request
    for ref in objects(sr.get("reasonReference")) + objects(sr.get("supportingInfo")):
        parsed = parse_relative_reference(ref.get("reference"))
        if parsed and parsed.resource_type in CONTEXT_RESOURCE_TYPES:
            references[parsed.relative] = None  # the reference as written: nothing before or after it
            if len(references) == MAX_CONTEXT_REFERENCES:
                break
    return list(references)


def service_request_from_text(order_id: str, text: str, *, field: str = "code") -> dict[str, Any]:
    """A minimal ServiceRequest carrying free text, so that plain-text inputs (``predict`` JSONL,
    labelled text datasets) go through :func:`build_model_input` like real orders. ``field``:
    ``"code"`` puts the text in ``code.text`` (order text), ``"note"`` in ``note[0].text``
    (clinical narrative). For model input only: it names no patient, so it is no valid order."""
    sr: dict[str, Any] = {"resourceType": "ServiceRequest", "id": order_id, "status": "active"}
    sr["intent"] = "order"
    if field == "code":
        sr["code"] = {"text": text}
    elif field == "note":
        sr["note"] = [{"text": text}]
    else:
        raise ValueError(f"field must be 'code' or 'note', not {field!r}")
    return sr


# --------------------------------------------------------------------------- segments


def _order_segments(sr: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("order", _concept_text(sr.get("code"), fallback_to_codes=True)),
        ("site", _concepts_text(sr.get("bodySite"))),
        ("detail", _concepts_text(sr.get("orderDetail"))),
    ]


def _clinical_segments(
    sr: dict[str, Any], context: Sequence[dict[str, Any]], *, with_extras: bool
) -> list[tuple[str, str]]:
    reasons = itertools.chain(
        (_concept_text(c) for c in objects(sr.get("reasonCode"))),
        (_clean(r.get("display")) for r in objects(sr.get("reasonReference"))),
    )
    notes = (_clean(n.get("text")) for n in objects(sr.get("note")))
    segments = [("reason", _unique_join(reasons)), ("note", _unique_join(notes, sep=" "))]
    if with_extras:
        segments += [
            ("instructions", _clean(sr.get("patientInstruction"))),
            ("category", _concepts_text(sr.get("category"))),
        ]
    rendered = (_render_context(r) for r in _context_resources(sr, context))
    segments.append(("context", _unique_join(_truncate(r, CONTEXT_ITEM_MAX_CHARS) for r in rendered)))
    return segments


def _join(segments: Iterable[tuple[str, str]]) -> str:
    text = SEPARATOR.join(
        f"{label}: {_truncate(value, _SEGMENT_MAX_CHARS.get(label, FIELD_MAX_CHARS))}"
        for label, value in segments
        if value
    )
    return _truncate(text, MAX_INPUT_CHARS)


def _context_resources(sr: dict[str, Any], context: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Contained resources the order points at (``#id``), then the fetched context (Bundles
    flattened), each resource once."""
    contained = {c["id"]: c for c in objects(sr.get("contained")) if isinstance(c.get("id"), str)}
    refs = objects(sr.get("reasonReference")) + objects(sr.get("supportingInfo"))
    pointers = [r.get("reference") for r in refs]
    local = [contained[p[1:]] for p in pointers if isinstance(p, str) and p[:1] == "#" and p[1:] in contained]
    seen: set[tuple[Any, Any]] = set()
    for resource in local + list(_flatten(context)):
        key = (str(resource.get("resourceType")), resource.get("id"))
        if isinstance(key[1], str):
            if key in seen:
                continue
            seen.add(key)
        yield resource


def _flatten(resources: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for resource in resources:
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "Bundle":
            yield from _flatten(e.get("resource") for e in objects(resource.get("entry")))
        else:
            yield resource


# --------------------------------------------------------------------------- context rendering

_VOID_STATUSES = frozenset({"entered-in-error", "cancelled", "not-done", "refuted"})
_PAST_CLINICAL_STATUSES = frozenset({"inactive", "resolved", "remission"})


def _render_context(resource: dict[str, Any]) -> str:
    kind = resource.get("resourceType")
    verification = first_code(resource.get("verificationStatus"))
    if code_in(resource.get("status"), _VOID_STATUSES) or code_in(verification, _VOID_STATUSES):
        return ""
    if kind == "Condition":
        name = _concept_text(resource.get("code"))
        past = code_in(first_code(resource.get("clinicalStatus")), _PAST_CLINICAL_STATUSES)
        return f"{'past condition' if past else 'condition'}: {name}" if name else ""
    if kind == "AllergyIntolerance":
        name = _concept_text(resource.get("code"))
        return f"allergy: {name}" if name else ""
    if kind == "Procedure":
        name = _concept_text(resource.get("code"))
        return f"procedure: {name}" if name else ""
    if kind == "Observation":
        return _render_observation(resource)
    if kind == "DiagnosticReport":
        name = _concept_text(resource.get("code"))
        conclusion = _clean(resource.get("conclusion"))
        body = f"{name}: {conclusion}" if name and conclusion else name or conclusion
        return f"report: {body}" if body else ""
    if kind == "DocumentReference":
        texts = (_attachment_text(c.get("attachment")) for c in objects(resource.get("content")))
        body = _unique_join(texts, sep=" ") or _clean(resource.get("description"))
        return f"document: {body}" if body else ""
    if kind == "Binary":
        body = _attachment_text(resource)
        return f"document: {body}" if body else ""
    return ""


def _render_observation(obs: dict[str, Any]) -> str:
    name = _concept_text(obs.get("code"))
    value = _observation_value(obs)
    if not value:
        components = objects(obs.get("component"))
        parts = (f"{_concept_text(c.get('code'))} {_observation_value(c)}".strip() for c in components)
        value = "; ".join(p for p in itertools.islice(parts, 3) if p)
    interpretation = _concepts_text(obs.get("interpretation"))
    text = f"{name}: {value}" if name and value else name or value
    if text and interpretation:
        text += f" ({interpretation})"
    return f"observation: {text}" if text else ""


def _observation_value(obs: dict[str, Any]) -> str:
    if isinstance(obs.get("valueQuantity"), dict):
        quantity = obs["valueQuantity"]
        unit = quantity.get("unit") or quantity.get("code") or ""
        return f"{quantity.get('comparator', '')}{_number(quantity.get('value'))} {_clean(unit)}".strip()
    if "valueCodeableConcept" in obs:
        return _concept_text(obs["valueCodeableConcept"])
    if "valueString" in obs:
        return _clean(obs["valueString"])
    if isinstance(obs.get("valueBoolean"), bool):
        return "yes" if obs["valueBoolean"] else "no"
    if "valueInteger" in obs:
        return _number(obs["valueInteger"])
    if isinstance(obs.get("valueRange"), dict):
        low, high = obs["valueRange"].get("low") or {}, obs["valueRange"].get("high") or {}
        unit = _clean(high.get("unit") or low.get("unit"))
        return f"{_number(low.get('value'))}-{_number(high.get('value'))} {unit}".strip(" -")
    return ""


def _attachment_text(attachment: Any) -> str:
    """Plain text of an inline attachment (DocumentReference.content.attachment or Binary);
    other content types (PDF, images, HTML) and URL-only attachments give ``""``."""
    if not isinstance(attachment, dict) or not isinstance(attachment.get("data"), str):
        return ""
    content_type = attachment.get("contentType") or "text/plain"
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() not in ("text/plain", "text/markdown"):
        return ""
    charset = "utf-8"
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    try:
        payload = base64.b64decode(attachment["data"][:_ATTACHMENT_MAX_B64], validate=False)
        # "ignore": the cut may split a multi-byte character at the end
        return _clean(payload.decode(charset, errors="ignore"))
    except (binascii.Error, LookupError, ValueError):
        return ""


# --------------------------------------------------------------------------- small helpers


def _display(coding: dict[str, Any]) -> str:
    return _SEMANTIC_TAG.sub("", _clean(coding.get("display")))


def _concept_text(concept: Any, *, fallback_to_codes: bool = False) -> str:
    """``text``, else the codings' displays; for the order code, else ``"loinc 24627-2"``-style codes."""
    if not isinstance(concept, dict):
        return ""
    text = _clean(concept.get("text"))
    if text:
        return text
    displays = _unique_join(_display(c) for c in codings(concept))
    if displays or not fallback_to_codes:
        return displays
    codes = (
        f"{_SYSTEM_NAMES.get(str(c.get('system')), 'code')} {_clean(c.get('code'))}"
        for c in codings(concept)
        if _clean(c.get("code"))
    )
    return _unique_join(codes)


def _concepts_text(concepts: Any) -> str:
    return _unique_join(_concept_text(c) for c in objects(concepts))


def _unique_join(values: Iterable[str], sep: str = "; ") -> str:
    """Non-empty values, each once (case-insensitively), in order; linear, and bounded by
    _MAX_VALUES values and _JOIN_BUDGET_CHARS characters (values are produced lazily)."""
    out: list[str] = []
    seen: set[str] = set()
    length = 0
    for value in itertools.islice(values, _MAX_VALUES):
        if not value:
            continue
        key = value.casefold()
        if key in seen:
            continue
        seen.add(key)
        out.append(value)
        length += len(value) + len(sep)
        if length > _JOIN_BUDGET_CHARS:
            break
    return sep.join(out)


def _clean(text: Any) -> str:
    """:func:`clean_text` of at most the first _RAW_TEXT_MAX_CHARS characters."""
    return clean_text(text[:_RAW_TEXT_MAX_CHARS] if isinstance(text, str) else text)


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip() + "..."


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)
