"""schemas.writeback and schemas.validation: suggestion Bundles that validate against the official
R4 JSON schema and the fhir.resources R4B models, carry AIAST, and are idempotent."""

from __future__ import annotations

import copy
import importlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from schemas.catalog import OMIM_SYSTEM, ORPHA_SYSTEM, PROTOCOL_SYSTEM
from schemas.labels import ModelOutput, Prediction
from schemas.validation import r4_schema_errors
from schemas.writeback import (
    AIAST,
    DEVICE_IDENTIFIER_SYSTEM,
    IDENTIFIER_SYSTEM,
    NO_CONFIDENT_PROTOCOL,
    PROVENANCE_TAG_SYSTEM,
    build_writeback_bundle,
    suggestion_codesystem,
    suggestion_identifier,
)

EXAMPLES = Path(__file__).resolve().parent / "data" / "fhir-r4-examples"
RECORDED = datetime(2026, 3, 1, 12, 30, 0, tzinfo=timezone.utc)
RECORDED_TEXT = "2026-03-01T12:30:00.000Z"
VERSION = "2026.03.01-1"
ALTERNATIVE_PAIR = ["alternative-protocol", "alternative-protocol-probability"]


def order(**fields) -> dict:
    base = {
        "resourceType": "ServiceRequest",
        "id": "sr-42",
        "meta": {"versionId": "7", "lastUpdated": "2026-03-01T12:00:00Z"},
        "status": "active",
        "intent": "order",
        "priority": "urgent",
        "code": {"text": "CT abdomen"},
        "subject": {"reference": "Patient/p1", "display": "Jane Example"},
        "encounter": {"reference": "Encounter/e1"},
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def protocol_output(abstained: bool = False, version: str = VERSION) -> ModelOutput:
    ranked = [
        ("CT-ABDPEL-W", "CT abdomen and pelvis with contrast", 0.31 if abstained else 0.87654),
        ("US-RUQ", "US right upper quadrant", 0.2),
        ("CT-ABDPEL-WO-STONE", "CT abdomen and pelvis without contrast renal stone protocol", 0.1),
    ]
    return ModelOutput(
        task="protocol",
        model="ehrw-protocol",
        model_version=version,
        abstained=abstained,
        predictions=[Prediction(PROTOCOL_SYSTEM, code, display, p) for code, display, p in ranked],
        threshold=0.35,
        model_card_url=f"https://models.example.org/ehrw-protocol/{version}/MODEL_CARD.md",
    )


def diagnosis_output(abstained: bool = False) -> ModelOutput:
    return ModelOutput(
        task="diagnosis",
        model="ehrw-diagnosis",
        model_version=VERSION,
        abstained=abstained,
        predictions=[
            Prediction(OMIM_SYSTEM, "154700", "Marfan syndrome", 0.12 if abstained else 0.61),
            Prediction(ORPHA_SYSTEM, "558", "Marfan syndrome", 0.1),
        ],
        threshold=0.3,
    )


def build(protocol=None, diagnosis=None, sr=None, recorded=RECORDED) -> dict:
    return build_writeback_bundle(sr or order(), protocol, diagnosis, recorded=recorded)


def resources(bundle: dict) -> list[dict]:
    return [e["resource"] for e in bundle.get("entry", [])]


def of_type(bundle: dict, resource_type: str) -> list[dict]:
    return [r for r in resources(bundle) if r["resourceType"] == resource_type]


def entry_of(bundle: dict, resource_type: str, model: str | None = None) -> dict:
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] != resource_type:
            continue
        if model is None or resource["deviceName"][0]["name"] == model:
            return entry
    raise AssertionError(f"no {resource_type} entry")


def key_of(resource: dict) -> str:
    return resource["identifier"][0]["value"]


def r4b_validate(resource: dict) -> None:
    module = importlib.import_module(f"fhir.resources.R4B.{resource['resourceType'].lower()}")
    getattr(module, resource["resourceType"]).model_validate(resource)


# --------------------------------------------------------------------------- validity


