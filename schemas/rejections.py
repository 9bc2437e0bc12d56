"""Why an event is rejected: a stable code and a sentence that never quotes patient text.

Rejection messages go to logs and to dead-letter headers, so they name problems by field path,
id, code or JSON position only. Values are echoed only when they look like codes (short tokens).
"""

from __future__ import annotations

import re
from typing import Any

REASON_CODES = frozenset(
    {
        "not_utf8",
        "not_json",
        "not_an_object",
        "unsupported_resource_type",
        "invalid_structure",
        "missing_subject",
        "invalid_status",
        "invalid_intent",
        "no_service_request",
        "invalid_notification",
        "invalid_cloudevent",
        "too_deeply_nested",
    }
)

CODE_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,31}")
# Element names (pydantic ``loc`` parts, JSON keys) that may be named in a message.
FIELD_NAME_RE = re.compile(r"_?[A-Za-z][A-Za-z0-9_]{0,63}")


class EventRejected(Exception):
    """An event that cannot be processed: ``code`` is stable snake_case (see ``REASON_CODES``),
    ``message`` a sentence for people, free of patient text."""

    def __init__(self, code: str, message: str) -> None:
        if code not in REASON_CODES:
            raise ValueError(f"unknown rejection code {code!r}")
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def code_repr(value: Any, pattern: re.Pattern[str] = CODE_TOKEN_RE) -> str:
    """Quote a coded value for a message, or describe it when it does not look like a code."""
    if isinstance(value, str) and pattern.fullmatch(value):
        return repr(value)
    if isinstance(value, str):
        return "(not a code)"
    return f"(a JSON {json_type(value)})"


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
