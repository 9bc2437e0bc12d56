"""Replay fixture files as Kafka events.

The bytes of each event are exactly those of the fixture (a malformed fixture replays malformed),
so the consumer's validation and dead-letter path can be exercised with real files.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from kafka import KafkaProducer

log = logging.getLogger(__name__)

FIXTURE_SUFFIXES = (".json", ".ndjson")


class ReplayEvent(NamedTuple):
    """One event to publish; a tuple too, so ``for key, value, source in ...`` works."""

    key: str | None  # the ServiceRequest id, so updates of one order land in one partition
    value: bytes
    source: str  # "path" for a .json file, "path:line" for an .ndjson line


def _fixture_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FIXTURE_SUFFIXES)
        if not files:
            log.warning("no .json or .ndjson fixtures under %s", path)
        return files
    if not path.exists():
        raise FileNotFoundError(f"fixture path {path} does not exist")
    if path.suffix.lower() not in FIXTURE_SUFFIXES:
        raise ValueError(
            f"cannot replay {path}: expected a .json file (one resource or Bundle), "
            "an .ndjson file (one event per line) or a folder of those"
        )
    return [path]


def event_key(value: bytes) -> str | None:
    """The Kafka key for an event: the ServiceRequest id; for a Bundle holding exactly one
    ServiceRequest that one's id (same partition as its plain updates), else the Bundle id."""
    try:
        doc: Any = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    rtype = doc.get("resourceType")
    if rtype == "ServiceRequest":
        return _str_id(doc.get("id"))
    if rtype == "Bundle":
        orders = [
            e["resource"]
            for e in doc.get("entry") or []
            if isinstance(e, dict)
            and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == "ServiceRequest"
        ]
        if len(orders) == 1 and _str_id(orders[0].get("id")):
            return _str_id(orders[0].get("id"))
        return _str_id(doc.get("id"))
    return None


def _str_id(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def iter_fixture_events(paths: Iterable[Path | str]) -> Iterator[ReplayEvent]:
    """Events from fixture files and folders, in order.

    A folder: its ``.json``/``.ndjson`` files, recursively, sorted by path (other files are ignored).
    ``.json``: the whole file is one event. ``.ndjson``: one event per non-empty line.
    Any other file named explicitly is an error.
    """
    for raw_path in paths:
        for file in _fixture_files(Path(raw_path)):
            if file.suffix.lower() == ".json":
                value = file.read_bytes()
                yield ReplayEvent(event_key(value), value, str(file))
                continue
            with file.open("rb") as lines:
                for number, line in enumerate(lines, start=1):
                    value = line.rstrip(b"\r\n")
                    if value.strip():
                        yield ReplayEvent(event_key(value), value, f"{file}:{number}")


def replay_to_kafka(
    paths: Iterable[Path | str],
    *,
    bootstrap: str,
    topic: str,
    rate: float | None = None,
    producer: KafkaProducer | None = None,
    progress: bool = True,
) -> int:
    """Publish fixture events to ``topic``; returns how many were published (and acknowledged).

    ``rate`` caps the events per second. Raises ``RuntimeError`` naming the count when Kafka did not
    acknowledge every event.
    """
    from tqdm import tqdm

    from connectors.kafka import make_producer

    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0 events per second")
    own_producer = producer is None
    out = producer if producer is not None else make_producer(bootstrap, client_id="ehr-worker-replay")
    failed: list[BaseException] = []
    sent = 0
    start = time.monotonic()
    try:
        events = iter_fixture_events(paths)
        for event in tqdm(events, desc=f"replay -> {topic}", unit="event", disable=not progress):
            if rate is not None:
                # Pace against the start time, not the previous send, so the average rate holds.
                delay = start + sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            future = out.send(topic, key=event.key.encode() if event.key else None, value=event.value)
            future.add_errback(failed.append)
            sent += 1
        out.flush()
    finally:
        if own_producer:
            out.close(timeout=10)
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {sent} events were not acknowledged by Kafka at {bootstrap} "
            f"(first error: {type(failed[0]).__name__}); check the broker and re-run the replay"
        )
    return sent
