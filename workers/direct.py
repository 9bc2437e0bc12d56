"""``ehr-worker replay --to direct``: fixture events straight to the Celery workers, no Kafka."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from connectors.replay import iter_fixture_events
from schemas.events import EventRejected, parse_event
from workers.payload import apply_async_options, payload_cipher
from workers.settings import get_settings
from workers.tasks import suggest

log = logging.getLogger(__name__)


def replay_direct(paths: Iterable[Path], *, rate: float | None = None, timeout_s: float = 120.0) -> dict[str, int]:
    """Parse each fixture event, run its orders on the workers and wait; returns outcome counts."""
    counts: Counter[str] = Counter()
    pending = []
    interval = 1.0 / rate if rate else 0.0
    cipher = payload_cipher(get_settings().payload_key)  # inline orders travel encrypted
    for event in tqdm(list(iter_fixture_events(paths)), desc="replay", unit="event"):
        started = time.monotonic()
        try:
            parsed = parse_event(event.value)
        except EventRejected as exc:
            counts["rejected"] += 1
            log.warning("%s rejected: %s (%s)", event.source, exc.code, exc.message)
            continue
        counts["skipped"] += len(parsed.skipped)
        pending += [suggest.apply_async(**apply_async_options(item, cipher)) for item in parsed.items]
        if interval:
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    deadline = time.monotonic() + timeout_s
    for result in pending:
        try:
            outcome = result.get(timeout=max(0.1, deadline - time.monotonic()))
            counts[outcome.get("status", "unknown")] += 1
        except Exception as exc:  # noqa: BLE001
            counts["failed"] += 1
            log.warning("task %s failed: %s", result.id, type(exc).__name__)
    return dict(counts)
