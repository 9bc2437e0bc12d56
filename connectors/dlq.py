"""Dead-letter records that Kafka always accepts, whatever the original looked like.

The dead-letter topic keeps the original bytes so an event can be replayed once fixed. But a
record that reached us is not always one kafka-python will send again: a header whose value is
null (``TypeError``), a null value without a key (``ValueError``), or a value above the producer's
or broker's size limit. :func:`dead_letter_record` turns any consumed record into a sendable one:

- header values that are null are dropped, and their names listed in ``ehrw-null-headers``;
  header names are forced to text;
- a tombstone (null value) is sent with an explicit empty value and ``ehrw-original-null: true``;
- a record larger than ``max_bytes`` is sent as a truncated copy of its first bytes, with the
  original's size and sha256 in ``ehrw-original-size``/``ehrw-original-sha256`` and
  ``ehrw-truncated: true``, so the event can still be identified and fetched from its source.

:func:`minimal_dead_letter` is the last resort when even that is refused: our headers only.
Header values are ids and codes, never free text from the event (DESIGN.md, patient text).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from schemas.outcomes import outcome_codes

H_REASON_CODE = "ehrw-reason-code"
H_REASON = "ehrw-reason"
H_DETAILS = "ehrw-details"
H_SOURCE_TOPIC = "ehrw-source-topic"
H_SOURCE_PARTITION = "ehrw-source-partition"
H_SOURCE_OFFSET = "ehrw-source-offset"
H_REJECTED_AT = "ehrw-rejected-at"
H_ATTEMPTS = "ehrw-attempts"
H_NULL_HEADERS = "ehrw-null-headers"
H_ORIGINAL_NULL = "ehrw-original-null"
H_TRUNCATED = "ehrw-truncated"
H_ORIGINAL_SIZE = "ehrw-original-size"
H_ORIGINAL_SHA256 = "ehrw-original-sha256"

# Room left for key, headers and Kafka's record overhead when a value must be truncated.
_HEADROOM_BYTES = 16 * 1024
# The truncated copy sent when the broker refused even a copy cut to the configured size.
LAST_RESORT_BYTES = 64 * 1024


@dataclass
class DeadLetter:
    """A record ready for ``producer.send``: everything is bytes or None, nothing kafka-python refuses."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def record_size(key: bytes | None, value: bytes | None, headers: Iterable[tuple[Any, Any]] | None) -> int:
    """Bytes of key, value and header names/values (what counts against Kafka's record limit)."""
    size = len(key or b"") + len(value or b"")
    for name, val in headers or []:
        size += len(str(name).encode(errors="replace")) + (
            len(val) if isinstance(val, (bytes, bytearray)) else 0
        )
    return size


def sanitise_headers(headers: Iterable[tuple[Any, Any]] | None) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The producer's own headers that can be re-sent, and the names of those with a null value.

    Headers we set (``ehrw-*``) are dropped: ours are added afresh, and a forged reason must not travel.
    """
    kept: list[tuple[str, bytes]] = []
    nulls: list[str] = []
    for name, value in headers or []:
        name = name.decode(errors="replace") if isinstance(name, (bytes, bytearray)) else str(name)
        if name.startswith("ehrw-"):
            continue
        if value is None:
            nulls.append(name)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            kept.append((name, bytes(value)))
        else:
            kept.append((name, str(value).encode(errors="replace")))
    return kept, nulls


def json_bytes(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def reason_headers(
    *,
    topic: str,
    partition: int,
    offset: int,
    reason_code: str | None,
    reason: str | None,
    details: dict | None = None,
    attempts: int | None = None,
) -> list[tuple[str, bytes]]:
    headers = [
        (H_REASON_CODE, (reason_code or "unspecified").encode()),
        (H_REASON, (reason or "").encode(errors="replace")),
        (H_SOURCE_TOPIC, topic.encode()),
        (H_SOURCE_PARTITION, str(partition).encode()),
        (H_SOURCE_OFFSET, str(offset).encode()),
        (H_REJECTED_AT, now_iso().encode()),
    ]
    if attempts is not None:
        headers.append((H_ATTEMPTS, str(attempts).encode()))
    if details is not None:
        if "operation_outcome" in details:  # codes only, whoever built it: server text never reaches a header
            details = {**details, "operation_outcome": outcome_codes(details["operation_outcome"])}
        headers.append((H_DETAILS, json_bytes(details)))
    return headers


def dead_letter_record(
    key: bytes | None,
    value: bytes | None,
    original_headers: Iterable[tuple[Any, Any]] | None,
    ours: list[tuple[str, bytes]],
    *,
    max_bytes: int,
) -> DeadLetter:
    """The dead-letter record for a consumed record: the original, or a truncated copy when it
    would exceed ``max_bytes`` (see the module docstring)."""
    kept, nulls = sanitise_headers(original_headers)
    headers = kept + ours
    if nulls:
        headers.append((H_NULL_HEADERS, ",".join(nulls).encode(errors="replace")))
    body = value
    if body is None:
        headers.append((H_ORIGINAL_NULL, b"true"))
        body = b""
    if record_size(key, body, headers) > max_bytes:
        return truncated_copy(key, body, headers, limit=max_bytes)
    return DeadLetter(key, bytes(body), headers)


def truncated_copy(
    key: bytes | None, value: bytes, headers: list[tuple[str, bytes]], *, limit: int
) -> DeadLetter:
    """The first bytes of ``value`` with its size and sha256, so that the copy fits in ``limit``."""
    if record_size(key, b"", headers) + _HEADROOM_BYTES > limit:
        headers = [(n, v) for n, v in headers if n.startswith("ehrw-") and n != H_DETAILS]  # ours only
    if len(key or b"") > 1024:
        key = hashlib.sha256(key or b"").hexdigest().encode()
    keep = max(0, limit - _HEADROOM_BYTES - record_size(key, b"", headers))
    if any(n == H_ORIGINAL_SHA256 for n, _ in headers):  # already a truncated copy: keep its figures
        return DeadLetter(key, value[:keep], headers)
    extra = [
        (H_TRUNCATED, b"true"),
        (H_ORIGINAL_SIZE, str(len(value)).encode()),
        (H_ORIGINAL_SHA256, hashlib.sha256(value).hexdigest().encode()),
    ]
    return DeadLetter(key, value[:keep], headers + extra)


def minimal_dead_letter(record: DeadLetter) -> DeadLetter:
    """Our headers and the first :data:`LAST_RESORT_BYTES` only: for a record the broker refused."""
    ours = [(n, v) for n, v in record.headers if n.startswith("ehrw-") and n != H_DETAILS]
    return truncated_copy(None, record.value, ours, limit=LAST_RESORT_BYTES + _HEADROOM_BYTES)