@pytest.mark.parametrize(
    ("protocol", "diagnosis"),
    [(False, False), (True, False), (False, True), (True, True), (None, False)],
    ids=["both", "protocol-abstained", "diagnosis-abstained", "both-abstained", "diagnosis-only"],
)
def test_bundle_is_valid_r4_and_r4b(protocol, diagnosis):
    bundle = build(None if protocol is None else protocol_output(protocol), diagnosis_output(diagnosis))
    assert r4_schema_errors(bundle) == []
    r4b_validate(bundle)
    for resource in resources(bundle):
        assert r4_schema_errors(resource) == [], resource["resourceType"]
        r4b_validate(resource)
    assert json.loads(json.dumps(bundle)) == bundle  # plain JSON


def test_every_resource_is_labelled_ai_asserted():
    bundle = build(protocol_output(), diagnosis_output())
    kinds = {r["resourceType"] for r in resources(bundle)}
    assert kinds == {"Device", "Task", "RiskAssessment", "Provenance"}
    assert AIAST == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "AIAST",
        "display": "artificial intelligence asserted",
    }
    for resource in [bundle, *resources(bundle)]:
        assert AIAST in resource["meta"]["security"]


def test_entries_are_conditional_creates_with_urn_uuids():
    bundle = build(protocol_output(), diagnosis_output())
    assert bundle["type"] == "transaction"
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(full_urls)) == len(full_urls) and all(u.startswith("urn:uuid:") for u in full_urls)
    for entry in bundle["entry"]:
        assert entry["request"]["method"] == "POST"
        assert entry["request"]["url"] == entry["resource"]["resourceType"]
    task = entry_of(bundle, "Task")
    assert task["request"]["ifNoneExist"] == f"identifier={IDENTIFIER_SYSTEM}|{key_of(task['resource'])}"
    risk = entry_of(bundle, "RiskAssessment")
    risk_tag = {"system": PROVENANCE_TAG_SYSTEM, "code": key_of(risk["resource"])}
    assert risk["resource"]["meta"]["tag"] == [risk_tag]
    assert risk["request"]["ifNoneExist"] == f"_tag={PROVENANCE_TAG_SYSTEM}|{key_of(risk['resource'])}"
    provenance = entry_of(bundle, "Provenance")
    tag = provenance["resource"]["meta"]["tag"][0]
    assert tag["system"] == PROVENANCE_TAG_SYSTEM and "identifier" not in provenance["resource"]
    assert provenance["request"]["ifNoneExist"] == f"_tag={PROVENANCE_TAG_SYSTEM}|{tag['code']}"
    devices = {key_of(d): d for d in of_type(bundle, "Device")}
    assert sorted(devices) == [f"ehrw-diagnosis@{VERSION}", f"ehrw-protocol@{VERSION}"]
    for model in ("ehrw-protocol", "ehrw-diagnosis"):
        entry = entry_of(bundle, "Device", model)
        expected = f"identifier={DEVICE_IDENTIFIER_SYSTEM}|{model}@{VERSION}"
        assert entry["request"]["ifNoneExist"] == expected


# --------------------------------------------------------------------------- content


def test_task_content():
    bundle = build(protocol_output())
    (task,) = of_type(bundle, "Task")
    device_entry = entry_of(bundle, "Device")
    assert (task["status"], task["intent"], task["priority"]) == ("requested", "proposal", "urgent")
    assert task["code"]["text"] == "Protocol the imaging order"
    assert task["focus"] == {"reference": "ServiceRequest/sr-42/_history/7"}
    assert task["for"] == {"reference": "Patient/p1"}  # no patient name copied
    assert task["encounter"] == {"reference": "Encounter/e1"}
    assert task["authoredOn"] == RECORDED_TEXT
    assert task["requester"] == {"reference": device_entry["fullUrl"]}
    assert task["businessStatus"]["text"] == "Protocol suggested"
    types = [i["type"]["text"] for i in task["input"]]
    assert types == ["suggested-protocol", "suggested-protocol-probability"] + ALTERNATIVE_PAIR * 2
    assert task["input"][0]["valueCodeableConcept"]["coding"] == [
        {"system": PROTOCOL_SYSTEM, "code": "CT-ABDPEL-W", "display": "CT abdomen and pelvis with contrast"}
    ]
    assert task["input"][1]["valueDecimal"] == 0.8765
    assert [i["valueDecimal"] for i in task["input"][3::2]] == [0.2, 0.1]
    device = device_entry["resource"]
    assert device["deviceName"][0]["name"] == "ehrw-protocol" and device["version"][0]["value"] == VERSION
    assert "MODEL_CARD.md" in device["note"][0]["text"]


