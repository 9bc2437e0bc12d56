"""Operations on real services: /metrics and /readyz of a real consumer and a real celery worker,
JSON log lines, dead-letter replay after fixing a refused write-back, model promote/rollback.

The module runs its own ``celery -A workers worker`` on its own queue (``EHRW_CELERY_QUEUE``), a
copy of the tiny registry and its own FHIR server, so its counts and writes are not shared with the
session's worker and server, and the real ``ehr-worker consume`` as a subprocess.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.embedded import free_port
from connectors.fhir import FhirClient
from connectors.replay import event_key
from models.registry import ModelRegistry
from schemas.text import is_imaging_order
from schemas.writeback import DEVICE_IDENTIFIER_SYSTEM, device_identifier_value
from tests.support import Topics, publish, read_topic
from workers.chaos_proxy import FaultProxy
from workers.demo import actionable_orders, fixture_events, seed_fhir, suggestions_by_order

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parent.parent


# -- helpers -------------------------------------------------------------------------------------
def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from a /metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        v for (n, lbl), v in samples.items() if n == name and all((k, w) in lbl for k, w in labels.items())
    )


def by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    out: Counter = Counter()
    for (n, lbl), v in samples.items():
        if n == name:
            out[dict(lbl)[label]] += v
    return {k: v for k, v in out.items() if v}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


class Consumer:
    """``ehr-worker consume`` as a subprocess on the module's queue and the given topics."""

    def __init__(self, env: dict[str, str], topics: Topics, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        full_env = {
            **env,
            "EHRW_KAFKA_TOPIC": topics.events,
            "EHRW_KAFKA_GROUP": topics.group,
            "EHRW_KAFKA_DLQ_TOPIC": topics.dlq,
            "EHRW_KAFKA_RESULT_TOPIC": topics.results,
            "EHRW_CONSUMER_HTTP_PORT": str(self.port),
        }
        self.stderr = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "consume", *args],
            env={**os.environ, **full_env}, stdout=subprocess.PIPE, stderr=self.stderr, cwd=REPO,
        )  # fmt: skip

    def wait(self, timeout: float) -> dict:
        out, _ = self.proc.communicate(timeout=timeout)
        self.stderr.close()
        assert self.proc.returncode == 0, self.log_path.read_text()[-3000:]
        return json.loads(out.decode().strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.stderr.close()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], env={**os.environ, **env},
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ops(services, worker_env, tiny_registry, tmp_path_factory):
    from connectors.embedded import start_sekmet
    from workers.app import app
    from workers.local import start_worker

    base = tmp_path_factory.mktemp("ops")
    fhir_port = free_port()
    sekmet = {"proc": start_sekmet(fhir_port, base / "sekmet")}
    fhir_url = f"http://127.0.0.1:{fhir_port}/fhir"
    # The worker reaches sekmet through a fault proxy that forwards everything until a test tells it
    # to refuse write-backs (the dead-letter round trip below).
    proxy = FaultProxy(fhir_url, free_port()).start()
    registry = base / "registry"
    shutil.copytree(tiny_registry, registry)
    queue = f"ops-{uuid.uuid4().hex[:8]}"
    env = {
        **worker_env,
        "EHRW_MODEL_REGISTRY": str(registry),
        "EHRW_CELERY_QUEUE": queue,
        "EHRW_WORKER_HTTP_PORT": str(free_port()),
        "EHRW_LOG_FORMAT": "json",
        "EHRW_MODEL_CHECK_INTERVAL_S": "0",
        "EHRW_FHIR_BASE_URL": proxy.base_url,
    }
    worker = start_worker(env, base / "worker.log", app=app, concurrency=2, name="ops")
    yield {"env": env, "worker": worker, "registry": registry, "queue": queue, "base": base,
           "port": int(env["EHRW_WORKER_HTTP_PORT"]), "fhir_url": fhir_url, "fhir_port": fhir_port,
           "sekmet": sekmet, "proxy": proxy}  # fmt: skip
    worker.stop()
    proxy.stop()
    sekmet["proc"].stop()


