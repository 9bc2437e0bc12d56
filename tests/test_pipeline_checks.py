"""workers.pipeline's checks on what comes in from and goes out to the FHIR server (issue 8).

- An order fetched for a CloudEvent / id-only notification is validated exactly like an inline
  one: a poison order the server hands back becomes a ``rejected`` outcome, never an exception
  (before: KeyError / RecursionError in the task, retried forever). sekmet refuses to store these
  orders, so the chaos lab's fault proxy in front of it plays the hospital's more lenient server.
- Every outgoing write-back Bundle is checked against the R4 schema before it is sent (sekmet, like
  production servers, stores invalid codes): a model label that breaks R4 is refused, not written.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from connectors.embedded import free_port
from connectors.fhir import FhirClient
from schemas.catalog import PROTOCOL_SYSTEM
from schemas.events import OrderItem
from schemas.labels import ModelOutput, Prediction
from workers.chaos_proxy import FaultProxy, poisoned_order
from workers.pipeline import ModelSet, suggest_for_order

pytestmark = pytest.mark.services


class NotToBeCalled:
    def predict(self, texts, top_k=5):
        raise AssertionError("a rejected order must not reach the models")


class FixedOutput:
    """A model answering one fixed output: the only way to make a model emit a label that breaks
    R4 (a real model's labels come from the catalog and are valid)."""

    def __init__(self, output: ModelOutput) -> None:
        self.output = output

    def predict(self, texts, top_k=5):
        return [self.output for _ in texts]


def _order(order_id: str, **extra) -> dict:
    return {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "meta": {"versionId": "1"},
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        **extra,
    }


POISON = {
    "medicinal": _order("medicinal", contained=[{"resourceType": "MedicinalProduct", "id": "m"}]),
    "deep": poisoned_order("deep"),  # an extension nested 150 deep
    "typed": _order("typed", contained=[{"resourceType": ["Patient"]}]),
    "other": _order("someone-else"),  # the server answers with another order
}


@pytest.fixture(scope="module")
def lenient_server(fhir_base) -> Iterator[str]:
    proxy = FaultProxy(fhir_base, free_port()).start()
    proxy.poison(POISON)  # reads of these orders answer the poison; everything else reaches sekmet
    yield proxy.base_url
    proxy.stop()


@pytest.mark.parametrize(
    "name, code",
    [
        ("medicinal", "invalid_structure"),
        ("deep", "too_deeply_nested"),
        ("typed", "invalid_structure"),
        ("other", "invalid_structure"),
    ],
)
def test_a_poison_order_fetched_by_reference_is_rejected_not_raised(lenient_server, name, code):
    models = ModelSet(protocol=NotToBeCalled(), diagnosis=NotToBeCalled())
    with FhirClient(lenient_server, max_retries=0) as fhir:
        outcome = suggest_for_order(OrderItem(reference=f"ServiceRequest/{name}"), fhir, models)
    assert outcome["status"] == "rejected" and outcome["reason_code"] == code, outcome
    assert outcome["order"] == f"ServiceRequest/{name}"


@pytest.fixture(scope="module")
def sekmet(fhir_base) -> Iterator[FhirClient]:
    with FhirClient(fhir_base, max_retries=1) as client:
        yield client


def test_an_invalid_write_back_is_refused_before_it_reaches_the_server(sekmet):
    broken = ModelOutput(
        task="protocol",
        model="protocol-test",
        model_version="1",
        abstained=False,
        predictions=[Prediction(PROTOCOL_SYSTEM, "", "CT head", 0.9)],  # an empty code is not R4
    )
    order_id = uuid.uuid4().hex[:16]
    sr = sekmet.put(_order(order_id, code={"text": "CT head without contrast"}, category=[{"text": "Imaging"}]))
    models = ModelSet(protocol=FixedOutput(broken), diagnosis=NotToBeCalled())
    outcome = suggest_for_order(OrderItem(service_request=sr), sekmet, models, enrich_context=False)
    assert outcome["status"] == "rejected" and outcome["reason_code"] == "invalid_writeback", outcome
    assert "not valid FHIR R4" in outcome["reason"]
    assert sekmet.count("Task", {"focus": f"ServiceRequest/{order_id}/_history/1"}) == 0
