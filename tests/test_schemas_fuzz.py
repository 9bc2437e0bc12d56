"""Property-based tests of the event parser and the write-back builder (hypothesis).

The contract under test: ``parse_event`` takes any bytes and either returns orders or raises
:class:`EventRejected` with a code from ``REASON_CODES`` and a message free of the event's free
text; for every order it accepts, model-input building and the write-back Bundle never raise and
the Bundle is valid FHIR R4. Nothing else may escape: a stray ``KeyError`` or ``RecursionError``
becomes a task failure, and before issue 8 a task failure stalled the partition.

Derandomized (the same inputs on every run, so CI is stable) and split across tests so that
together they check at least ``FUZZ_TOTAL`` events. Generating a structured event costs hypothesis
~10 ms, so each generated event is checked as it is and as several cheap mutants (seeded
``random`` edits at random paths and random byte damage).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import random
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.events import REASON_CODES, EventRejected, ParsedEvent, parse_event
from schemas.labels import ModelOutput, Prediction
from schemas.orders import INTENTS, MAX_JSON_DEPTH, STATUSES
from schemas.text import MAX_INPUT_CHARS, build_model_input, clinical_text
from schemas.validation import r4_resource_types, r4_schema_errors
from schemas.writeback import WritebackSchemaError, build_writeback_bundle

FUZZ_TOTAL = int(os.environ.get("EHRW_FUZZ_EVENTS", "10000"))  # CI: at least 10,000
# (share of FUZZ_TOTAL, events checked per hypothesis example) per test below; shares sum to 1.
_PLAN = {"structured": (0.1, 1), "mutated": (0.6, 16), "bytes": (0.2, 16), "json": (0.1, 1)}
SECRET = "Zqxj belmonte"  # stands for patient text: it must never reach a rejection message
RECORDED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_timings: list[tuple[float, int]] = []
_slowest: list[tuple[float, bytes]] = []  # the 5 slowest inputs, re-timed warm in the report


def _fuzz(test: str):
    share, per_example = _PLAN[test]
    return settings(
        max_examples=max(1, round(FUZZ_TOTAL * share / per_example)),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --------------------------------------------------------------------------- strategies

ids = st.text(alphabet="abcXYZ019-.", min_size=1, max_size=12)
free_text = st.text(min_size=0, max_size=40).map(lambda t: f"{SECRET} {t}")
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), free_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
codes = st.sampled_from(["http://loinc.org", "http://snomed.info/sct", "urn:x", ""]).flatmap(
    lambda system: st.fixed_dictionaries(
        {"system": st.just(system), "code": st.text(alphabet="abcXYZ019-", min_size=1, max_size=10)},
        optional={"display": free_text},
    )
)
concept = st.fixed_dictionaries({}, optional={"text": free_text, "coding": st.lists(codes, max_size=3)})
# Every R4 type (R4B lacks some), a datatype and nonsense, as contained resources.
contained_types = st.sampled_from(
    sorted(r4_resource_types()) + ["MedicinalProduct", "SubstanceProtein", "Coding", "Nonsense", ""]
)
contained = st.fixed_dictionaries(
    {"resourceType": contained_types, "id": ids},
    optional={"code": concept, "status": st.sampled_from(["active", "final", "x"]), "valueString": free_text},
)


@st.composite
def nested_extension(draw) -> dict[str, Any]:
    depth = draw(st.integers(0, 4) | st.sampled_from([30, 31, 40, 150]))
    ext: dict[str, Any] = {"url": "http://example.org/x", "valueString": draw(free_text)}
    for _ in range(depth):
        ext = {"url": "http://example.org/x", "extension": [ext]}
    return ext


@st.composite
def service_requests(draw) -> dict[str, Any]:
    sr: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": draw(ids),
        "status": draw(st.sampled_from(sorted(STATUSES) + ["bogus"])),
        "intent": draw(st.sampled_from(sorted(INTENTS) + ["bogus"])),
        "subject": draw(
            st.sampled_from([{"reference": "Patient/p1"}, {"identifier": {"value": "MRN1"}}, {"display": "x"}])
        ),
    }
    optional = {
        "code": concept,
        "note": st.lists(st.fixed_dictionaries({"text": free_text}), max_size=4),
        "reasonCode": st.lists(concept, max_size=3),
        "bodySite": st.lists(concept, max_size=2),
        "category": st.lists(concept, max_size=2),
        "patientInstruction": free_text,
        "priority": st.sampled_from(["routine", "stat", "bogus"]),
        "meta": st.fixed_dictionaries({}, optional={"versionId": ids}),
        "contained": st.lists(contained, max_size=3),
        "extension": st.lists(nested_extension(), max_size=1),
        "reasonReference": st.lists(st.fixed_dictionaries({"reference": st.sampled_from(["#c1", "Condition/1"])})),
        "encounter": st.just({"reference": "Encounter/e1"}),
        "doNotPerform": st.booleans(),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            sr[name] = draw(strategy)
    return sr


@st.composite
def events(draw) -> dict[str, Any]:
    """One of the four accepted shapes around generated ServiceRequests."""
    srs = draw(st.lists(service_requests(), min_size=1, max_size=3))
    shape = draw(st.sampled_from(["resource", "bundle", "notification", "cloudevent"]))
    if shape == "resource":
        return srs[0]
    if shape == "bundle":
        bundle_type = draw(st.sampled_from(["collection", "batch", "transaction", "searchset", "history", "document"]))
        return {"resourceType": "Bundle", "type": bundle_type, "entry": [{"resource": sr} for sr in srs]}
    if shape == "notification":
        status = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
                {"name": "type", "valueCode": draw(st.sampled_from(["event-notification", "heartbeat", "x"]))},
            ],
        }
        focus = [{"fullUrl": f"http://h/fhir/ServiceRequest/{sr['id']}"} for sr in srs]
        full = [{"resource": sr} for sr in srs]
        return {"resourceType": "Bundle", "type": "history", "entry": [{"resource": status}, *draw(st.sampled_from([focus, full]))]}
    envelope = {"specversion": "1.0", "id": "e1", "source": "urn:x", "type": "ServiceRequest.created"}
    data = draw(
        st.sampled_from(
            [
                {"subject": f"ServiceRequest/{srs[0]['id']}"},
                {"data": {"resourceType": "ServiceRequest", "resourceFhirId": srs[0]["id"], "resourceVersionId": 2}},
                {"data": srs[0]},
                {"data_base64": base64.b64encode(json.dumps(srs[0]).encode()).decode()},
            ]
        )
    )
    return {**envelope, **data}


_KEYS = ["resourceType", "id", "entry", "resource", "extension", "contained", "subject", "_status", "x"]
_ODD_VALUES: list[Any] = [None, True, 0, -1, 1e308, 2**80, "", "x", SECRET, [], {}, [None], {"": None}]


def mutate(doc: Any, rng: random.Random, value_pool: list[Any]) -> Any:
    """``doc`` (a fresh copy) with 1-4 random edits at random paths: replace, delete, insert,
    wrap in a resource, wrap in a list."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 4)):
        parent, key = _random_slot(rng, doc)
        value = copy.deepcopy(rng.choice(value_pool))
        if parent is None:
            doc = value
            continue
        action = rng.choice(["replace", "delete", "insert", "wrap", "listify"])
        if action == "replace":
            parent[key] = value
        elif action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif action == "insert" and isinstance(parent, dict):
            parent[rng.choice(_KEYS)] = value
        elif action == "wrap":
            parent[key] = {"resourceType": rng.choice(sorted(r4_resource_types()) + ["Coding", ""]), "v": parent[key]}
        elif action == "listify":
            parent[key] = [parent[key]]
    return doc