@pytest.fixture(scope="module")
def replay_run(ops, services):
    """Every bundled fixture through the real consumer and worker, scraping both while it runs."""
    fhir = FhirClient(ops["fhir_url"])
    patients, events = fixture_events()
    published = seed_fhir(fhir, patients, events)
    topics = Topics.fresh("ops-metrics")
    worker_before = wait_for(lambda: scrape(ops["port"]), 30, "the worker's /metrics")
    publish(services.kafka_bootstrap, topics.events, [(event_key(raw), raw) for _, raw in published])
    consumer = Consumer(ops["env"], topics, ops["base"] / "consumer.log", "--idle-timeout", "120")
    try:
        wait_for(lambda: _answers(consumer.port), 60, "the consumer's /metrics")
        def finished() -> bool:
            return total(scrape(consumer.port), "ehrw_events_finished_total") >= len(published)

        wait_for(finished, 400, f"{len(published)} durable events", interval=2)
        consumer_after = scrape(consumer.port)
        ready = httpx.get(f"http://127.0.0.1:{consumer.port}/readyz", timeout=10)
    finally:
        consumer.stop()
    worker_after = scrape(ops["port"])
    return {
        "published": published,
        "topics": topics,
        "consumer": consumer_after,
        "consumer_ready": ready,
        "worker_before": worker_before,
        "worker_after": worker_after,
    }


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- metrics and health --------------------------------------------------------------------------
def test_consumer_metrics_count_what_was_replayed_dead_lettered_and_published(replay_run, services):
    m, topics = replay_run["consumer"], replay_run["topics"]
    n = len(replay_run["published"])
    retried = total(m, "ehrw_events_retried_total")
    assert total(m, "ehrw_events_consumed_total") == n + retried
    assert total(m, "ehrw_events_finished_total") == n
    dlq = read_topic(services.kafka_bootstrap, topics.dlq)
    dlq_reasons = Counter(r.headers["ehrw-reason-code"].decode() for r in dlq)
    assert dlq and by_label(m, "ehrw_events_dead_lettered_total", "reason") == dict(dlq_reasons)
    assert total(m, "ehrw_events_finished_total", outcome="dead_letter") == len(dlq)
    results = Counter(r.json()["status"] for r in read_topic(services.kafka_bootstrap, topics.results))
    assert by_label(m, "ehrw_result_events_total", "status") == dict(results)
    print(f"\nreplayed {n} events: dead-lettered {dict(dlq_reasons)}, result events {dict(results)}")
    assert total(m, "ehrw_produce_to_durable_seconds_count") == n
    assert ("ehrw_celery_queue_depth", (("queue", "ehr-worker"),)) not in m  # the module's own queue only
    assert any(name == "ehrw_consumer_lag" for name, _ in m)
    assert replay_run["consumer_ready"].status_code == 200, replay_run["consumer_ready"].text


def test_worker_metrics_count_what_was_written(replay_run, services):
    before, after = replay_run["worker_before"], replay_run["worker_after"]
    results = [r.json() for r in read_topic(services.kafka_bootstrap, replay_run["topics"].results)]
    worker_statuses = Counter(r["status"] for r in results if "imaging" in r or r["status"] == "rejected")
    processed = delta(by_label(after, "ehrw_orders_processed_total", "status"),
                      by_label(before, "ehrw_orders_processed_total", "status"))  # fmt: skip
    assert processed == dict(worker_statuses) and processed.get("written")
    expected: Counter = Counter()
    for r in results:
        if r["status"] != "written":
            continue
        if r.get("protocol"):
            expected[r["protocol"]["model_version"]] += 1
        if r.get("diagnosis") and not r["diagnosis"]["abstained"]:
            expected[r["diagnosis"]["model_version"]] += 1
    written = delta(by_label(after, "ehrw_suggestions_written_total", "version"),
                    by_label(before, "ehrw_suggestions_written_total", "version"))  # fmt: skip
    assert written == dict(expected)
    print(f"\nworker: orders processed {processed}, suggestions written by version {written}")
    inferences = total(after, "ehrw_inference_seconds_count") - total(before, "ehrw_inference_seconds_count")
    assert inferences == sum(bool(r.get("protocol")) + bool(r.get("diagnosis")) for r in results)
    assert total(after, "ehrw_writeback_seconds_count") - total(
        before, "ehrw_writeback_seconds_count"
    ) == processed.get("written", 0) + processed.get("rejected", 0)
    assert total(after, "ehrw_orders_in_flight") == 0
    assert total(after, "ehrw_model_loaded", task="protocol") == 1


