"""FHIR references: parsing ``Type/id[/_history/vid]`` out of relative references, absolute URLs
and cloud resource names, and building the versioned reference to an order."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeGuard

# FHIR R4 id and resource type name grammars (https://hl7.org/fhir/R4/datatypes.html#id).
ID_PATTERN = r"[A-Za-z0-9\-.]{1,64}"
ID_RE = re.compile(ID_PATTERN)
RESOURCE_TYPE_RE = re.compile(r"[A-Z][A-Za-z]{1,63}")

# The reference is the *last* Type/id[/_history/vid] of the string, so the same pattern reads
# "ServiceRequest/1", "https://host/fhir/ServiceRequest/1/_history/2" and Google Healthcare names
# "projects/p/locations/l/datasets/d/fhirStores/s/fhir/ServiceRequest/1".
_REFERENCE_RE = re.compile(
    rf"(?:^|/)(?P<type>[A-Z][A-Za-z]{{1,63}})/(?P<id>{ID_PATTERN})(?:/_history/(?P<version>{ID_PATTERN}))?/?$"
)
_RELATIVE_RE = re.compile(
    rf"(?P<type>[A-Z][A-Za-z]{{1,63}})/(?P<id>{ID_PATTERN})(?:/_history/(?P<version>{ID_PATTERN}))?"
)


@dataclass(frozen=True)
class ParsedReference:
    resource_type: str
    id: str
    version: str | None = None

    @property
    def relative_unversioned(self) -> str:
        """``Type/id``."""
        return f"{self.resource_type}/{self.id}"

    @property
    def relative(self) -> str:
        """``Type/id`` or ``Type/id/_history/vid``."""
        base = f"{self.resource_type}/{self.id}"
        return f"{base}/_history/{self.version}" if self.version else base


def parse_reference(value: Any) -> ParsedReference | None:
    """The resource a reference string names, or ``None`` when it names none (``#contained``,
    ``urn:uuid:...``, a bare base URL, anything not a string)."""
    if not isinstance(value, str) or not value or value.startswith("#"):
        return None
    match = _REFERENCE_RE.search(value.split("?", 1)[0])
    if not match:
        return None
    return ParsedReference(match["type"], match["id"], match["version"])


def parse_relative_reference(value: Any) -> ParsedReference | None:
    """The resource a relative reference names (``Type/id`` or ``Type/id/_history/vid``, nothing
    before or after it), or ``None`` for anything else."""
    match = _RELATIVE_RE.fullmatch(value) if isinstance(value, str) else None
    return ParsedReference(match["type"], match["id"], match["version"]) if match else None


def is_relative_reference(value: Any) -> bool:
    """True for ``Type/id`` or ``Type/id/_history/vid`` (a reference on the server we talk to)."""
    return parse_relative_reference(value) is not None


def is_resource_type(value: Any) -> TypeGuard[str]:
    """True for a string that is a FHIR resource type name (``ServiceRequest``)."""
    return isinstance(value, str) and RESOURCE_TYPE_RE.fullmatch(value) is not None


def order_id_reference(order_id: str) -> str:
    """``ServiceRequest/{id}``: the order itself, whichever version (what outcomes and tasks name)."""
    return f"ServiceRequest/{order_id}"


def order_reference(service_request: dict[str, Any]) -> str:
    """``ServiceRequest/{id}/_history/{versionId}`` when the version is known, else ``ServiceRequest/{id}``:
    the version of the order that the model actually read, which a suggestion must point at (an
    outcome names the order unversioned, :func:`order_id_reference`)."""
    version = (service_request.get("meta") or {}).get("versionId")
    base = order_id_reference(service_request["id"])
    if isinstance(version, str) and ID_RE.fullmatch(version):
        return f"{base}/_history/{version}"
    return base