def _random_slot(rng: random.Random, doc: Any) -> tuple[Any, Any]:
    """A random (container, key) inside ``doc``; ``(None, None)`` means the root itself."""
    parent, key = None, None
    node = doc
    while isinstance(node, (dict, list)) and node and rng.random() < 0.8:
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, rng.choice(keys)
        node = node[key]
    return parent, key


# --------------------------------------------------------------------------- the property


PROTOCOL = ModelOutput(
    task="protocol",
    model="protocol-tiny",
    model_version="1.0.0",
    abstained=False,
    predictions=[Prediction("https://ehr-worker.dev/fhir/CodeSystem/protocol", "ct-abd", "CT abdomen", 0.9)],
)
DIAGNOSIS = ModelOutput(
    task="diagnosis",
    model="diagnosis-tiny",
    model_version="1.0.0",
    abstained=False,
    predictions=[Prediction("http://www.orpha.net", "ORPHA:558", "Marfan syndrome", 0.7)],
)


@pytest.fixture(scope="module", autouse=True)
def _warm_validators():
    """Load the R4B model and compile the R4 schema validator once (about a second) before the
    timed events, so the slowest-event figure is per-event work, not start-up."""
    order = _order(contained=[{"resourceType": "MedicinalProduct", "id": "m", "name": [{"productName": "x"}]}])
    for item in parse_event(_dump(order)).items:
        build_writeback_bundle(item.service_request, PROTOCOL, DIAGNOSIS, recorded=RECORDED)