def test_readyz_follows_the_fhir_server(ops):
    from connectors.embedded import start_sekmet

    url = f"http://127.0.0.1:{ops['port']}/readyz"
    assert httpx.get(url, timeout=10).status_code == 200
    ops["sekmet"]["proc"].stop()
    try:
        down = wait_for(lambda: (r := httpx.get(url, timeout=10)).status_code == 503 and r, 30, "/readyz 503")
        checks = down.json()["checks"]
        assert checks["fhir"] != "ok" and checks["redis"] == "ok" and checks["models"] == "ok"
        assert httpx.get(f"http://127.0.0.1:{ops['port']}/healthz", timeout=10).status_code == 200
    finally:
        ops["sekmet"]["proc"] = start_sekmet(ops["fhir_port"], ops["base"] / "sekmet")
    wait_for(lambda: httpx.get(url, timeout=10).status_code == 200, 60, "/readyz 200 again")


def test_every_log_line_is_json_without_note_text(replay_run, ops):
    notes = []
    for _, raw in replay_run["published"]:
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        for sr in [doc] + [e.get("resource", {}) for e in doc.get("entry", []) if isinstance(e, dict)]:
            if isinstance(sr, dict):
                notes += [n["text"] for n in sr.get("note", []) if len(n.get("text", "")) > 20]
                notes += [c["text"] for c in sr.get("reasonCode", []) if len(c.get("text", "")) > 20]
    assert notes
    lines = []
    for name in ("worker.log", "consumer.log"):
        text = (ops["base"] / name).read_text(errors="replace")
        for note in notes:
            assert note[:40] not in text, f"note text in {name}"
        lines += [(name, line) for line in text.splitlines() if line.strip()]
    records = []
    for name, line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{name}: not a JSON line: {line[:200]}")
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    written = [r for r in records if "written" in r["message"] and r.get("order")]
    assert written and all(r.get("task_id") and r.get("event") and r.get("model_versions") for r in written)
    received = [r for r in records if r["message"].endswith("received")]
    assert received and not any("service_request" in json.dumps(r) for r in records)


# -- dead-letter replay --------------------------------------------------------------------------
def _imaging_orders(n: int, tag: str) -> list[dict]:
    _, events = fixture_events()
    orders = [o for o in actionable_orders(events) if is_imaging_order(o)][:n]
    fresh = []
    for i, order in enumerate(orders):
        order = copy.deepcopy(order)
        order["id"] = f"{tag}-{i}"
        order.pop("meta", None)
        fresh.append(order)
    return fresh


def test_refused_writeback_is_dead_lettered_fixed_and_replayed_once(ops, services):
    fhir = FhirClient(ops["fhir_url"])
    manifest = ModelRegistry(ops["registry"]).load_manifest("protocol")
    device_id = device_identifier_value(manifest.name, manifest.version)
    query = {"identifier": f"{DEVICE_IDENTIFIER_SYSTEM}|{device_id}"}
    # The cause: the server refuses these write-backs for the events' sake (422, a business rule),
    # quoting the request in its diagnostics as servers do. (A duplicated Device, 412, would be the
    # deployment's problem: the consumer pauses on it instead of dead-lettering, issue 8 defect 5.)
    quoted = f"rule-{uuid.uuid4().hex[:8]} refused note Ada Lovelace"
    ops["proxy"].refuse_transactions(422, quoted)
    tag = f"ops-dlq-{uuid.uuid4().hex[:6]}"
    orders = [fhir.put(o) for o in _imaging_orders(3, tag)]
    topics = Topics.fresh("ops-dlq")
    publish(services.kafka_bootstrap, topics.events, [(o["id"], json.dumps(o).encode()) for o in orders])
    env = {**ops["env"], "EHRW_KAFKA_TOPIC": topics.events, "EHRW_KAFKA_DLQ_TOPIC": topics.dlq}
    try:
        Consumer(ops["env"], topics, ops["base"] / "consumer-dlq.log", "--max-events", "3").wait(300)
        listing = cli(env, "dlq", "list", "--json", "--reason", "fhir_rejected_writeback")
        assert listing.returncode == 0, listing.stderr
        letters = [json.loads(line) for line in listing.stdout.splitlines()]
        assert sorted(x["key"] for x in letters) == sorted(o["id"] for o in orders)
        assert not any(suggestions_by_order(fhir).get(o["id"]) for o in orders)
        shown = cli(env, "dlq", "show", letters[0]["dlq"])
        assert shown.returncode == 0 and "business-rule" in shown.stdout, shown.stderr
        assert all(n["text"][:30] not in shown.stdout for o in orders for n in o.get("note", []))
        assert quoted not in shown.stdout  # the server's diagnostics never reach a dead letter
        raw_letters = read_topic(services.kafka_bootstrap, topics.dlq)
        assert not any(quoted.encode() in (v or b"") for r in raw_letters for v in r.headers.values())
        assert not any(quoted.encode() in r.value for r in read_topic(services.kafka_bootstrap, topics.results))
        body = cli(env, "dlq", "show", letters[0]["dlq"], "--body")
        assert json.loads(body.stdout)["id"] == letters[0]["key"]  # the original event, only on request
    finally:  # the fix
        ops["proxy"].refuse_transactions(None)
    replayed = cli(env, "dlq", "replay", "--reason", "fhir_rejected_writeback", "--since", "1h")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout) == {
        "topic": topics.events,
        "sent": 3,
        "by_reason": {"fhir_rejected_writeback": 3},
        "skipped_empty": 0,
    }
    Consumer(ops["env"], topics, ops["base"] / "consumer-dlq.log", "--max-events", "3").wait(300)
    found = suggestions_by_order(fhir)
    for order in orders:
        assert len(found.get(order["id"], {}).get("Task", [])) == 1, order["id"]
        assert len(found.get(order["id"], {}).get("RiskAssessment", [])) <= 1
    assert len(fhir.search("Device", query)) == 1
    # Still exactly three dead letters: the replayed events were written, not rejected again.
    assert len(read_topic(services.kafka_bootstrap, topics.dlq)) == 3


