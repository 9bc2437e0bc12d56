"""Reading loosely-typed FHIR JSON safely: events come from other systems, and a wrong type in
any field must give "nothing here", never an exception."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

_WS = re.compile(r"\s+")


def clean_text(text: Any) -> str:
    """NFKC, invisible format characters (zero-width spaces) dropped, whitespace collapsed;
    ``""`` for anything that is not a string."""
    if not isinstance(text, str):
        return ""
    text = unicodedata.normalize("NFKC", text)
    kept = (ch for ch in text if unicodedata.category(ch) != "Cf")
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in kept)
    return _WS.sub(" ", text).strip()


def objects(value: Any) -> list[dict[str, Any]]:
    """The JSON objects of an array element (``[]`` when it is not an array)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def codings(concept: Any) -> list[dict[str, Any]]:
    """The codings of a CodeableConcept."""
    return objects(concept.get("coding")) if isinstance(concept, dict) else []


def code_in(code: Any, codes: frozenset[str]) -> bool:
    return isinstance(code, str) and code in codes


def has_code(concept: Any, codes: dict[str, frozenset[str]]) -> bool:
    """True when a coding of ``concept`` is one of ``codes[system]``."""
    empty: frozenset[str] = frozenset()
    return any(code_in(c.get("code"), codes.get(str(c.get("system")), empty)) for c in codings(concept))


def first_code(concept: Any) -> Any:
    """The code of the first coding (status-like CodeableConcepts carry one)."""
    found = codings(concept)
    return found[0].get("code") if found else None