def test_protocol_abstention_still_writes_one_task_with_alternatives():
    bundle = build(protocol_output(abstained=True), diagnosis_output(abstained=True))
    tasks = of_type(bundle, "Task")
    assert len(tasks) == 1 and of_type(bundle, "RiskAssessment") == []
    (task,) = tasks
    assert task["businessStatus"]["text"] == NO_CONFIDENT_PROTOCOL
    assert task["businessStatus"]["coding"][0]["code"] == "no-confident-suggestion"
    types = [i["type"]["text"] for i in task["input"]]
    assert "suggested-protocol" not in types and types == ALTERNATIVE_PAIR * 3
    assert [d["deviceName"][0]["name"] for d in of_type(bundle, "Device")] == ["ehrw-protocol"]


def test_risk_assessment_content():
    bundle = build(None, diagnosis_output(), sr=order(meta=None))
    (risk,) = of_type(bundle, "RiskAssessment")
    assert of_type(bundle, "Task") == []
    assert risk["status"] == "preliminary"
    assert risk["basis"] == [{"reference": "ServiceRequest/sr-42"}]  # no versionId known
    assert risk["subject"] == {"reference": "Patient/p1"}
    assert risk["performer"] == {"reference": entry_of(bundle, "Device")["fullUrl"]}
    assert risk["occurrenceDateTime"] == RECORDED_TEXT
    assert risk["method"]["coding"][0]["code"] == "ehrw-diagnosis"
    predictions = [
        (p["outcome"]["coding"][0]["system"], p["outcome"]["coding"][0]["code"], p["probabilityDecimal"])
        for p in risk["prediction"]
    ]
    assert predictions == [(OMIM_SYSTEM, "154700", 0.61), (ORPHA_SYSTEM, "558", 0.1)]


def test_provenance_names_the_devices_and_targets_the_suggestions():
    bundle = build(protocol_output(), diagnosis_output())
    (prov,) = of_type(bundle, "Provenance")
    targets = [entry_of(bundle, "Task")["fullUrl"], entry_of(bundle, "RiskAssessment")["fullUrl"]]
    assert [t["reference"] for t in prov["target"]] == targets
    devices = [entry_of(bundle, "Device", m)["fullUrl"] for m in ("ehrw-protocol", "ehrw-diagnosis")]
    assert [a["who"]["reference"] for a in prov["agent"]] == devices
    assert all(a["type"]["coding"][0]["code"] == "author" for a in prov["agent"])
    assert prov["entity"] == [{"role": "source", "what": {"reference": "ServiceRequest/sr-42/_history/7"}}]
    assert prov["activity"]["coding"][0]["code"] == "CREATE" and prov["recorded"] == RECORDED_TEXT


def test_nothing_to_write_gives_a_bundle_without_entries():
    for diagnosis in (None, diagnosis_output(abstained=True)):
        bundle = build(None, diagnosis)
        assert "entry" not in bundle and r4_schema_errors(bundle) == []


def test_refuses_orders_it_cannot_reference():
    with pytest.raises(ValueError):
        build(protocol_output(), sr=order(subject={"display": "x"}))
    with pytest.raises(ValueError):
        build(protocol_output(), sr=order(id=None))


# --------------------------------------------------------------------------- idempotency