# -- model roll-out --------------------------------------------------------------------------------
def _new_version(registry: Path, task: str, suffix: str) -> str:
    reg = ModelRegistry(registry)
    current = reg.current_version(task)
    version = f"{current}-{suffix}"
    src = registry / task / current
    staging = registry.parent / f"staging-{version}"
    shutil.copytree(src, staging)
    doc = json.loads((staging / "manifest.json").read_text())
    doc["version"] = version
    (staging / "manifest.json").write_text(json.dumps(doc, indent=2))
    reg.publish(task, version, staging, make_current=False)
    return version


def _suggest(ops, order: dict) -> dict:
    from schemas.events import OrderItem
    from workers.payload import apply_async_options, payload_cipher
    from workers.tasks import suggest

    options = apply_async_options(OrderItem(service_request=order), payload_cipher(os.environ["EHRW_PAYLOAD_KEY"]))
    return suggest.apply_async(**options, queue=ops["queue"]).get(timeout=120)


def test_promote_and_rollback_switch_a_running_worker(ops, services):
    old = ModelRegistry(ops["registry"]).current_version("protocol")
    new = _new_version(ops["registry"], "protocol", "ops2")
    fhir = FhirClient(ops["fhir_url"])
    a, b, c = (fhir.put(o) for o in _imaging_orders(3, f"ops-roll-{uuid.uuid4().hex[:6]}"))
    pid = ops["worker"].pid
    env = {"EHRW_MODEL_REGISTRY": str(ops["registry"])}

    assert _suggest(ops, a)["protocol"]["model_version"] == old
    promoted = cli(env, "models", "promote", new)
    assert promoted.returncode == 0 and f"protocol: {old} -> {new}" in promoted.stdout, promoted.stderr
    out_b = _suggest(ops, b)
    assert out_b["protocol"]["model_version"] == new and out_b["status"] == "written"
    task_b = fhir.read(out_b["resources"]["Task"][0])
    assert new in json.dumps(task_b)
    assert total(scrape(ops["port"]), "ehrw_model_loaded", task="protocol", version=new) == 1

    rolled = cli(env, "models", "rollback", "--task", "protocol")
    assert rolled.returncode == 0 and f"protocol: {new} -> {old}" in rolled.stdout, rolled.stderr
    out_c = _suggest(ops, c)
    assert out_c["protocol"]["model_version"] == old
    assert new not in json.dumps(fhir.read(out_c["resources"]["Task"][0]))
    assert ops["worker"].pid == pid and ops["worker"].proc.poll() is None
    assert total(scrape(ops["port"]), "ehrw_model_switches_total", task="protocol", result="switched") >= 2
