"""One ServiceRequest: is it valid, and does it need work?

fhir.resources (R4B models) checks structure but not coded values, so the required bindings
(``status``, ``intent``) and the subject the worker relies on are checked here.
"""

from __future__ import annotations

import copy
import logging
from functools import lru_cache
from typing import Any, TypeGuard

from schemas.references import ID_RE, RESOURCE_TYPE_RE
from schemas.rejections import FIELD_NAME_RE, EventRejected, code_repr
from schemas.validation import r4_resource_types, r4_schema_errors

log = logging.getLogger(__name__)

# FHIR R4 request-status and request-intent (required bindings).
STATUSES = frozenset({"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"})
INTENTS = frozenset(
    {
        "proposal",
        "plan",
        "directive",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    }
)
# Intents that authorise the work. proposal/plan/option are suggestions, not orders, and a
# directive is a patient's or relative's instruction, not something a department protocols.
ORDER_INTENTS = frozenset({"order", "original-order", "reflex-order", "filler-order", "instance-order"})

_MAX_STRUCTURE_ERRORS = 5
# JSON nesting (objects and arrays) a ServiceRequest may have. Real orders stay under ~15 levels
# (a contained Questionnaire's nested items reach ~30); fhir.resources validates recursively in
# Python and fails with RecursionError near 300 levels (an ``extension`` nested 150 deep), so a
# deeper order is rejected before it is validated.
MAX_JSON_DEPTH = 64


def validate_service_request(sr: Any, *, path: str = "ServiceRequest") -> None:
    """Check one ServiceRequest (from an event or read from FHIR); raises :class:`EventRejected`.

    Own checks come first so that the most useful code wins: the id, the required bindings of
    ``status`` and ``intent``, and a subject that ties the order to a patient (a display-only
    subject does not). Then the structure is checked with the fhir.resources R4B model.
    ``path`` names the resource in messages (e.g. ``Bundle.entry[2].resource``).
    """
    if not isinstance(sr, dict):
        raise EventRejected("invalid_structure", f"{path} is not a JSON object.")
    if sr.get("resourceType") != "ServiceRequest":
        found = code_repr(sr.get("resourceType"), RESOURCE_TYPE_RE)
        raise EventRejected(
            "unsupported_resource_type", f"{path} has resourceType {found}, expected ServiceRequest."
        )
    order_id = sr.get("id")
    if not isinstance(order_id, str) or not ID_RE.fullmatch(order_id):
        raise EventRejected("invalid_structure", f"{path}.id is missing or not a valid FHIR id.")
    where = f"{path} (id {order_id})"

    status = sr.get("status")
    if not _is_code(status, STATUSES):
        problem = _binding_problem(status, "request-status")
        raise EventRejected("invalid_status", f"{where}: status {problem}.")
    intent = sr.get("intent")
    if not _is_code(intent, INTENTS):
        problem = _binding_problem(intent, "request-intent")
        raise EventRejected("invalid_intent", f"{where}: intent {problem}.")
    if not _has_subject(sr.get("subject")):
        raise EventRejected(
            "missing_subject",
            f"{where}: subject has no reference or identifier, so the order names no patient.",
        )

    r4_only = _check_embedded_resources(sr, where)
    errors = _structure_errors(sr, r4_only)
    if errors:
        shown = "; ".join(errors[:_MAX_STRUCTURE_ERRORS])
        hidden = len(errors) - _MAX_STRUCTURE_ERRORS
        more = f" (and {hidden} more)" if hidden > 0 else ""
        raise EventRejected(
            "invalid_structure", f"{where} is not a valid FHIR ServiceRequest: {shown}{more}."
        )


# Skip reasons of void orders: their earlier, untouched suggestions are withdrawn (issue 8, defect 8).
VOID_REASONS = frozenset({"status_revoked", "status_entered_in_error"})


def skip_reason(sr: dict[str, Any]) -> str | None:
    """``None`` when the order should be worked on, else a snake_case reason to count it by.

    Only ``active`` orders with an order intent are actionable:
    - draft: not signed yet; it comes back as ``active`` (a new version) when it is;
    - on-hold: suspended; resuming it publishes a new version, which is worked on then;
    - completed / revoked / entered-in-error: too late or void;
    - unknown: the sender does not know the state, so nobody should act on it;
    - intents proposal / plan / directive / option: not an order;
    - ``doNotPerform: true``: a prohibition, nothing to protocol.
    """
    status = sr.get("status")
    if status != "active":
        return f"status_{_snake(status)}" if _is_code(status, STATUSES) else "status_invalid"
    intent = sr.get("intent")
    if not _is_code(intent, ORDER_INTENTS):
        return f"intent_{_snake(intent)}" if _is_code(intent, INTENTS) else "intent_invalid"
    if sr.get("doNotPerform") is True:
        return "do_not_perform"
    return None