def test_deterministic_except_recorded():
    first = build(protocol_output(), diagnosis_output())
    assert first == build(protocol_output(), diagnosis_output(), sr=copy.deepcopy(order()))
    later = build(protocol_output(), diagnosis_output(), recorded=RECORDED + timedelta(hours=1))
    assert [e["fullUrl"] for e in later["entry"]] == [e["fullUrl"] for e in first["entry"]]
    assert [e["request"] for e in later["entry"]] == [e["request"] for e in first["entry"]]


def test_naive_recorded_is_utc_and_default_is_now():
    naive = build(protocol_output(), recorded=datetime(2026, 3, 1, 12, 30))
    assert of_type(naive, "Task")[0]["authoredOn"] == RECORDED_TEXT
    assert of_type(build(protocol_output(), recorded=None), "Task")[0]["authoredOn"].endswith("Z")


def test_suggestion_identifier():
    key = suggestion_identifier(order(), "ehrw-protocol", "1")
    touched = order(meta={"versionId": "7", "lastUpdated": "2030-01-01T00:00:00Z"})
    assert key == suggestion_identifier(touched, "ehrw-protocol", "1")
    different = {
        suggestion_identifier(order(meta={"versionId": "8"}), "ehrw-protocol", "1"),
        suggestion_identifier(order(id="sr-43"), "ehrw-protocol", "1"),
        suggestion_identifier(order(), "ehrw-protocol", "2"),
        suggestion_identifier(order(), "ehrw-diagnosis", "1"),
    }
    assert key not in different and len(different) == 4
    # no versionId: the content decides, and meta does not
    content_key = suggestion_identifier(order(meta=None), "m", "1")
    assert content_key == suggestion_identifier(order(meta={"lastUpdated": "2031-01-01T00:00:00Z"}), "m", "1")
    assert content_key != suggestion_identifier(order(meta=None, note=[{"text": "edited"}]), "m", "1")
    assert content_key != suggestion_identifier(order(), "m", "1")


def test_each_resource_keyed_by_its_own_model_and_provenance_by_both():
    both = build(protocol_output(), diagnosis_output())
    task_key = key_of(of_type(both, "Task")[0])
    risk_key = key_of(of_type(both, "RiskAssessment")[0])
    assert task_key == suggestion_identifier(order(), "ehrw-protocol", VERSION)
    assert risk_key == suggestion_identifier(order(), "ehrw-diagnosis", VERSION)
    protocol_only = build(protocol_output())
    tags = {of_type(b, "Provenance")[0]["meta"]["tag"][0]["code"] for b in (both, protocol_only)}
    assert len(tags) == 2 and not tags & {task_key, risk_key}
    new_model = build(protocol_output(version="2026.04.01-1"))
    assert key_of(of_type(new_model, "Task")[0]) != task_key


def test_suggestion_codesystem_is_valid():
    codesystem = suggestion_codesystem()
    assert r4_schema_errors(codesystem) == []
    r4b_validate(codesystem)


def test_replayed_bundles_create_nothing_twice_on_a_real_fhir_server(tmp_path):
    """The ifNoneExist queries and urn:uuid references as a FHIR server reads them: sekmet (the
    FHIR server of the tests and the demo), in process."""
    pytest.importorskip("sekmet")
    from fastapi.testclient import TestClient
    from sekmet.config import Settings
    from sekmet.main import create_app

    settings = Settings(
        base_url="http://testserver/fhir", data_dir=str(tmp_path), simulator={"enabled": False}
    )
    client = TestClient(create_app(settings))

    def post(bundle: dict) -> list[str]:
        response = client.post("/fhir", json=bundle)
        assert response.status_code == 200, response.text
        return [e["response"]["status"].split()[0] for e in response.json()["entry"]]

    def total(resource_type: str) -> int:
        return client.get(f"/fhir/{resource_type}").json()["total"]

    bundle = build(protocol_output(), diagnosis_output())
    assert post(bundle) == ["201"] * 5
    assert post(bundle) == ["200"] * 5  # a replay finds everything already written
    assert [total(t) for t in ("Device", "Task", "RiskAssessment", "Provenance")] == [2, 1, 1, 1]
    (provenance,) = [e["resource"] for e in client.get("/fhir/Provenance").json()["entry"]]
    assert [t["reference"].split("/")[0] for t in provenance["target"]] == ["Task", "RiskAssessment"]
    assert all(a["who"]["reference"].startswith("Device/") for a in provenance["agent"])
    # a new model version is a new suggestion, from a new Device
    assert post(build(protocol_output(version="2026.04.01-1"))) == ["201"] * 3


