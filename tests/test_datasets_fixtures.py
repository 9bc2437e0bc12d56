"""The demo fixtures: valid FHIR, imaging vs non-imaging, labels, and deterministic regeneration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.catalog import protocol_by_code
from schemas.events import validate_service_request
from schemas.text import build_model_input, clinical_text, is_imaging_order
from schemas.validation import r4_schema_errors
from training.datasets.common import label_key
from training.datasets.diagnosis import disease_panel

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "workers" / "fixtures"
ORDERS = FIXTURES / "orders"


def _ndjson(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def fixtures():
    return {
        "imaging": _ndjson(ORDERS / "imaging-orders.ndjson"),
        "non_imaging": _ndjson(ORDERS / "non-imaging-orders.ndjson"),
        "patients": {p["id"]: p for p in _ndjson(FIXTURES / "patients.ndjson")},
        "labels": json.loads((ORDERS.parent / "expected-labels.json").read_text(encoding="utf-8")),
    }


def test_imaging_orders(fixtures):
    orders = fixtures["imaging"]
    assert len(orders) >= 60
    assert len({o["id"] for o in orders}) == len(orders)
    for sr in orders:
        validate_service_request(sr)
        assert r4_schema_errors(sr) == [], sr["id"]
        assert sr["status"] == "active" and sr["intent"] == "order"
        assert sr["category"][0]["coding"][0]["code"] == "363679005"
        assert is_imaging_order(sr)
        assert sr["subject"]["reference"].startswith("Patient/demo-")
        assert clinical_text(sr) and sr["note"][0]["text"] and sr["reasonCode"][0]["text"]
        assert len(build_model_input(sr)) > 150


def test_non_imaging_orders(fixtures):
    orders = fixtures["non_imaging"]
    assert 6 <= len(orders) <= 12
    for sr in orders:
        validate_service_request(sr)
        assert r4_schema_errors(sr) == [], sr["id"]
        assert sr["status"] == "active" and sr["intent"] == "order"
        assert sr["category"][0]["coding"][0]["code"] == "108252007"
        assert not is_imaging_order(sr), sr["id"]
        assert sr["note"][0]["text"]


def test_patients_and_references(fixtures):
    patients = fixtures["patients"]
    for p in patients.values():
        assert r4_schema_errors(p) == [], p["id"]
        assert p["gender"] in ("male", "female") and p["name"][0]["family"] and p["birthDate"]
    for sr in fixtures["imaging"] + fixtures["non_imaging"]:
        assert sr["subject"]["reference"].split("/", 1)[1] in patients


def test_labels(fixtures):
    labels = fixtures["labels"]
    panel = {label_key(lab) for lab in disease_panel(500)}
    for sr in fixtures["imaging"]:
        lab = labels[sr["id"]]
        assert protocol_by_code(lab["protocol"]).display == lab["protocol_display"]
        assert lab["disease"] in panel
    for sr in fixtures["non_imaging"]:
        lab = labels[sr["id"]]
        assert lab["protocol"] is None
        assert lab["disease"] is None or lab["disease"] in panel
    assert set(labels) == {sr["id"] for sr in fixtures["imaging"] + fixtures["non_imaging"]}
    assert len({labels[sr["id"]]["disease"] for sr in fixtures["imaging"]}) == len(fixtures["imaging"])
    assert len({labels[sr["id"]]["protocol"] for sr in fixtures["imaging"]}) >= 6


def test_script_is_deterministic(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_fixtures.py"), "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for rel in ("orders/imaging-orders.ndjson", "orders/non-imaging-orders.ndjson", "expected-labels.json", "patients.ndjson"):
        assert (tmp_path / rel).read_bytes() == (FIXTURES / rel).read_bytes(), rel
