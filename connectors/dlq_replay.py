"""The dead-letter topic: read what was rejected, and replay it once the cause is fixed.

A dead-lettered record holds the original event bytes and key, the producer's own headers, and
the consumer's ``ehrw-*`` headers (reason code and sentence, source topic/partition/offset, time;
see :mod:`connectors.kafka`). Replaying re-publishes the original bytes with the original key to
the input topic, plus an ``ehrw-replayed-from`` header naming the dead-letter record, so the
consumer sees the event exactly as the hospital sent it. Replaying is safe to repeat: the
write-back is idempotent, so an order that was meanwhile written is not written twice.

Reading never commits offsets: the dead-letter topic is a record of what happened, and listing it
must not change what the next listing shows.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from connectors.dlq import (
    H_DETAILS,
    H_REASON,
    H_REASON_CODE,
    H_REJECTED_AT,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
)
from connectors.kafka import make_producer

H_REPLAYED_FROM = "ehrw-replayed-from"
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass
class DeadLetter:
    """One record of the dead-letter topic. ``value`` is the original event: clinical content."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp_ms: int | None = None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name and value is not None:
                return value.decode("utf-8", errors="replace")
        return None

    @property
    def reason_code(self) -> str:
        return self.header(H_REASON_CODE) or "unspecified"

    @property
    def rejected_at(self) -> datetime | None:
        raw = self.header(H_REJECTED_AT)
        if raw:
            try:
                return datetime.fromisoformat(raw)
            except ValueError:
                pass
        if self.timestamp_ms:
            return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)
        return None

    @property
    def coordinates(self) -> str:
        return f"{self.partition}@{self.offset}"

    def details(self) -> Any:
        raw = self.header(H_DETAILS)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def summary(self) -> dict[str, Any]:
        """Ids and codes only (no event bytes): safe to print, log or ship."""
        source = self.header(H_SOURCE_TOPIC)
        at = self.rejected_at
        return {
            "dlq": self.coordinates,
            "rejected_at": at.isoformat(timespec="seconds").replace("+00:00", "Z") if at else None,
            "reason_code": self.reason_code,
            "reason": self.header(H_REASON),
            "source": f"{source}[{self.header(H_SOURCE_PARTITION)}]@{self.header(H_SOURCE_OFFSET)}"
            if source
            else None,
            "key": self.key.decode("utf-8", errors="replace") if self.key is not None else None,
            "bytes": len(self.value) if self.value is not None else 0,
        }


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``--since``: an ISO-8601 time (``2026-12-01T08:00Z``, a date) or an age (``30m``, ``2h``, ``7d``)."""
    now = now or datetime.now(UTC)
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since {text!r} is neither an ISO-8601 time (2026-12-01T08:00:00Z) nor an age (30m, 2h, 7d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def read_dead_letters(
    bootstrap: str,
    topic: str,
    *,
    reasons: Iterable[str] = (),
    since: datetime | None = None,
    client_config: Mapping[str, Any] | None = None,
    timeout_s: float = 30.0,
) -> list[DeadLetter]:
    """Every record of the dead-letter ``topic`` (all partitions, from the beginning to the end as
    of now: :func:`connectors.topic_reader.read_records`), filtered by reason codes and rejection
    time; in partition, offset order."""
    from connectors.topic_reader import read_records

    wanted = set(reasons)
    out: list[DeadLetter] = []
    for rec in read_records(bootstrap, topic, client_config=client_config, timeout_s=timeout_s):
        letter = DeadLetter(
            rec.topic, rec.partition, rec.offset, rec.key, rec.value, list(rec.headers or []), rec.timestamp
        )
        if wanted and letter.reason_code not in wanted:
            continue
        at = letter.rejected_at
        if since is not None and (at is None or at < since):
            continue
        out.append(letter)
    return out


@dataclass
class ReplayReport:
    topic: str
    sent: int = 0
    by_reason: Counter = field(default_factory=Counter)
    skipped_empty: int = 0  # tombstones: nothing to replay

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "sent": self.sent,
            "by_reason": dict(self.by_reason),
            "skipped_empty": self.skipped_empty,
        }


def replay_dead_letters(
    letters: Iterable[DeadLetter],
    *,
    bootstrap: str,
    topic: str,
    client_config: Mapping[str, Any] | None = None,
) -> ReplayReport:
    """Publish each letter's original bytes and key to ``topic``; raises ``RuntimeError`` naming
    the count when Kafka did not acknowledge every record (re-running the replay is harmless)."""
    report = ReplayReport(topic)
    failed: list[BaseException] = []
    producer = make_producer(bootstrap, client_id="ehr-worker-dlq-replay", **dict(client_config or {}))
    try:
        for letter in letters:
            if letter.value is None:
                report.skipped_empty += 1
                continue
            headers = [(k, v) for k, v in letter.headers if not k.startswith("ehrw-")]
            headers.append((H_REPLAYED_FROM, f"{letter.topic}[{letter.partition}]@{letter.offset}".encode()))
            future = producer.send(topic, key=letter.key, value=letter.value, headers=headers)
            future.add_errback(failed.append)
            report.sent += 1
            report.by_reason[letter.reason_code] += 1
        producer.flush()
    finally:
        producer.close(timeout=10)
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {report.sent} replayed events were not acknowledged by Kafka at {bootstrap} "
            f"(first error: {type(failed[0]).__name__}); re-run the replay"
        )
    return report