# --------------------------------------------------------------------------- the R4 schema validator itself


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_official_examples_pass_the_r4_schema(path):
    assert r4_schema_errors(json.loads(path.read_text())) == []


def test_invalid_resources_fail_without_echoing_values():
    task = json.loads((EXAMPLES / "Task-example1.json").read_text())
    secret = "Zebediah-Quuxworth"
    task.update(status=secret, unknownElement=secret, authoredOn=secret)
    task["input"] = [{"type": {"text": "x"}, "valueDecimal": secret}]
    task["for"] = {"reference": 5}
    task["contained"] = [{"resourceType": "NotAResource"}]
    errors = r4_schema_errors(task)
    assert any(e.startswith("$.status: enum") for e in errors)
    assert any(e.startswith("$: additionalProperties") and "unknownElement" in e for e in errors)
    assert any(e.startswith("$.authoredOn: pattern") for e in errors)
    assert any(e.startswith("$.for.reference: type") for e in errors)
    assert any(e.startswith("$.input[0].valueDecimal: type") for e in errors)
    assert any(e.startswith("$.contained[0].resourceType") for e in errors)
    assert not any(secret in e for e in errors)
    assert r4_schema_errors({"resourceType": "Nope"}) and r4_schema_errors([]) and r4_schema_errors({})
    bad_entry = {"resource": {"resourceType": "Task", "status": "bogus"}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [bad_entry]}
    assert r4_schema_errors(bundle) == ["$.entry[0].resource.status: enum (not an allowed code)"]


# -- outgoing Bundles are schema-checked (issue 8, defect 12) ---------------------------------------


@pytest.mark.parametrize("code", ["", "two  spaces", " lead"])
def test_a_bundle_breaking_r4_is_refused_before_it_is_sent(code):
    from schemas.writeback import WritebackSchemaError

    broken = ModelOutput(
        task="protocol",
        model="protocol-test",
        model_version=VERSION,
        abstained=False,
        predictions=[Prediction(PROTOCOL_SYSTEM, code, "CT head", 0.9)],
    )
    with pytest.raises(WritebackSchemaError) as err:
        build(protocol=broken)
    message = str(err.value)
    assert "not valid FHIR R4" in message and "valueCodeableConcept.coding[0].code: pattern" in message
    assert "CT head" not in message

def test_abstention_lists_the_top_three_and_another_exam_is_flagged_not_substituted():
    from dataclasses import replace

    output = protocol_output(abstained=True)
    output.predictions.append(Prediction(PROTOCOL_SYSTEM, "CT-CHEST-W", "CT chest with contrast", 0.05))
    other = Prediction(PROTOCOL_SYSTEM, "US-RUQ", "US right upper quadrant", 0.8)
    bundle = build(replace(output, alternative=other), None)
    (task,) = of_type(bundle, "Task")
    types = [i["type"]["text"] for i in task["input"]]
    assert types == ALTERNATIVE_PAIR * 3 + ["indication-suggests-other-exam", "indication-suggests-other-exam-probability"]
    flagged = task["input"][-2]["valueCodeableConcept"]["coding"][0]
    assert flagged["code"] == "US-RUQ" and task["input"][-1]["valueDecimal"] == 0.8
    assert any("another exam" in n["text"] for n in task["note"])
    # a confident suggestion keeps the ordered exam's protocol first
    bundle = build(replace(protocol_output(), alternative=other), None)
    (task,) = of_type(bundle, "Task")
    assert task["input"][0]["type"]["text"] == "suggested-protocol"
    assert task["input"][0]["valueCodeableConcept"]["coding"][0]["code"] == "CT-ABDPEL-W"
