"""Issue 8, dispatch side, on the real services: a real ``celery worker`` (tiny real models), Redis,
sekmet and Tansu. Each test failed before the fix (an endless retry, a missing parameter, tasks
multiplying, same-key events in parallel) and passes now. The poison order of defect 1 end to
end (a fetched order that makes validation raise) is a row of the fault suite (test_fault_suite)."""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid

import pytest

from connectors.fhir import FhirClient, FhirPermanentError
from connectors.kafka import Incoming
from schemas.events import parse_event

pytestmark = pytest.mark.services


def _lab_order(order_id: str, **changes) -> dict:
    """A valid order that needs no model and no write-back (status no_suggestion): cheap to run."""
    sr = {"resourceType": "ServiceRequest", "id": order_id, "status": "active", "intent": "order",
          "subject": {"reference": "Patient/p1"}, "code": {"text": "Complete blood count"}}  # fmt: skip
    sr.update(changes)
    return sr


def _imaging_order(order_id: str, reason: str = "headache after a fall, r/o bleed") -> dict:
    return _lab_order(
        order_id,
        category=[{"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}],
        code={"text": "CT head"},
        reasonCode=[{"text": reason}],
    )


def _incoming(offset: int, doc: dict, key: bytes | None = None) -> Incoming:
    raw = json.dumps(doc).encode()
    return Incoming(f"ev-{uuid.uuid4().hex[:6]}", 0, offset, key, raw, parse_event(raw))


def _queue_sampler(queue: str):
    from workers.app import app

    client = app.backend.client
    box = {"max": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            box["max"] = max(box["max"], int(client.llen(queue)))
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return box, stop


def test_a_bundle_of_many_orders_is_bounded_deduplicated_and_never_queued_twice(services, celery_worker):
    """Defects 3 and 4: a round that runs out of time leaves its tasks running; the next round
    finds them (task id from the event's coordinates) instead of queueing copies, in-flight ORDERS
    stay under the window, and a repeated order id runs once."""
    from workers.app import app
    from workers.dispatch import CeleryDispatcher, task_id_for

    ids = [f"lab-{uuid.uuid4().hex[:6]}-{i}" for i in range(300)]
    entries = [{"resource": _lab_order(i)} for i in ids] + [{"resource": _lab_order(i)} for i in ids[:50]]
    inc = _incoming(7, {"resourceType": "Bundle", "type": "collection", "entry": entries})
    # a short round (0.2 s) so the bundle outlasts it even on a fast worker
    dispatcher = CeleryDispatcher(group=f"g-{uuid.uuid4().hex[:6]}", timeout_s=0.2, max_in_flight_orders=20)
    box, stop = _queue_sampler("ehr-worker")
    rounds = 0
    try:
        while rounds < 600:
            rounds += 1
            (outcome,) = dispatcher([inc], keepalive=lambda: None)
            if outcome.status != "retry":
                break
            assert outcome.retry_kind == "busy"
    finally:
        stop.set()
    assert outcome.status == "done" and rounds > 1
    assert sorted(r["order"] for r in outcome.results) == sorted(f"ServiceRequest/{i}" for i in ids)
    assert {r["status"] for r in outcome.results} == {"no_suggestion"}
    runs = app.backend.client.mget([f"ehrw:runs:{task_id_for(dispatcher.group, inc, i)}" for i in ids])
    assert [int(r) for r in runs] == [1] * len(ids)  # each order ran once, over all those rounds
    assert dispatcher.max_outstanding_seen <= 20 and box["max"] <= 20
    dispatcher.finished([inc])
    assert app.backend.client.exists(f"ehrw:sent:{task_id_for(dispatcher.group, inc, ids[0])}") == 0


def test_a_sent_task_that_no_worker_took_is_sent_again_in_seconds_not_after_its_marker_expires(
    services, celery_worker
):
    """The fault suite's worker-parent row stalled for 7.5 minutes: the worker was SIGKILLed while
    Redis's answer to its BRPOP was on the wire, so the task was in neither the queue nor Redis's
    unacknowledged set, and the order's sent marker (visibility + hard limit + margin) kept every
    re-dispatch waiting for it. Here the marker names a task that never reaches a worker (a consumer
    killed between marking and sending, or a worker killed as it took the task: either way the task is
    neither queued nor received)."""
    from workers.app import app
    from workers.dispatch import CeleryDispatcher, task_id_for

    client = app.backend.client
    dispatcher = CeleryDispatcher(group=f"g-{uuid.uuid4().hex[:6]}", timeout_s=2.0, marker_ttl_s=3600, lost_after_s=3.0)
    inc = _incoming(11, _lab_order(f"lab-{uuid.uuid4().hex[:6]}"))
    tid = task_id_for(dispatcher.group, inc, inc.event.items[0].order_id)
    lost_batch = f"ehrw-b-{uuid.uuid4().hex}"
    client.set(f"ehrw:sent:{tid}", lost_batch.encode(), ex=3600)
    started = time.monotonic()
    while time.monotonic() - started < 60:
        (outcome,) = dispatcher([inc], keepalive=lambda: None)
        if outcome.status != "retry":
            break
        assert outcome.retry_kind == "busy"
    assert outcome.status == "done", outcome
    assert time.monotonic() - started < 45
    assert client.get(f"ehrw:sent:{tid}") != lost_batch.encode()  # taken over by the batch that ran
    assert int(client.get(f"ehrw:runs:{tid}")) == 1


def test_a_task_queued_with_no_worker_running_is_not_sent_twice(services, local_stack, worker_env):
    """The other side of the lost-task rule: with no worker on the queue, a sent task waits there
    (the queue is not empty), so the dispatcher never takes it for lost and never queues a copy;
    the worker started later runs it once."""
    from workers.app import app
    from workers.dispatch import CeleryDispatcher, task_id_for
    from workers.lost_tasks import received_key

    queue = f"ehrw-idle-{uuid.uuid4().hex[:6]}"
    client = app.backend.client
    dispatcher = CeleryDispatcher(group=f"g-{uuid.uuid4().hex[:6]}", timeout_s=2.0, lost_after_s=1.0, queue=queue)
    inc = _incoming(12, _lab_order(f"lab-{uuid.uuid4().hex[:6]}"))
    for _ in range(6):  # 12 s, long past lost_after_s and the 5 s marker check
        (outcome,) = dispatcher([inc], keepalive=lambda: None)
        assert outcome.status == "retry" and outcome.reason_code == "still_running"
    assert client.llen(queue) == 1
    worker = local_stack.start_worker(concurrency=1, name="pytest-late", EHRW_CELERY_QUEUE=queue, **worker_env)
    try:
        for _ in range(60):
            (outcome,) = dispatcher([inc], keepalive=lambda: None)
            if outcome.status != "retry":
                break
        assert outcome.status == "done", outcome
    finally:
        worker.stop()
    tid = task_id_for(dispatcher.group, inc, inc.event.items[0].order_id)
    assert int(client.get(f"ehrw:runs:{tid}")) == 1
    assert client.exists(received_key(client.get(f"ehrw:sent:{tid}").decode()))  # the worker's mark


def test_events_with_the_same_key_run_one_after_the_other(services, celery_worker):
    """Defect 8 (ordering): v1, v2, v3 of one order in one batch, worker concurrency 2: each
    version's task starts only after the previous version's finished."""
    from workers.dispatch import CeleryDispatcher

    order_id = f"ord-{uuid.uuid4().hex[:6]}"
    versions = [_lab_order(order_id, meta={"versionId": str(v)}, note=[{"text": f"v{v}"}]) for v in (1, 2, 3)]
    others = [_lab_order(f"other-{uuid.uuid4().hex[:6]}") for _ in range(4)]
    batch = [_incoming(o, doc, key=doc["id"].encode()) for o, doc in enumerate([versions[0], *others, *versions[1:]])]
    events: list[tuple[str, int, float]] = []

    class Recording(CeleryDispatcher):
        def _send(self, tid, inc, item):
            events.append(("sent", id(item), time.monotonic()))
            super()._send(tid, inc, item)

        def _record(self, event, tid, result):
            events.append(("done", id(event.orders[tid]), time.monotonic()))
            return super()._record(event, tid, result)

    outcomes = Recording(group=f"g-{uuid.uuid4().hex[:6]}", max_in_flight_orders=8)(batch, keepalive=lambda: None)
    assert [o.status for o in outcomes] == ["done"] * len(batch)
    items = [batch[i].event.items[0] for i in (0, 5, 6)]
    when = {(kind, ref): t for kind, ref, t in events}
    for earlier, later in itertools.pairwise(items):
        assert when[("done", id(earlier))] <= when[("sent", id(later))]
    # the other orders were not held back: they ran alongside v1
    assert min(when[("sent", id(batch[i].event.items[0]))] for i in (1, 2, 3, 4)) < when[("done", id(items[0]))]


def test_deployment_problems_are_told_apart_from_the_orders_own(services, monkeypatch):
    """Defect 5: a wrong base URL (404 on /metadata too) is the deployment's problem and the task
    reports it as such (the consumer pauses, never dead-letters); a missing order on a healthy
    server stays the order's. One classification: the client's FhirConfigurationError (the
    statuses 401/403/408/412 are covered in tests/test_connectors_fhir.py)."""
    from connectors.fhir import FhirConfigurationError
    from workers import tasks

    good = FhirClient(services.fhir_base_url, max_retries=0)
    with pytest.raises(FhirPermanentError) as missing:
        good.read("ServiceRequest/does-not-exist-42")
    assert missing.value.status == 404
    wrong = FhirClient(services.fhir_base_url.replace("/fhir", "/wrong-base"), max_retries=0)
    with pytest.raises(FhirConfigurationError):
        wrong.read("ServiceRequest/does-not-exist-42")

    monkeypatch.setattr(tasks, "process_models", lambda: None)  # never reached: the read fails first
    payload = {"reference": "ServiceRequest/does-not-exist-42"}
    monkeypatch.setattr(tasks, "process_fhir_client", lambda: wrong)
    assert tasks.suggest(payload)["status"] == tasks.STATUS_DEPLOYMENT
    monkeypatch.setattr(tasks, "process_fhir_client", lambda: good)
    result = tasks.suggest(payload)
    assert (result["status"], result["reason_code"]) == ("rejected", "order_not_found")
