"""FHIR in and out: event parsing and validation, model-input text, suggestions -> FHIR
resources, and the label catalogs. Depends on nothing else in the repository.

Names are imported lazily (PEP 562) so that ``import schemas`` stays cheap: fhir.resources and
jsonschema load only when an event is validated or a resource is checked against the R4 schema.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # catalog
    "PROTOCOL_SYSTEM": "catalog",
    "OMIM_SYSTEM": "catalog",
    "ORPHA_SYSTEM": "catalog",
    "DECIPHER_SYSTEM": "catalog",
    "Protocol": "catalog",
    "PROTOCOLS": "catalog",
    "protocol_by_code": "catalog",
    "protocol_by_display": "catalog",
    "protocol_codesystem": "catalog",
    "disease_coding": "catalog",
    "disease_database_id": "catalog",
    # labels
    "Label": "labels",
    "Prediction": "labels",
    "ModelOutput": "labels",
    # events
    "EventRejected": "events",
    "OrderItem": "events",
    "ParsedEvent": "events",
    "parse_event": "events",
    "validate_service_request": "events",
    "skip_reason": "events",
    # text
    "build_model_input": "text",
    "clinical_text": "text",
    "is_imaging_order": "text",
    "context_references": "text",
    "service_request_from_text": "text",
    # writeback
    "build_writeback_bundle": "writeback",
    "suggestion_identifier": "writeback",
    "IDENTIFIER_SYSTEM": "writeback",
    "PROVENANCE_TAG_SYSTEM": "writeback",
    "DEVICE_IDENTIFIER_SYSTEM": "writeback",
    # references
    "order_reference": "references",
    "parse_reference": "references",
    # validation
    "r4_schema_errors": "validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    value = getattr(import_module(f"schemas.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from schemas.catalog import (
        DECIPHER_SYSTEM,
        OMIM_SYSTEM,
        ORPHA_SYSTEM,
        PROTOCOL_SYSTEM,
        PROTOCOLS,
        Protocol,
        disease_coding,
        disease_database_id,
        protocol_by_code,
        protocol_by_display,
        protocol_codesystem,
    )
    from schemas.events import (
        EventRejected,
        OrderItem,
        ParsedEvent,
        parse_event,
        skip_reason,
        validate_service_request,
    )
    from schemas.labels import Label, ModelOutput, Prediction
    from schemas.references import order_reference, parse_reference
    from schemas.text import (
        build_model_input,
        clinical_text,
        context_references,
        is_imaging_order,
        service_request_from_text,
    )
    from schemas.validation import r4_schema_errors
    from schemas.writeback import (
        DEVICE_IDENTIFIER_SYSTEM,
        IDENTIFIER_SYSTEM,
        PROVENANCE_TAG_SYSTEM,
        build_writeback_bundle,
        suggestion_identifier,
    )
