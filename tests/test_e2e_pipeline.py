"""The whole path on real services: Tansu -> consumer -> Celery worker (tiny real models) -> sekmet.

One module-scoped run replays every bundled fixture once; the tests then check what landed on the
FHIR server, the result and dead-letter topics, replays, malformed input and a FHIR outage.
"""

from __future__ import annotations

import json
import time

import pytest

from connectors.fhir import FhirClient
from connectors.replay import event_key
from schemas.text import is_imaging_order
from schemas.validation import r4_schema_errors
from tests.support import Topics, committed_offsets, consume, consume_in_thread, publish, read_topic
from workers.demo import actionable_orders, fixture_events, seed_fhir, suggestions_by_order

pytestmark = pytest.mark.services

AIAST = ("http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "AIAST")
WRITTEN_TYPES = ("Task", "RiskAssessment", "Provenance", "Device")


def _totals(fhir: FhirClient) -> dict[str, int]:
    return {t: len(fhir.search(t, {"_count": "200"})) for t in WRITTEN_TYPES}


@pytest.fixture(scope="module")
def first_run(services, celery_worker):
    fhir = FhirClient(services.fhir_base_url)
    patients, events = fixture_events()
    published = seed_fhir(fhir, patients, events)
    topics = Topics.fresh("e2e")
    publish(services.kafka_bootstrap, topics.events, [(event_key(raw), raw) for _, raw in published])
    stats = consume(services, topics, max_events=len(published))
    return {"fhir": fhir, "published": published, "topics": topics, "stats": stats}


def test_every_imaging_order_gets_one_task_and_non_imaging_none(first_run):
    orders = actionable_orders(first_run["published"])
    found = suggestions_by_order(first_run["fhir"])
    imaging = [o for o in orders if is_imaging_order(o)]
    other = [o for o in orders if not is_imaging_order(o)]
    assert len(imaging) >= 50 and other, (len(imaging), len(other))
    assert [o["id"] for o in imaging if len(found.get(o["id"], {}).get("Task", [])) != 1] == []
    assert [o["id"] for o in other if found.get(o["id"], {}).get("Task")] == []


def test_risk_assessments_follow_the_result_events(first_run, services):
    results = [r.json() for r in read_topic(services.kafka_bootstrap, first_run["topics"].results)]
    found = suggestions_by_order(first_run["fhir"])
    written = [r for r in results if r.get("status") == "written"]
    assert written, results[:3]
    for result in written:
        order_id = result["order"].split("/")[1]
        diagnosis = result.get("diagnosis")
        expected = 1 if diagnosis and not diagnosis["abstained"] else 0
        assert len(found.get(order_id, {}).get("RiskAssessment", [])) == expected, result["order"]
    skipped = [r for r in results if r.get("status") == "skipped"]
    assert skipped and all(r.get("reason_code") for r in skipped)


def test_written_resources_validate_carry_aiast_and_name_the_model_device(first_run):
    fhir = first_run["fhir"]
    resources = {t: fhir.search(t, {"_count": "200"}) for t in WRITTEN_TYPES}
    assert resources["Task"] and resources["Provenance"] and resources["Device"]
    for rtype, items in resources.items():
        for res in items:
            assert r4_schema_errors(res) == [], (rtype, res["id"], r4_schema_errors(res)[:3])
            labels = {(s.get("system"), s.get("code")) for s in res.get("meta", {}).get("security", [])}
            assert AIAST in labels, (rtype, res["id"])
    devices = {f"Device/{d['id']}": d for d in resources["Device"]}
    covered = set()
    for prov in resources["Provenance"]:
        agents = [a["who"]["reference"] for a in prov["agent"]]
        assert agents and all(ref in devices for ref in agents), agents
        assert all(devices[ref].get("deviceName") for ref in agents)
        covered |= {t["reference"] for t in prov["target"]}
    for rtype in ("Task", "RiskAssessment"):
        for res in resources[rtype]:
            assert f"{rtype}/{res['id']}" in covered, f"{rtype}/{res['id']} has no Provenance"


def test_hl7_examples_without_subject_are_dead_lettered_with_original_bytes(first_run, services):
    dlq = read_topic(services.kafka_bootstrap, first_run["topics"].dlq)
    by_reason = {}
    for rec in dlq:
        by_reason.setdefault(rec.headers["ehrw-reason-code"].decode(), []).append(rec)
    assert len(by_reason.get("missing_subject", [])) == 3
    originals = {raw for _, raw in first_run["published"]}
    assert all(rec.value in originals for rec in dlq)


def test_replaying_the_same_fixtures_creates_no_duplicates(first_run, services):
    fhir = first_run["fhir"]
    before = _totals(fhir)
    topics = Topics.fresh("replay")
    published = first_run["published"]
    publish(services.kafka_bootstrap, topics.events, [(event_key(raw), raw) for _, raw in published])
    consume(services, topics, max_events=len(published))
    assert _totals(fhir) == before
    results = [r.json() for r in read_topic(services.kafka_bootstrap, topics.results)]
    written = [r for r in results if r.get("status") == "written"]
    assert written and all(r["created"] == 0 for r in written)


MALFORMED = {
    "not_json": b"this is not json {",
    "truncated": b'{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "ServiceRe',
    "wrong_type": json.dumps({"resourceType": "Patient", "id": "p1"}).encode(),
    "no_subject": json.dumps({"resourceType": "ServiceRequest", "id": "m-1", "status": "active", "intent": "order"}).encode(),
    "bogus_status": json.dumps(
        {"resourceType": "ServiceRequest", "id": "m-2", "status": "bogus", "intent": "order", "subject": {"reference": "Patient/x"}}
    ).encode(),
}


def test_malformed_events_go_to_the_dead_letter_topic_and_consumption_continues(services, celery_worker):
    good = {
        "resourceType": "ServiceRequest",
        "id": "after-malformed-1",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}],
        "code": {"text": "CT head"},
        "subject": {"reference": "Patient/demo-1"},
        "reasonCode": [{"text": "fall on anticoagulation, r/o bleed"}],
    }
    topics = Topics.fresh("malformed")
    events = [(None, raw) for raw in MALFORMED.values()] + [("after-malformed-1", json.dumps(good).encode())]
    publish(services.kafka_bootstrap, topics.events, events)
    stats = consume(services, topics, max_events=len(events))
    dlq = read_topic(services.kafka_bootstrap, topics.dlq)
    assert sorted(r.value for r in dlq) == sorted(MALFORMED.values())
    for rec in dlq:
        assert rec.headers["ehrw-reason-code"] and rec.headers["ehrw-reason"]
    reasons = {r.value: r.headers["ehrw-reason-code"].decode() for r in dlq}
    assert reasons[MALFORMED["no_subject"]] == "missing_subject"
    assert reasons[MALFORMED["bogus_status"]] == "invalid_status"
    assert reasons[MALFORMED["wrong_type"]] == "unsupported_resource_type"
    assert reasons[MALFORMED["not_json"]] == reasons[MALFORMED["truncated"]] == "not_json"
    fhir = FhirClient(services.fhir_base_url)
    assert len(suggestions_by_order(fhir).get("after-malformed-1", {}).get("Task", [])) == 1
    assert all(v is not None and v >= 1 for v in committed_offsets(services.kafka_bootstrap, topics.events, topics.group).values() if v is not None)
    assert stats is not None