def check_event(raw: bytes) -> ParsedEvent | None:
    """The whole property for one event; returns the parse (None when rejected)."""
    start = time.perf_counter()
    try:
        parsed = parse_event(raw)
    except EventRejected as exc:
        assert exc.code in REASON_CODES
        assert isinstance(exc.message, str) and exc.message
        assert SECRET not in exc.message and SECRET not in str(exc)
        return None
    finally:
        elapsed = time.perf_counter() - start
        _timings.append((elapsed, len(raw)))
        if len(_slowest) < 5 or elapsed > _slowest[-1][0]:
            _slowest[:] = sorted([*_slowest, (elapsed, raw)], key=lambda x: -x[0])[:5]
    assert parsed.kind in ("resource", "bundle", "notification", "cloudevent")
    for item in parsed.items:
        assert isinstance(item.order_id, str)
        sr = item.service_request
        if sr is None:
            continue
        text = build_model_input(sr)
        assert isinstance(text, str) and len(text) <= MAX_INPUT_CHARS
        clinical_text(sr)
        bundle = build_writeback_bundle(sr, PROTOCOL, DIAGNOSIS, recorded=RECORDED)
        assert r4_schema_errors(bundle) == []
    return parsed


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


@_fuzz("structured")
@given(events())
def test_generated_events_are_parsed_or_rejected_with_a_known_code(event):
    check_event(_dump(event))


@_fuzz("mutated")
@given(events(), json_values, st.integers(0, 2**32 - 1))
def test_mutated_events_are_parsed_or_rejected_with_a_known_code(event, value, seed):
    rng = random.Random(seed)
    for _ in range(_PLAN["mutated"][1]):
        check_event(_dump(mutate(event, rng, [*_ODD_VALUES, value])))


@_fuzz("bytes")
@given(events().map(_dump), st.integers(0, 2**32 - 1))
def test_damaged_bytes_are_rejected_with_a_known_code(raw, seed):
    rng = random.Random(seed)
    for _ in range(_PLAN["bytes"][1]):
        check_event(damage(raw, rng))


def damage(raw: bytes, rng: random.Random) -> bytes:
    edit = rng.choice(["truncate", "flip", "prefix", "nan", "duplicate", "deepen"])
    if edit == "truncate":
        return raw[: rng.randint(0, len(raw))]
    if edit == "flip":
        i = rng.randrange(len(raw))
        return raw[:i] + bytes([raw[i] ^ rng.randint(1, 255)]) + raw[i + 1 :]
    if edit == "prefix":
        return rng.choice([b"\xef\xbb\xbf", b"\xff", b"[", b" ", b"\x00"]) + raw
    if edit == "nan":
        return raw.replace(b'"id"', b'"x": NaN, "id"', 1)
    if edit == "duplicate":
        return raw.replace(b'"id"', b'"id": "a", "id"', 1)
    depth = rng.choice([10, 100, 1000, 100_000])  # an array nested this deep where "id" was
    return raw.replace(b'"id"', b'"x": ' + b"[" * depth + b"]" * depth + b', "id"', 1)


@_fuzz("json")
@given(json_values)
def test_arbitrary_json_is_rejected_with_a_known_code(value):
    check_event(_dump(value))