def _has_subject(subject: Any) -> bool:
    if not isinstance(subject, dict):
        return False
    reference = subject.get("reference")
    if isinstance(reference, str) and reference.strip():
        return True
    identifier = subject.get("identifier")
    value = identifier.get("value") if isinstance(identifier, dict) else None
    return isinstance(value, str) and bool(value.strip())


@lru_cache(maxsize=1)
def _service_request_model() -> Any:
    # Imported on first use: fhir.resources is heavy and `import schemas` must stay cheap.
    from fhir.resources.R4B.servicerequest import ServiceRequest

    return ServiceRequest


def _check_embedded_resources(sr: dict[str, Any], where: str) -> list[tuple[Any, ...]]:
    """Reject an order nested deeper than :data:`MAX_JSON_DEPTH` or embedding an object whose
    ``resourceType`` is not an R4 resource type; return the paths of embedded resources of R4
    types that the R4B model lacks (``MedicinalProduct``...), which the model cannot validate.

    Iterative on purpose: the input is untrusted, so nothing here may recurse on its depth.
    """
    known, r4b = r4_resource_types(), _r4b_resource_types()
    r4_only: list[tuple[Any, ...]] = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(sr, ())]
    while stack:
        value, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise EventRejected(
                "too_deeply_nested",
                f"{where} nests deeper than {MAX_JSON_DEPTH} levels at {_loc_path(path[:8])}...; "
                "no valid order is that deep.",
            )
        if isinstance(value, dict):
            if path and "resourceType" in value:
                resource_type = value["resourceType"]
                if not isinstance(resource_type, str) or resource_type not in known:
                    found = code_repr(resource_type, RESOURCE_TYPE_RE)
                    raise EventRejected(
                        "invalid_structure",
                        f"{where}: {_loc_path(path)} has resourceType {found}, not an R4 resource type.",
                    )
                if resource_type not in r4b:
                    r4_only.append(path)
            stack.extend((child, (*path, key)) for key, child in value.items())
        elif isinstance(value, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(value))
    return r4_only


@lru_cache(maxsize=1)
def _r4b_resource_types() -> frozenset[str]:
    import fhir.resources.R4B.fhirtypes as r4b_types

    return frozenset(name for name in r4_resource_types() if hasattr(r4b_types, f"{name}Type"))


def _structure_errors(sr: dict[str, Any], r4_only: list[tuple[Any, ...]] | None = None) -> list[str]:
    """Failing field paths and pydantic error types only: pydantic messages may quote the input.

    Embedded resources of R4-only types (``r4_only`` paths) are checked against the R4 JSON schema
    and stand in the model's copy as a minimal ``Basic``, so that array positions stay true.
    """
    from pydantic import ValidationError

    errors: list[str] = []
    if r4_only:
        sr = copy.deepcopy(sr)
        for path in r4_only:
            parent = sr
            for part in path[:-1]:
                parent = parent[part]
            resource = parent[path[-1]]
            errors += [f"{_loc_path(path)}{e.removeprefix('$')}" for e in r4_schema_errors(resource)]
            parent[path[-1]] = {"resourceType": "Basic", "code": {"text": "R4-only resource"}}
    try:
        _service_request_model().model_validate(sr)
    except ValidationError as exc:
        errors += [
            f"{_loc_path(err['loc'])}: {err['type']}"
            for err in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
    except Exception as exc:  # noqa: BLE001 - a model bug must neither leak input text nor escape
        # The checks above remove every cause found so far (fuzzed in tests/test_schemas_fuzz.py);
        # anything left is the model's problem, reported by type only.
        log.warning("fhir.resources failed on a ServiceRequest with %s", type(exc).__name__)
        errors.append(f"(resource): could not be validated ({type(exc).__name__} in the R4B model)")
    return errors


def _loc_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and FIELD_NAME_RE.fullmatch(part):
            path += f".{part}" if path else part
        else:  # not an element name (e.g. a key made of free text): not echoed
            path += ".?" if path else "?"
    return path or "(resource)"


def _is_code(value: Any, codes: frozenset[str]) -> TypeGuard[str]:
    return isinstance(value, str) and value in codes


def _binding_problem(value: Any, value_set: str) -> str:
    return "is missing" if value is None else f"value {code_repr(value)} is not in the {value_set} value set"


def _snake(code: str) -> str:
    return code.replace("-", "_")