def test_fhir_outage_leaves_the_offset_uncommitted_and_recovery_writes_once(services, celery_worker):
    order = {
        "resourceType": "ServiceRequest",
        "id": "during-outage-1",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}],
        "code": {"text": "US abdomen"},
        "subject": {"reference": "Patient/demo-2"},
        "reasonCode": [{"text": "RUQ pain after fatty meals, r/o gallstones"}],
    }
    topics = Topics.fresh("outage")
    services.sekmet.stop()
    try:
        publish(services.kafka_bootstrap, topics.events, [("during-outage-1", json.dumps(order).encode())])
        thread, stop, box = consume_in_thread(services, topics, max_events=1)
        time.sleep(8)  # the worker is retrying against a dead server
        assert all(v in (None, 0) for v in committed_offsets(services.kafka_bootstrap, topics.events, topics.group).values())
        assert thread.is_alive()
    finally:
        services.restart_fhir()
    thread.join(timeout=150)
    stop.set()
    assert not thread.is_alive(), "consumer did not finish after the FHIR server recovered"
    fhir = FhirClient(services.fhir_base_url)
    assert len(suggestions_by_order(fhir).get("during-outage-1", {}).get("Task", [])) == 1
    committed = committed_offsets(services.kafka_bootstrap, topics.events, topics.group)
    assert sum(v or 0 for v in committed.values()) == 1


def test_worker_log_holds_no_patient_text(first_run, celery_worker):
    log_text = celery_worker.log_path.read_text(errors="replace")
    assert "Traceback" not in log_text or "FhirTransientError" in log_text
    for _, raw in first_run["published"]:
        try:
            sr = json.loads(raw)
        except ValueError:
            continue
        for note in sr.get("note", []) if isinstance(sr, dict) else []:
            text = note.get("text", "")
            if len(text) > 20:
                assert text[:40] not in log_text
