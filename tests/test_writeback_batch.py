"""Micro-batched write-back (issue 13): several orders in one FHIR transaction, each order
all-or-nothing and idempotent, and one refused order never blocking the others.

The models are the tiny test registry's (real ONNX), the FHIR server is sekmet. To make sekmet
refuse one order's part of a transaction (it accepts everything this worker builds), the client
below adds a field the FHIR structure does not have to that order's Task on its way out, after
the worker validated it: the server's own structural check refuses it with 400.
"""

from __future__ import annotations

import copy
import uuid

import pytest

from connectors.fhir import FhirClient
from schemas.events import OrderItem
from schemas.writeback_batch import combine_transactions, split_response
from workers.pipeline import suggest_for_orders
from workers.tasks import load_models


def _imaging_order(order_id: str) -> dict:
    return {
        "resourceType": "ServiceRequest", "id": order_id, "status": "active", "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}],
        "code": {"text": "CT head"}, "reasonCode": [{"text": "headache after a fall, r/o bleed"}],
    }  # fmt: skip


def _bundle(order: str, device: str) -> dict:
    def entry(rtype: str, url: str) -> dict:
        return {"fullUrl": url, "resource": {"resourceType": rtype}, "request": {"method": "POST", "url": rtype}}

    return {"resourceType": "Bundle", "type": "transaction", "identifier": {"system": "s", "value": order},
            "entry": [entry("Device", device), entry("Task", f"urn:uuid:task-{order}")]}  # fmt: skip


def test_shared_entries_are_sent_once_and_each_order_gets_its_part_back():
    combined = combine_transactions([_bundle("a", "urn:uuid:dev"), _bundle("b", "urn:uuid:dev")])
    urls = [e["fullUrl"] for e in combined.bundle["entry"]]
    assert urls == ["urn:uuid:dev", "urn:uuid:task-a", "urn:uuid:task-b"]
    assert combined.positions == [[0, 1], [0, 2]]
    response = {"entry": [{"response": {"status": "201 Created", "location": f"X/{i}/_history/1"}} for i in range(3)]}
    a, b = split_response(combined, response)
    assert [e["response"]["status"] for e in a["entry"]] == ["201 Created", "201 Created"]
    # the shared Device counts as created for the first order only
    assert [e["response"]["status"] for e in b["entry"]] == ["200 OK", "201 Created"]
    assert [e["response"]["location"] for e in b["entry"]] == ["X/0/_history/1", "X/2/_history/1"]
    with pytest.raises(ValueError):
        split_response(combined, {"entry": response["entry"][:2]})


class CountingClient(FhirClient):
    """The real client; counts transactions and, for ``poisoned`` order ids, adds an unknown field
    to that order's Task in every transaction that holds it (the server refuses the transaction)."""

    def __init__(self, *args, poisoned: frozenset[str] = frozenset(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poisoned = poisoned
        self.transactions: list[int] = []  # entries per transaction posted

    def transaction(self, bundle: dict) -> dict:
        bundle = copy.deepcopy(bundle)
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") or {}
            focus = ((resource.get("focus") or {}).get("reference") or "").split("/")
            if resource.get("resourceType") == "Task" and len(focus) > 1 and focus[1] in self.poisoned:
                resource["notAnR4Element"] = True
        self.transactions.append(len(bundle.get("entry") or []))
        return super().transaction(bundle)


@pytest.fixture(scope="module")
def models(tiny_registry):
    from workers.settings import Settings

    return load_models(Settings(model_registry=tiny_registry))


@pytest.mark.services
def test_a_batch_is_one_transaction_idempotent_and_a_refused_order_fails_alone(services, models):
    ids = [f"mb-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
    items = [(OrderItem(service_request=_imaging_order(i)), None) for i in ids]

    fhir = CountingClient(services.fhir_base_url, max_retries=0)
    outcomes = suggest_for_orders(items, fhir, models, enrich_context=False)
    assert [o["status"] for o in outcomes] == ["written"] * 4
    assert len(fhir.transactions) == 1  # four orders, one transaction
    assert all(o["created"] > 0 for o in outcomes)
    for order_id, outcome in zip(ids, outcomes):
        tasks = fhir.search("Task", {"focus": f"ServiceRequest/{order_id}"})
        assert [f"Task/{t['id']}" for t in tasks] == outcome["resources"]["Task"]

    again = suggest_for_orders(items, fhir, models, enrich_context=False)  # a replay: nothing new
    assert [o["status"] for o in again] == ["written"] * 4
    assert [o["created"] for o in again] == [0] * 4
    assert [o["resources"]["Task"] for o in again] == [o["resources"]["Task"] for o in outcomes]

    fresh = [f"mb-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    poisoned = CountingClient(services.fhir_base_url, max_retries=0, poisoned=frozenset({fresh[1]}))
    mixed = suggest_for_orders([(OrderItem(service_request=_imaging_order(i)), None) for i in fresh],
                               poisoned, models, enrich_context=False)  # fmt: skip
    assert [o["status"] for o in mixed] == ["written", "rejected", "written"]
    assert mixed[1]["reason_code"] == "fhir_rejected_writeback"
    assert len(poisoned.transactions) == 4  # the batch (refused), then each order alone
    # all-or-nothing: the refused order left nothing behind, the others one Task each
    counts = [len(fhir.search("Task", {"focus": f"ServiceRequest/{i}"})) for i in fresh]
    assert counts == [1, 0, 1]


def test_the_fast_schema_check_agrees_with_the_python_validator():
    """schemas.validation's jsonschema-rs fast path only ever says "valid" where the Python
    validator does (it decides every resource the fast path calls invalid)."""
    from schemas.validation import _fast_validator, _validator

    fast = _fast_validator()
    if fast is None:
        pytest.skip("jsonschema-rs not installed")
    task = {"resourceType": "Task", "status": "requested", "intent": "proposal", "for": {"reference": "Patient/p1"}}
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"fullUrl": "urn:uuid:1", "resource": task, "request": {"method": "POST", "url": "Task"}}]}  # fmt: skip
    cases = [
        task, bundle,
        {**task, "status": "not-a-status"}, {**task, "notAnElement": 1}, {**task, "resourceType": "NoSuchType"},
        {**task, "for": {"reference": 5}}, {**task, "authoredOn": "yesterday"}, {"status": "requested"},
        {**bundle, "entry": [{**bundle["entry"][0], "resource": {**task, "intent": "bogus"}}]},
        {**bundle, "entry": [{**bundle["entry"][0], "resource": {**task, "resourceType": "Nope"}}]},
    ]  # fmt: skip
    for case in cases:
        assert fast.is_valid(case) == _validator().is_valid(case), case
