"""connectors.replay: fixture files -> events (bytes untouched), and replay into a real broker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from connectors.embedded import EmbeddedServices
from connectors.kafka import ensure_topics
from connectors.replay import ReplayEvent, event_key, iter_fixture_events, replay_to_kafka

REPO = Path(__file__).resolve().parent.parent


def _sr(order_id: str) -> dict:
    return {"resourceType": "ServiceRequest", "id": order_id, "status": "active", "intent": "order",
            "subject": {"reference": "Patient/p1"}}  # fmt: skip


@pytest.fixture
def fixtures(tmp_path: Path) -> Path:
    root = tmp_path / "fx"
    (root / "b").mkdir(parents=True)
    (root / "a.json").write_bytes(json.dumps(_sr("sr-a"), indent=2).encode())
    (root / "b" / "c.ndjson").write_bytes(
        # CRLF, blank and whitespace-only lines, no final newline
        json.dumps(_sr("sr-c1")).encode() + b"\r\n\n   \n" + json.dumps(_sr("sr-c2")).encode()
    )
    bundle = {"resourceType": "Bundle", "id": "bun-1", "type": "collection",
              "entry": [{"resource": _sr("sr-b1")}, {"resource": _sr("sr-b2")}]}  # fmt: skip
    (root / "b" / "bundle.json").write_text(json.dumps(bundle))
    (root / "broken.json").write_bytes(b'{"resourceType": "ServiceRequest", "id": "tru')
    (root / "README.md").write_text("not a fixture")
    return root


def test_folder_is_walked_recursively_in_sorted_order(fixtures):
    events = list(iter_fixture_events([fixtures]))
    assert [Path(e.source.split(":")[0]).relative_to(fixtures).as_posix() for e in events] == [
        "a.json", "b/bundle.json", "b/c.ndjson", "b/c.ndjson", "broken.json",
    ]  # fmt: skip
    assert [e.key for e in events] == ["sr-a", "bun-1", "sr-c1", "sr-c2", None]
    assert events[0].value == (fixtures / "a.json").read_bytes()  # the whole file, as is
    assert events[4].value == (fixtures / "broken.json").read_bytes()  # malformed replays malformed
    assert events[2].source.endswith("c.ndjson:1") and events[3].source.endswith("c.ndjson:4")
    assert events[2].value == json.dumps(_sr("sr-c1")).encode()  # line terminator stripped


def test_files_and_errors(fixtures, tmp_path):
    ndjson = fixtures / "b" / "c.ndjson"
    keys = [e.key for e in iter_fixture_events([str(ndjson), fixtures / "a.json"])]
    assert keys == ["sr-c1", "sr-c2", "sr-a"]
    with pytest.raises(ValueError, match=r"\.json .*\.ndjson"):
        list(iter_fixture_events([fixtures / "README.md"]))
    with pytest.raises(FileNotFoundError):
        list(iter_fixture_events([tmp_path / "missing.json"]))
    (tmp_path / "empty").mkdir()
    assert list(iter_fixture_events([tmp_path / "empty"])) == []


def test_event_key():
    one = {"resourceType": "Bundle", "id": "b", "type": "collection", "entry": [{"resource": _sr("only")}]}
    assert event_key(json.dumps(one).encode()) == "only"  # same partition as the order's own updates
    assert event_key(json.dumps({"resourceType": "Patient", "id": "p"}).encode()) is None
    assert event_key(b"[1, 2]") is None and event_key(b"\xff") is None


def test_bundled_fixtures_replay():
    """The fixtures shipped with the workers package are readable by the replayer."""
    folder = REPO / "workers" / "fixtures"
    if not folder.is_dir():
        pytest.skip("workers/fixtures not present yet")
    events = list(iter_fixture_events([folder]))
    assert events and all(isinstance(e, ReplayEvent) and e.value for e in events)


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory) -> Iterator[str]:
    with EmbeddedServices(tmp_path_factory.mktemp("kafka-replay"), fhir=False, redis=False) as services:
        yield services.kafka_bootstrap


@pytest.mark.services
def test_replay_to_kafka(bootstrap, fixtures):
    topic = f"replay-{time.monotonic_ns()}"
    ensure_topics(bootstrap, [topic], partitions=2)
    start = time.monotonic()
    assert replay_to_kafka([fixtures], bootstrap=bootstrap, topic=topic, rate=20, progress=False) == 5
    assert time.monotonic() - start >= 4 / 20  # paced

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in (0, 1)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        got: list = []
        deadline = time.monotonic() + 20
        while len(got) < 5 and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                got.extend(batch)
    finally:
        consumer.close()
    by_value = {r.value: r.key for r in got}
    for event in iter_fixture_events([fixtures]):
        assert by_value[event.value] == (event.key.encode() if event.key else None)