labels = st.text(max_size=24) | st.sampled_from(["CT-HEAD-WO", "ORPHA:558", "", " ", "a  b", "x\ny"])


@settings(max_examples=200, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(service_requests(), labels, labels, labels, st.booleans(), st.floats(0, 1))
def test_write_back_builder_gives_valid_r4_or_refuses_with_its_error(sr, code, display, version, abstained, p):
    """Whatever a model answers, the builder returns a schema-valid Bundle or raises
    WritebackSchemaError (nothing is sent); it never raises anything else."""
    sr = {**sr, "status": "active", "intent": "order", "subject": {"reference": "Patient/p1"}}
    try:
        parse_event(_dump(sr))
    except EventRejected:
        return  # the builder only ever sees accepted orders
    output = ModelOutput(
        task="protocol",
        model="protocol-fuzz",
        model_version=version,
        abstained=abstained,
        predictions=[Prediction("https://ehr-worker.dev/fhir/CodeSystem/protocol", code, display, p)],
    )
    try:
        bundle = build_writeback_bundle(sr, output, output, recorded=RECORDED)
    except WritebackSchemaError as refused:
        assert refused.errors and SECRET not in str(refused)
        return
    assert r4_schema_errors(bundle) == []


# --------------------------------------------------------------------------- the known crashers


def _order(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": "o1",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        **extra,
    }


def _deep_extension(depth: int) -> dict[str, Any]:
    ext: dict[str, Any] = {"url": "http://example.org/x", "valueString": "x"}
    for _ in range(depth):
        ext = {"url": "http://example.org/x", "extension": [ext]}
    return ext


@pytest.mark.parametrize(
    "order, code",
    [
        # R4 type missing from the R4B model: KeyError inside fhir.resources before issue 8
        (_order(contained=[{"resourceType": "MedicinalProduct", "id": "m"}]), "invalid_structure"),
        (_order(contained=[{"resourceType": 7}]), "invalid_structure"),  # TypeError before
        (_order(extension=[_deep_extension(150)]), "too_deeply_nested"),  # RecursionError before (~5 kB)
    ],
)
def test_known_crashers_are_rejections(order, code):
    raw = _dump(order)
    with pytest.raises(EventRejected) as rejected:
        parse_event(raw)
    assert rejected.value.code == code
    # The same order inside a CloudEvent's data and a Bundle is rejected the same way.
    for wrapped in (
        {"specversion": "1.0", "id": "e", "source": "s", "type": "t", "data": order},
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]},
    ):
        with pytest.raises(EventRejected) as again:
            parse_event(_dump(wrapped))
        assert again.value.code == code


def test_valid_r4_only_contained_resource_is_accepted():
    medicinal = {"resourceType": "MedicinalProduct", "id": "m", "name": [{"productName": "Examplinib"}]}
    parsed = parse_event(_dump(_order(contained=[medicinal])))
    assert [item.order_id for item in parsed.items] == ["o1"]


def test_depth_limit_leaves_room_for_real_orders():
    parse_event(_dump(_order(extension=[_deep_extension(MAX_JSON_DEPTH // 2 - 4)])))


def test_zz_report_fuzz_figures(capsys):
    """Prints the count and the slowest input (runs last in this module: pytest keeps file order)."""
    if len(_timings) < FUZZ_TOTAL * 0.95:  # hypothesis may stop early on a tiny search space
        pytest.skip("run the whole module to get the figures")
    median = sorted(t for t, _ in _timings)[len(_timings) // 2]
    again = []
    for _, raw in _slowest:  # the first event embedding a resource type imports its model: one-off
        start = time.perf_counter()
        with contextlib.suppress(EventRejected):
            parse_event(raw)
        again.append(time.perf_counter() - start)
    with capsys.disabled():
        print(
            f"\nfuzz: {len(_timings)} events checked; slowest parse {_slowest[0][0] * 1000:.1f} ms "
            f"({len(_slowest[0][1])} bytes); the 5 slowest parsed again: "
            f"{', '.join(f'{t * 1000:.1f}' for t in again)} ms; median {median * 1000:.2f} ms"
        )
