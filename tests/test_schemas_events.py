"""schemas.events: the four event shapes, every rejection code, and no PHI in rejection messages."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import pytest

from schemas.events import (
    REASON_CODES,
    EventRejected,
    OrderItem,
    parse_event,
    skip_reason,
    validate_service_request,
)

REPO = Path(__file__).resolve().parent.parent
HL7 = REPO / "workers" / "fixtures" / "hl7"

# Expected outcome per official HL7 example: "item", a skip reason, or a rejection code.
HL7_EXPECTED = {
    "ambulation": "status_completed",
    "appendectomy-narrative": "missing_subject",  # subject has a display only
    "benchpress": "intent_plan",
    "colon-biopsy": "status_completed",
    "colonoscopy": "status_completed",
    "di": "item",
    "do-not-turn": "do_not_perform",
    "education": "missing_subject",
    "example-implant": "status_completed",
    "example-pgx": "item",
    "example": "status_completed",
    "ft4": "item",
    "lipid": "item",
    "myringotomy": "item",
    "ob": "missing_subject",
    "og-example1": "item",
    "physical-therapy": "status_completed",
    "physiotherapy": "status_completed",
    "subrequest": "item",
    "vent": "status_completed",
}

PHI = "Zebediah Quuxworth-Plimsoll"  # a name/note no message may ever contain
GOOGLE_NAME = "projects/p/locations/l/datasets/d/fhirStores/s/fhir/ServiceRequest/123"


def sr(**overrides) -> dict:
    base = {
        "resourceType": "ServiceRequest",
        "id": "sr-1",
        "status": "active",
        "intent": "order",
        "code": {"text": "CT abdomen"},
        "subject": {"reference": "Patient/p1", "display": PHI},
        "note": [{"text": f"{PHI} has RLQ pain"}],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def raw(doc) -> bytes:
    return json.dumps(doc).encode()


def rejected(value: bytes) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        parse_event(value)
    return info.value


def bundle_of(*resources: dict, bundle_type: str = "collection") -> dict:
    return {"resourceType": "Bundle", "type": bundle_type, "entry": [{"resource": r} for r in resources]}


def notification(kind: str, entries: list[dict] | None = None, extra: list[dict] | None = None) -> dict:
    status = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": "Subscription/orders"}},
            {"name": "topic", "valueCanonical": "http://example.org/topic/service-request"},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": kind},
            *(extra or []),
        ],
    }
    first = {"fullUrl": "urn:uuid:1", "resource": status}
    return {"resourceType": "Bundle", "type": "history", "entry": [first, *(entries or [])]}


# --------------------------------------------------------------------------- HL7 examples


@pytest.mark.parametrize("name", sorted(HL7_EXPECTED))
def test_hl7_examples(name):
    value = (HL7 / f"ServiceRequest-{name}.json").read_bytes()
    expected = HL7_EXPECTED[name]
    if expected in REASON_CODES:
        exc = rejected(value)
        assert exc.code == expected
        assert name in exc.message  # the id names the order
        return
    event = parse_event(value)
    if expected == "item":
        assert [i.order_id for i in event.items] == [name] and event.skipped == []
        assert event.items[0].service_request["id"] == name
    else:
        assert event.items == [] and event.skipped == [(name, expected)]


def test_hl7_examples_in_one_collection_bundle_reject_as_a_whole():
    resources = [json.loads(p.read_text()) for p in sorted(HL7.glob("ServiceRequest-*.json"))]
    assert len(resources) == 20
    exc = rejected(raw(bundle_of(*resources)))
    assert exc.code == "missing_subject" and "Bundle.entry[" in exc.message

    valid = [r for r in resources if HL7_EXPECTED[r["id"]] not in REASON_CODES]
    event = parse_event(raw(bundle_of(*valid)))
    expected_items = sorted(k for k, v in HL7_EXPECTED.items() if v == "item")
    assert sorted(i.order_id for i in event.items) == expected_items
    assert len(event.skipped) == len(valid) - len(event.items)


# --------------------------------------------------------------------------- rejection codes


def test_not_utf8():
    exc = rejected(b'{"resourceType": "\xff\xfe"}')
    assert exc.code == "not_utf8" and "offset 18" in exc.message


def test_not_json_names_the_position():
    exc = rejected(b'{"resourceType": "ServiceRequest",, }')
    assert exc.code == "not_json" and "line 1 column" in exc.message


def test_truncated_bundle_bytes():
    value = raw({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": sr()}]})
    exc = rejected(value[:-7])
    assert exc.code == "not_json" and "Unterminated string" in exc.message and "(char " in exc.message
    assert PHI not in str(exc)


@pytest.mark.parametrize("value", [b'{"a": NaN}', b'{"status": "active", "status": "completed"}'])
def test_not_json_variants(value):
    assert rejected(value).code == "not_json"


@pytest.mark.parametrize("value", [b"[1, 2]", b'"ServiceRequest"', b"42", b"null"])
def test_not_an_object(value):
    assert rejected(value).code == "not_an_object"


def test_wrong_resource_type_patient():
    exc = rejected(raw({"resourceType": "Patient", "id": "p1", "name": [{"text": PHI}]}))
    assert exc.code == "unsupported_resource_type" and "'Patient'" in exc.message


def test_unsupported_bundle_type_and_unknown_object():
    assert rejected(raw(bundle_of(sr(), bundle_type="document"))).code == "unsupported_resource_type"
    assert rejected(raw({"hello": "world"})).code == "unsupported_resource_type"


def test_missing_subject():
    for subject in (None, {"display": PHI}, {"reference": ""}, {"identifier": {"system": "urn:x"}}):
        exc = rejected(raw(sr(subject=subject)))
        assert exc.code == "missing_subject" and "sr-1" in exc.message
    # a logical reference (identifier) is enough
    assert parse_event(raw(sr(subject={"identifier": {"system": "urn:mrn", "value": "123"}}))).items


def test_invalid_status_names_the_value():
    exc = rejected(raw(sr(status="bogus")))
    assert exc.code == "invalid_status" and "'bogus'" in exc.message
    assert rejected(raw(sr(status=None))).code == "invalid_status"


def test_invalid_intent_names_the_value():
    exc = rejected(raw(sr(intent="bogus")))
    assert exc.code == "invalid_intent" and "'bogus'" in exc.message


def test_invalid_structure_gives_field_paths():
    exc = rejected(raw(sr(note=[{"text": 42}], authoredOn="yesterday")))
    assert exc.code == "invalid_structure"
    assert "authoredOn" in exc.message and "note[0].text" in exc.message
    assert "yesterday" not in exc.message
    assert rejected(raw(sr(id=None))).code == "invalid_structure"
    assert rejected(raw(sr(id="has spaces"))).code == "invalid_structure"
    not_an_array = {"resourceType": "Bundle", "type": "collection", "entry": {"resource": sr()}}
    assert rejected(raw(not_an_array)).code == "invalid_structure"
    no_type = {"resourceType": "Bundle", "entry": [{"resource": sr()}]}
    assert rejected(raw(no_type)).code == "invalid_structure"


def test_bundle_without_service_request():
    patient = {"resourceType": "Patient", "id": "p1"}
    for bundle_type in ("collection", "batch", "transaction", "searchset", "history"):
        exc = rejected(raw({"resourceType": "Bundle", "type": bundle_type, "entry": [{"resource": patient}]}))
        assert exc.code == "no_service_request"
    assert rejected(raw({"resourceType": "Bundle", "type": "collection"})).code == "no_service_request"


def test_bad_notifications():
    assert rejected(raw(notification("bogus"))).code == "invalid_notification"
    no_type = notification("handshake")
    no_type["entry"][0]["resource"]["parameter"] = [
        p for p in no_type["entry"][0]["resource"]["parameter"] if p["name"] != "type"
    ]
    assert rejected(raw(no_type)).code == "invalid_notification"
    no_subscription = notification("heartbeat")
    del no_subscription["entry"][0]["resource"]["parameter"][0]
    assert rejected(raw(no_subscription)).code == "invalid_notification"
    no_parameters = notification("heartbeat")
    del no_parameters["entry"][0]["resource"]["parameter"]
    assert rejected(raw(no_parameters)).code == "invalid_notification"
    # an event notification whose focus is not a ServiceRequest
    patient = {"fullUrl": "http://h/fhir/Patient/1", "resource": {"resourceType": "Patient", "id": "1"}}
    other = notification("event-notification", [patient])
    assert rejected(raw(other)).code == "no_service_request"


def cloudevent(**fields) -> bytes:
    envelope = {"specversion": "1.0", "id": "evt-1", "source": "/fhir/a", "type": "org.example.created"}
    return raw({k: v for k, v in {**envelope, **fields}.items() if v is not None})


@pytest.mark.parametrize(
    "fields",
    [
        {"id": None, "subject": "ServiceRequest/1"},
        {"source": "", "subject": "ServiceRequest/1"},
        {"specversion": "0.3", "subject": "ServiceRequest/1"},
        {},  # names no resource
        {"data": "not a resource name"},
        {"data_base64": "***"},
        {"data": {"resourceType": "ServiceRequest", "resourceFhirId": "bad id!"}},
        {"data": {"resourceType": "ServiceRequest", "resourceFhirId": "1", "resourceVersionId": [1]}},
        {"subject": "ServiceRequest/1", "data": "x/fhir/ServiceRequest/2"},
    ],
)
def test_bad_cloudevents(fields):
    assert rejected(cloudevent(**fields)).code == "invalid_cloudevent"


def test_cloudevent_for_another_resource_type():
    data = {"resourceType": "Patient", "resourceFhirId": "p1", "resourceVersionId": 1}
    value = cloudevent(type="Microsoft.HealthcareApis.FhirResourceCreated", data=data)
    assert rejected(value).code == "unsupported_resource_type"


# --------------------------------------------------------------------------- no PHI in messages


def _phi_cases() -> list[bytes]:
    bundle = bundle_of(sr(), sr(id="sr-2", status="bogus"))
    return [
        raw(sr(status=PHI)),
        raw(sr(intent=PHI)),
        raw(sr(status="bogus")),
        raw(sr(subject={"display": PHI})),
        raw(sr(authoredOn=PHI)),
        raw(sr(note=PHI)),
        raw(sr(code={"coding": PHI})),
        raw(sr(**{PHI: "x"})),
        raw(sr(id=PHI)),
        raw({"resourceType": PHI}),
        raw({"resourceType": "Patient", "name": [{"text": PHI}]}),
        raw(bundle),
        raw(bundle)[:-30],
        raw(notification(PHI)),
        raw({"specversion": PHI, "id": "e", "source": "s", "type": "t"}),
        raw({"specversion": "1.0", "id": "e", "source": "s", "type": "t", "data": PHI}),
        b'{"resourceType": "ServiceRequest", "note": "' + PHI.encode() + b'", "note": 1}',
        ('{"note": "' + PHI + '", "x": "\udcff"}').encode("utf-8", "surrogatepass"),
    ]


@pytest.mark.parametrize("value", _phi_cases())
def test_rejection_messages_never_contain_patient_text(value):
    exc = rejected(value)
    assert exc.code in REASON_CODES
    for text in (str(exc), exc.message, repr(exc)):
        for fragment in (PHI, "Zebediah", "Quuxworth"):
            assert fragment not in text


# --------------------------------------------------------------------------- Bundles


def test_bundle_items_skips_and_ignored_entries():
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1"}, "request": {"method": "POST"}},
            {"resource": sr(id="a"), "request": {"method": "POST", "url": "ServiceRequest"}},
            {"resource": sr(id="b", status="completed"), "request": {"method": "POST"}},
            {"request": {"method": "DELETE", "url": "ServiceRequest/c"}},
        ],
    }
    event = parse_event(raw(bundle))
    assert event.kind == "bundle"
    assert [i.order_id for i in event.items] == ["a"]
    assert event.skipped == [("c", "deleted"), ("b", "status_completed")]


def test_one_bad_service_request_rejects_the_bundle_with_its_path():
    exc = rejected(raw(bundle_of(sr(id="a"), sr(id="b", intent="bogus"), bundle_type="batch")))
    assert exc.code == "invalid_intent"
    assert "Bundle.entry[1].resource" in exc.message and "(id b)" in exc.message


def test_searchset_ignores_included_resources():
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": sr(id="match"), "search": {"mode": "match"}},
            {"resource": sr(id="included"), "search": {"mode": "include"}},
            {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}},
        ],
    }
    assert [i.order_id for i in parse_event(raw(bundle)).items] == ["match"]


def test_history_bundle_works_on_the_newest_version_only():
    newest = sr(id="a", meta={"versionId": "3"})
    older = sr(id="a", meta={"versionId": "2"})
    bundle = {"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": newest, "request": {"method": "PUT", "url": "ServiceRequest/a"}},
        {"resource": older, "request": {"method": "PUT", "url": "ServiceRequest/a"}},
        {"request": {"method": "DELETE", "url": "ServiceRequest/b"}},
        {"resource": sr(id="b"), "request": {"method": "POST", "url": "ServiceRequest"}},
    ]}
    event = parse_event(raw(bundle))
    assert [i.service_request["meta"]["versionId"] for i in event.items] == ["3"]
    assert event.skipped == [("a", "superseded"), ("b", "deleted"), ("b", "superseded")]


# --------------------------------------------------------------------------- notifications


def test_notification_with_full_resources():
    entries = [
        {"fullUrl": "http://h/fhir/ServiceRequest/a", "resource": sr(id="a")},
        {"fullUrl": "http://h/fhir/ServiceRequest/b", "resource": sr(id="b", status="revoked")},
    ]
    event = parse_event(raw(notification("event-notification", entries)))
    assert event.kind == "notification"
    assert [i.order_id for i in event.items] == ["a"] and event.items[0].service_request is not None
    assert event.skipped == [("b", "status_revoked")]


def test_notification_full_resource_is_validated():
    entries = [{"fullUrl": "http://h/fhir/ServiceRequest/a", "resource": sr(id="a", subject=None)}]
    exc = rejected(raw(notification("event-notification", entries)))
    assert exc.code == "missing_subject" and "Bundle.entry[1].resource" in exc.message


def test_id_only_notification_gives_references():
    entries = [
        {"fullUrl": "https://fhir.example.org/r4/ServiceRequest/a/_history/4", "request": {"method": "PUT"}},
        {"request": {"method": "POST", "url": "ServiceRequest/b"}},
        {"fullUrl": "https://fhir.example.org/r4/Patient/p1"},
        {"request": {"method": "DELETE", "url": "ServiceRequest/c"}},
    ]
    focus = {"name": "notification-event", "part": [
        {"name": "event-number", "valueString": "7"},
        {"name": "focus", "valueReference": {"reference": "ServiceRequest/a/_history/4"}},
        {"name": "focus", "valueReference": {"reference": "https://fhir.example.org/r4/ServiceRequest/d"}},
    ]}
    event = parse_event(raw(notification("event-notification", entries, [focus])))
    references = [i.reference for i in event.items]
    assert references == ["ServiceRequest/a/_history/4", "ServiceRequest/b", "ServiceRequest/d"]
    assert all(i.service_request is None for i in event.items)
    assert event.skipped == [("c", "deleted")]


@pytest.mark.parametrize("kind", ["handshake", "heartbeat", "query-status"])
def test_handshake_and_heartbeat_are_valid_and_empty(kind):
    event = parse_event(raw(notification(kind)))
    assert event.items == [] and event.skipped == [] and event.kind == "notification"


# --------------------------------------------------------------------------- CloudEvents


@pytest.mark.parametrize(
    ("fields", "reference"),
    [
        ({"subject": "ServiceRequest/123"}, "ServiceRequest/123"),
        ({"subject": "https://h.example/r4/ServiceRequest/123/_history/5"}, "ServiceRequest/123/_history/5"),
        (
            {
                "type": "Microsoft.HealthcareApis.FhirResourceUpdated",
                "subject": "ws-fhirsvc.fhir.azurehealthcareapis.com/ServiceRequest/123",
                "data": {
                    "resourceType": "ServiceRequest",
                    "resourceFhirAccount": "ws-fhirsvc.fhir.azurehealthcareapis.com",
                    "resourceFhirId": "123",
                    "resourceVersionId": 2,
                },
            },
            "ServiceRequest/123/_history/2",
        ),
        ({"data": GOOGLE_NAME}, "ServiceRequest/123"),
        ({"data_base64": base64.b64encode(GOOGLE_NAME.encode()).decode()}, "ServiceRequest/123"),
    ],
)
def test_cloudevents_name_the_order_to_fetch(fields, reference):
    event = parse_event(cloudevent(**fields))
    assert event.kind == "cloudevent" and event.skipped == []
    assert [(i.reference, i.service_request) for i in event.items] == [(reference, None)]
    assert event.items[0].order_id == "123"


def test_cloudevent_for_a_deleted_order_is_skipped():
    data = {"resourceType": "ServiceRequest", "resourceFhirId": "123", "resourceVersionId": 3}
    event = parse_event(cloudevent(type="Microsoft.HealthcareApis.FhirResourceDeleted", data=data))
    assert event.items == [] and event.skipped == [("123", "deleted")]


def test_cloudevent_with_the_resource_inline_is_validated():
    assert parse_event(cloudevent(data=sr(id="inline"))).items[0].service_request["id"] == "inline"
    assert rejected(cloudevent(data=sr(status="bogus"))).code == "invalid_status"


# --------------------------------------------------------------------------- fetched resources, skip rules


def test_validate_service_request_for_a_fetched_resource():
    validate_service_request(sr())
    with pytest.raises(EventRejected) as info:
        validate_service_request({"resourceType": "Patient", "id": "p"})
    assert info.value.code == "unsupported_resource_type"
    with pytest.raises(EventRejected) as info:
        validate_service_request(sr(subject={"display": PHI}))
    assert info.value.code == "missing_subject" and PHI not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({}, None),
        ({"intent": "original-order"}, None),
        ({"intent": "reflex-order"}, None),
        ({"intent": "filler-order"}, None),
        ({"intent": "instance-order"}, None),
        ({"status": "draft"}, "status_draft"),
        ({"status": "on-hold"}, "status_on_hold"),
        ({"status": "completed"}, "status_completed"),
        ({"status": "revoked"}, "status_revoked"),
        ({"status": "entered-in-error"}, "status_entered_in_error"),
        ({"status": "unknown"}, "status_unknown"),
        ({"intent": "proposal"}, "intent_proposal"),
        ({"intent": "plan"}, "intent_plan"),
        ({"intent": "option"}, "intent_option"),
        ({"intent": "directive"}, "intent_directive"),
        ({"doNotPerform": True}, "do_not_perform"),
        ({"doNotPerform": False}, None),
    ],
)
def test_skip_reason(overrides, reason):
    assert skip_reason(sr(**overrides)) == reason


def test_order_item_holds_exactly_one():
    with pytest.raises(ValueError):
        OrderItem()
    with pytest.raises(ValueError):
        OrderItem(service_request=sr(), reference="ServiceRequest/sr-1")
    assert OrderItem(reference="ServiceRequest/9/_history/2").order_id == "9"


def test_parse_event_does_not_modify_what_it_returns():
    doc = sr()
    event = parse_event(raw(doc))
    assert event.items[0].service_request == doc
    assert copy.deepcopy(event.items[0].service_request) == doc


def test_rejection_codes_are_closed():
    with pytest.raises(ValueError):
        EventRejected("made_up", "x")


# --------------------------------------------------------------------------- robustness

AZURE_DATA = {"resourceType": "ServiceRequest", "resourceFhirId": "1", "resourceVersionId": 2}
_WRONG_TYPES = [None, 0, 1.5, True, "", "x", [], [None], {}, {"a": 1}, [{"text": 5}]]


def _paths(obj, prefix=()):
    if prefix:
        yield prefix
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in children:
        yield from _paths(value, (*prefix, key))


def _replaced(doc, path, value):
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    "shape",
    [
        bundle_of(sr(), {"resourceType": "Patient", "id": "p"}, bundle_type="history"),
        notification(
            "event-notification",
            [{"fullUrl": "http://h/ServiceRequest/1"}, {"resource": sr(id="2")}],
            [{"name": "notification-event", "part": [{"name": "focus", "valueReference": {}}]}],
        ),
        json.loads(cloudevent(subject="ServiceRequest/1", data=AZURE_DATA)),
    ],
    ids=["bundle", "notification", "cloudevent"],
)
def test_any_wrong_type_anywhere_is_rejected_not_crashed(shape):
    """Producers send odd JSON: every field replaced by every wrong type gives a result or an
    EventRejected, never another exception (which would stall the consumer)."""
    for path in _paths(shape):
        for value in _WRONG_TYPES:
            try:
                parse_event(raw(_replaced(shape, path, value)))
            except EventRejected as exc:
                assert exc.code in REASON_CODES


def test_an_order_repeated_in_a_bundle_is_worked_on_once():
    """issue 8, defect 4 (parser side): 2,000 copies of one order are one task, not 2,000."""
    copies = [{"resource": sr(id="a", meta={"versionId": "1"})} for _ in range(2000)]
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [*copies, {"resource": sr(id="b")}]}
    event = parse_event(raw(bundle))
    assert [i.order_id for i in event.items] == ["a", "b"]
    assert event.skipped == [("a", "duplicate")] * 1999
    newer = {"resource": sr(id="a", meta={"versionId": "2"})}
    event = parse_event(raw({"resourceType": "Bundle", "type": "collection", "entry": [copies[0], newer]}))
    assert [i.service_request["meta"]["versionId"] for i in event.items] == ["2"]
    assert event.skipped == [("a", "superseded")]
