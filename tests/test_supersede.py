"""Superseding and withdrawing suggestion Tasks on a real sekmet server (issue 8, defect 8).

v1 then v2 of one order: v1's untouched Task is cancelled in v2's write-back transaction, saying
why; a revoked order cancels its open Tasks; replays change nothing; a Task changed after it was
read is never overwritten (412, read again).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from connectors.fhir import FhirClient, FhirPermanentError
from schemas.catalog import PROTOCOL_SYSTEM
from schemas.events import OrderItem
from schemas.labels import ModelOutput, Prediction
from schemas.writeback import build_writeback_bundle
from workers.pipeline import ModelSet, suggest_for_order
from workers.supersede import cancellation_entries, open_suggestion_tasks, write_with_supersede

pytestmark = pytest.mark.services

PROTOCOL = ModelOutput(
    task="protocol",
    model="protocol-test",
    model_version="1",
    abstained=False,
    predictions=[Prediction(PROTOCOL_SYSTEM, "CT-HEAD-WO", "CT head without contrast", 0.9)],
)


class NotToBeCalled:
    def predict(self, texts, top_k=5):
        raise AssertionError("a void order must not reach the models")


@pytest.fixture(scope="module")
def fhir(fhir_base) -> Iterator[FhirClient]:
    with FhirClient(fhir_base, max_retries=1) as client:
        yield client


def _put_order(fhir: FhirClient, order_id: str, status: str = "active", text: str = "CT head") -> dict:
    return fhir.put(
        {
            "resourceType": "ServiceRequest",
            "id": order_id,
            "status": status,
            "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "code": {"text": text},
        }
    )


def _tasks(fhir: FhirClient, order_id: str) -> dict[str, dict]:
    return {t["focus"]["reference"]: t for t in fhir.search("Task", {"focus": f"ServiceRequest/{order_id}"})}


def _write(fhir: FhirClient, sr: dict) -> dict:
    return write_with_supersede(fhir, build_writeback_bundle(sr, PROTOCOL, None), sr)


def test_v2_cancels_v1s_open_task_and_replays_change_nothing(fhir):
    order_id = uuid.uuid4().hex[:12]
    v1 = _put_order(fhir, order_id)
    assert _write(fhir, v1)["superseded"] == []
    v2 = _put_order(fhir, order_id, text="CT head, new clinical question")
    response = _write(fhir, v2)
    tasks = _tasks(fhir, order_id)
    old, new = tasks[f"ServiceRequest/{order_id}/_history/1"], tasks[f"ServiceRequest/{order_id}/_history/2"]
    assert response["superseded"] == [f"Task/{old['id']}"]
    assert [e["response"]["status"][:3] for e in response["entry"]] == ["200", "201", "201"]  # own entries: Device, Task, Provenance
    assert old["status"] == "cancelled" and old["statusReason"]["text"] == "Superseded by version 2 of the order"
    assert new["status"] == "requested"
    for sr in (v1, v2, v1):  # replays, in and out of order
        assert _write(fhir, sr)["superseded"] == []
    assert len(_tasks(fhir, order_id)) == 2


def test_revoked_order_cancels_its_open_tasks_once(fhir):
    order_id = uuid.uuid4().hex[:12]
    _write(fhir, _put_order(fhir, order_id))
    _put_order(fhir, order_id, status="revoked")
    models = ModelSet(protocol=NotToBeCalled(), diagnosis=NotToBeCalled())
    item = OrderItem(reference=f"ServiceRequest/{order_id}")
    outcome = suggest_for_order(item, fhir, models)
    (task,) = _tasks(fhir, order_id).values()
    assert outcome["status"] == "skipped" and outcome["cancelled"] == [f"Task/{task['id']}"]
    assert task["status"] == "cancelled" and task["statusReason"]["text"] == "The order was revoked"
    assert suggest_for_order(item, fhir, models)["cancelled"] == []  # replay


def test_a_task_changed_after_it_was_read_is_not_overwritten(fhir):
    order_id = uuid.uuid4().hex[:12]
    _write(fhir, _put_order(fhir, order_id))
    (read,) = open_suggestion_tasks(fhir, order_id)
    fhir.put({**read, "status": "accepted"})  # a radiologist takes it meanwhile
    entries = cancellation_entries([read], reason="Superseded by version 2 of the order")
    with pytest.raises(FhirPermanentError) as err:  # the caller's to handle, not a deployment problem
        fhir.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert err.value.status == 412
    (task,) = _tasks(fhir, order_id).values()
    assert task["status"] == "accepted"
    assert open_suggestion_tasks(fhir, order_id) == []  # accepted is the clinician's: never cancelled


def test_a_late_old_version_is_written_already_superseded(fhir):
    order_id = uuid.uuid4().hex[:12]
    v1 = _put_order(fhir, order_id)
    v2 = _put_order(fhir, order_id, text="CT head, new clinical question")
    _write(fhir, v2)
    assert _write(fhir, v1)["superseded"] == []  # v1's event arrives late (a replay from the DLQ)
    tasks = _tasks(fhir, order_id)
    old, new = tasks[f"ServiceRequest/{order_id}/_history/1"], tasks[f"ServiceRequest/{order_id}/_history/2"]
    assert old["status"] == "cancelled" and old["statusReason"]["text"] == "Superseded by version 2 of the order"
    assert new["status"] == "requested"


def test_an_inline_revoked_order_cancels_its_open_tasks_through_the_consumer(services, celery_worker):
    """Defect 8 end to end: an event carrying a revoked order (the parser skips it) still has its
    earlier open Task cancelled, by a task that carries the order id and reason code only, and the
    order's one result event says what was cancelled."""
    import json

    from tests.support import Topics, consume, publish, read_topic

    server = FhirClient(services.fhir_base_url)
    order_id = uuid.uuid4().hex[:12]
    _write(server, _put_order(server, order_id))
    revoked = _put_order(server, order_id, status="revoked")
    topics = Topics.fresh("void")
    publish(services.kafka_bootstrap, topics.events, [(order_id, json.dumps(revoked).encode())])
    stats = consume(services, topics, max_events=1)
    assert (stats.committed, stats.dead_lettered) == (1, 0), stats.as_dict()
    (task,) = _tasks(server, order_id).values()
    assert task["status"] == "cancelled" and task["statusReason"]["text"] == "The order was revoked"
    results = [r.json() for r in read_topic(services.kafka_bootstrap, topics.results)]
    assert [(r["status"], r["reason_code"], r["cancelled"]) for r in results] == [
        ("skipped", "status_revoked", [f"Task/{task['id']}"])
    ]
