"""schemas.catalog and schemas.labels: the protocol CodeSystem, disease codings, model outputs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from schemas.catalog import (
    CONTRASTS,
    DECIPHER_SYSTEM,
    MODALITIES,
    OMIM_SYSTEM,
    ORPHA_SYSTEM,
    PROTOCOL_SYSTEM,
    PROTOCOLS,
    disease_coding,
    disease_database_id,
    protocol_by_code,
    protocol_by_display,
    protocol_codesystem,
)
from schemas.labels import ModelOutput, Prediction
from schemas.validation import r4_schema_errors

# DESIGN.md "Label catalogs", verbatim.
DESIGN_PROTOCOLS = """\
CT head without contrast
CT head with and without contrast
CTA head and neck
CT cervical spine without contrast
CT chest without contrast
CT chest with contrast
CTA chest pulmonary embolism protocol
CT abdomen and pelvis with contrast
CT abdomen and pelvis without contrast renal stone protocol
CT abdomen multiphase liver
CT sinus and facial bones
MRI brain without contrast
MRI brain with and without contrast
MRI cervical spine
MRI lumbar spine
MRI knee
MRI shoulder
MRI abdomen liver and MRCP
MRI pelvis
US abdomen complete
US right upper quadrant
US pelvis
US renal
US lower extremity venous duplex
US carotid duplex
US thyroid
US obstetric
XR chest two views
Mammography screening
Mammography diagnostic
NM bone scan
NM myocardial perfusion
PET/CT skull base to mid-thigh
Echocardiogram transthoracic""".splitlines()


def test_the_34_protocols_of_the_design():
    assert [p.display for p in PROTOCOLS] == DESIGN_PROTOCOLS
    assert len({p.code for p in PROTOCOLS}) == 34
    for p in PROTOCOLS:
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(-[A-Z0-9]+)+", p.code)
        assert p.modality in MODALITIES and p.contrast in CONTRASTS and p.body_region
        assert p.loinc is None or re.fullmatch(r"\d{3,5}-\d", p.loinc)
        # contrast is stated where the name states it
        if "with and without contrast" in p.display:
            assert p.contrast == "with-and-without"
        elif "without contrast" in p.display:
            assert p.contrast == "none"
        elif "with contrast" in p.display:
            assert p.contrast == "with"
        if p.modality in ("US", "XR", "MG", "NM", "PT", "ECHO"):
            assert p.contrast == "n/a"
    assert protocol_by_code("CT-HEAD-WO").loinc == "30799-1"


def test_lookups():
    assert protocol_by_display("  ct HEAD   without contrast ").code == "CT-HEAD-WO"
    assert protocol_by_display("PET/CT skull base to mid-thigh").modality == "PT"
    assert protocol_by_code("ECHO-TTE").display == "Echocardiogram transthoracic"
    with pytest.raises(KeyError):
        protocol_by_code("ct-head-wo")
    with pytest.raises(KeyError):
        protocol_by_display("CT head")


def test_protocol_codesystem_is_valid_fhir():
    from fhir.resources.R4B.codesystem import CodeSystem

    cs = protocol_codesystem()
    assert r4_schema_errors(cs) == []
    CodeSystem.model_validate(cs)
    assert (cs["url"], cs["content"], cs["count"]) == (PROTOCOL_SYSTEM, "complete", 34)
    assert len(cs["concept"]) == 34
    assert {p["code"] for p in cs["property"]} == {"modality", "body-region", "contrast", "loinc"}
    head = cs["concept"][0]
    assert head["display"] == "CT head without contrast"
    loinc = {"system": "http://loinc.org", "code": "30799-1"}
    assert {"code": "loinc", "valueCoding": loinc} in head["property"]


@pytest.mark.parametrize(
    ("database_id", "coding"),
    [
        ("OMIM:203400", (OMIM_SYSTEM, "203400")),
        ("ORPHA:558", (ORPHA_SYSTEM, "558")),
        ("DECIPHER:16", (DECIPHER_SYSTEM, "16")),
        (" omim:154700 ", (OMIM_SYSTEM, "154700")),
    ],
)
def test_disease_coding(database_id, coding):
    assert disease_coding(database_id) == coding
    assert disease_database_id(*coding) == database_id.strip().upper()


@pytest.mark.parametrize("bad", ["203400", "MONDO:0007947", "OMIM:", ""])
def test_disease_coding_rejects(bad):
    with pytest.raises(ValueError):
        disease_coding(bad)


def test_model_output_json():
    knee = Prediction(PROTOCOL_SYSTEM, "MR-KNEE", "MRI knee", 0.9)
    out = ModelOutput("protocol", "ehrw-protocol", "1", False, [knee], 0.35)
    line = out.to_json()
    assert line == {
        "task": "protocol",
        "model": "ehrw-protocol",
        "model_version": "1",
        "abstained": False,
        "predictions": [
            {"system": PROTOCOL_SYSTEM, "code": "MR-KNEE", "display": "MRI knee", "probability": 0.9}
        ],
    }
    assert ModelOutput.from_json(json.loads(json.dumps(line)), threshold=0.35) == out
    assert out.top == out.predictions[0] and out.top.label.code == "MR-KNEE"


def test_prediction_probability_is_a_plain_float_in_range():
    np = pytest.importorskip("numpy")
    p = Prediction("s", "c", "d", np.float32(0.25))
    assert type(p.probability) is float and json.dumps(p.to_json())
    for bad in (math.nan, math.inf, -0.1, 1.5, "high"):
        with pytest.raises(ValueError):
            Prediction("s", "c", "d", bad)


def test_import_schemas_is_cheap():
    code = (
        "import sys, schemas;"
        "from schemas import parse_event, build_model_input, build_writeback_bundle, r4_schema_errors;"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('fhir', 'jsonschema', 'pydantic', 'torch')];"
        "print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
