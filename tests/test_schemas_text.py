"""schemas.text: the one preprocessing function, imaging-order detection, context references."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from schemas.fhirjson import clean_text
from schemas.text import (
    MAX_INPUT_CHARS,
    build_model_input,
    clinical_text,
    context_references,
    is_imaging_order,
    names_imaging_modality,
    service_request_from_text,
)

HL7 = Path(__file__).resolve().parent.parent / "workers" / "fixtures" / "hl7"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"


def hl7(name: str) -> dict:
    return json.loads((HL7 / f"ServiceRequest-{name}.json").read_text())


def order(**fields) -> dict:
    return {"resourceType": "ServiceRequest", "id": "o1", "status": "active", "intent": "order",
            "subject": {"reference": "Patient/p1"}, **fields}


def coded(system: str, code: str, display: str | None = None) -> dict:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def text_doc(text: str, content_type: str = "text/plain") -> dict:
    attachment = {"contentType": content_type, "data": b64(text)}
    content = [{"attachment": attachment}]
    return {"resourceType": "DocumentReference", "id": f"d{len(text)}", "content": content}


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode()


# --------------------------------------------------------------------------- is_imaging_order


def test_is_imaging_order_on_the_hl7_examples():
    examples = {p.stem.removeprefix("ServiceRequest-"): json.loads(p.read_text()) for p in HL7.glob("*.json")}
    imaging = {name for name, sr in examples.items() if is_imaging_order(sr)}
    assert imaging == {"di", "example"}  # "Chest CT" and "Computed tomography of head"
    assert not is_imaging_order(hl7("myringotomy"))
    assert not is_imaging_order(hl7("colonoscopy"))


@pytest.mark.parametrize(
    ("text", "imaging"),
    [
        ("Chest CT", True),
        ("CT abdomen and pelvis with contrast", True),
        ("CTA head and neck", True),
        ("Computed tomography of head", True),
        ("MRI brain without contrast", True),
        ("MR Knee WO contrast", True),
        ("Magnetic resonance imaging of lumbar spine", True),
        ("US abdomen complete", True),
        ("Renal ultrasound", True),
        ("Obstetric sonogram", True),
        ("XR chest two views", True),
        ("Chest x-ray PA and lateral", True),
        ("Radiograph of left wrist", True),
        ("Mammogram screening", True),
        ("MG Breast Screening", True),
        ("PET/CT skull base to mid-thigh", True),
        ("NM bone scan", True),
        ("Transthoracic echocardiogram", True),
        ("DEXA scan", True),
        ("Colonoscopy", False),
        ("Insertion of grommets", False),
        ("Myringotomy and insertion of tympanic ventilation tube", False),
        ("Free T4", False),
        ("SARS-CoV-2 Ct value", False),
        ("CT/NG NAAT", False),
        ("Chlamydia trachomatis (CT) DNA", False),
        ("MR-proADM", False),
        ("Metformin 500 mg tablet", False),
        ("Metformin 500 MG tablet", False),
        ("Pet therapy visit", False),
        ("Please contact us", False),
        ("Therapeutic ultrasound to shoulder", False),
        ("Optical coherence tomography", False),
        ("Echovirus antibody", False),
        ("Coronary angiography", False),
    ],
)
def test_modality_text(text, imaging):
    assert names_imaging_modality(text) is imaging
    assert is_imaging_order(order(code={"text": text})) is imaging


def test_imaging_by_category_and_codes():
    unrelated = {"text": "Follow-up"}
    imaging_category = [{"coding": [{"system": SNOMED, "code": "363679005", "display": "Imaging"}]}]
    assert is_imaging_order(order(category=imaging_category, code=unrelated))
    assert is_imaging_order(order(category=[{"text": "Radiology"}], code=unrelated))
    assert not is_imaging_order(order(category=[coded(SNOMED, "71388002")], code=unrelated))  # procedure
    assert is_imaging_order(order(code=coded(SNOMED, "77477000")))
    assert is_imaging_order(order(code=coded(LOINC, "36643-5")))
    assert is_imaging_order(order(code=coded(LOINC, "99999-9", "CT Chest WO contrast")))
    assert not is_imaging_order(order(code=coded(LOINC, "2345-7", "Glucose")))
    # notes and reasons do not make an order an imaging order
    colonoscopy = order(code={"text": "Colonoscopy"}, note=[{"text": "prior CT abdomen normal"}])
    assert not is_imaging_order(colonoscopy)
    assert not is_imaging_order(order())


# --------------------------------------------------------------------------- build_model_input


def test_order_reason_notes_then_context():
    sr = order(
        code={"coding": [{"system": SNOMED, "code": "x", "display": "CT of abdomen (procedure)"}]},
        bodySite=[{"text": "abdomen"}],
        orderDetail=[{"text": "with IV contrast"}],
        reasonCode=[{"text": "RLQ   pain\nr/o appendicitis"}],
        note=[{"text": "Pain since\tyesterday."}, {"text": "Afebrile."}],
        patientInstruction="Nothing by mouth 4 h",
        category=[{"coding": [{"system": SNOMED, "code": "363679005", "display": "Imaging"}]}],
    )
    context = [
        {"resourceType": "Condition", "id": "c1", "code": {"text": "Crohn disease"}},
        {"resourceType": "Observation", "id": "o1", "code": {"text": "WBC"},
         "valueQuantity": {"value": 14.2, "unit": "10*3/uL"}, "interpretation": [{"text": "High"}]},
        {"resourceType": "AllergyIntolerance", "id": "a1", "code": {"text": "Iodinated contrast"}},
        text_doc("ED note:\n tender McBurney point", "text/plain; charset=utf-8"),
        {"resourceType": "Binary", "contentType": "text/plain", "data": b64("Prior appendectomy? no")},
        {"resourceType": "Patient", "id": "p1", "name": [{"text": "ignored"}]},
    ]
    assert build_model_input(sr, context) == (
        "order: CT of abdomen | site: abdomen | detail: with IV contrast | reason: RLQ pain r/o appendicitis"
        " | note: Pain since yesterday. Afebrile. | instructions: Nothing by mouth 4 h | category: Imaging"
        " | context: condition: Crohn disease; observation: WBC: 14.2 10*3/uL (High);"
        " allergy: Iodinated contrast; document: ED note: tender McBurney point;"
        " document: Prior appendectomy? no"
    )


def test_deterministic_and_normalised():
    sr = hl7("myringotomy")
    first = build_model_input(sr)
    assert first == build_model_input(json.loads(json.dumps(sr)))
    assert "  " not in first and "\n" not in first and first == first.strip()
    # the zero-width space inside the LOINC display is dropped
    ft4 = order(code=coded(LOINC, "3024-7", "Thyroxine (T4) free [Mass/\u200bvolume]"))
    assert build_model_input(ft4) == "order: Thyroxine (T4) free [Mass/volume]"


def test_code_without_text_or_display_falls_back_to_the_code():
    assert build_model_input(order(code=coded(LOINC, "24627-2"))) == "order: loinc 24627-2"


def test_contained_context_and_void_context():
    assert build_model_input(hl7("physiotherapy")).endswith("context: condition: Cystic Fibrosis")
    assert "observation: Fasting status - Reported: Yes" in build_model_input(hl7("lipid"))
    refuted = {"resourceType": "Condition", "id": "c", "code": {"text": "Pneumonia"},
               "verificationStatus": {"coding": [{"code": "refuted"}]}}
    resolved = {"resourceType": "Condition", "id": "r", "code": {"text": "Asthma"},
                "clinicalStatus": {"coding": [{"code": "resolved"}]}}
    voided = {"resourceType": "Observation", "id": "v", "status": "entered-in-error", "code": {"text": "Hb"}}
    text = build_model_input(order(code={"text": "CT chest"}), [refuted, resolved, voided, resolved])
    assert text == "order: CT chest | context: past condition: Asthma"


def test_context_bundle_is_flattened_and_non_text_attachments_ignored():
    marfan = {"resourceType": "Condition", "code": coded(SNOMED, "1", "Marfan syndrome (disorder)")}
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": marfan}, {"resource": text_doc("%PDF-1.4", "application/pdf")},
    ]}
    expected = "order: Echo | context: condition: Marfan syndrome"
    assert build_model_input(order(code={"text": "Echo"}), [bundle]) == expected


def test_long_inputs_are_capped_with_the_order_kept():
    huge = {"resourceType": "DocumentReference", "id": "d",
            "content": [{"attachment": {"contentType": "text/plain", "data": b64("word " * 50_000)}}]}
    text = build_model_input(order(code={"text": "MRI brain"}, note=[{"text": "note " * 5000}]), [huge] * 1)
    assert text.startswith("order: MRI brain | note: note note") and len(text) <= MAX_INPUT_CHARS


# --------------------------------------------------------------------------- clinical_text and friends


def test_clinical_text():
    assert clinical_text(order(code={"text": "CT head"})) == ""
    assert clinical_text(hl7("ft4")) == ""
    sr = order(code={"text": "CT head"}, reasonCode=[{"text": "headache"}], note=[{"text": "worst of life"}],
               patientInstruction="arrive early")
    ctx = [{"resourceType": "Condition", "id": "c", "code": {"text": "Hypertension"}}]
    expected = "reason: headache | note: worst of life | context: condition: Hypertension"
    assert clinical_text(sr, ctx) == expected
    full = build_model_input(sr, ctx)  # same segments, same format: no second preprocessing
    assert all(segment in full.split(" | ") for segment in clinical_text(sr, ctx).split(" | "))
    assert clinical_text(order(), ctx) == "context: condition: Hypertension"


def test_context_references():
    sr = order(
        reasonReference=[{"reference": "Condition/c1"}, {"reference": "#local"}, {"display": "no reference"},
                         {"reference": "Condition/c1"}],
        supportingInfo=[
            {"reference": "Observation/o1/_history/2"},
            {"reference": "https://evil.example/fhir/Observation/o2"},  # never sent our credentials
            {"reference": "DocumentReference/d1"},
            {"reference": "Specimen/s1"},  # nothing build_model_input renders
            {"reference": "Binary/b1"},
        ],
    )
    expected = ["Condition/c1", "Observation/o1/_history/2", "DocumentReference/d1", "Binary/b1"]
    assert context_references(sr) == expected
    assert context_references(hl7("ambulation")) == ["Observation/blood-pressure"]
    assert context_references(hl7("lipid")) == []  # its supportingInfo is contained


def test_service_request_from_text():
    assert build_model_input(service_request_from_text("x1", " CT  abdomen ")) == "order: CT abdomen"
    note = service_request_from_text("x2", "short stature, lens dislocation", field="note")
    assert clinical_text(note) == "note: short stature, lens dislocation"
    with pytest.raises(ValueError):
        service_request_from_text("x3", "text", field="reason")


# -- bounded work per event (issue 8, defect 6) ------------------------------------------------------


def _big_order(**fields) -> dict:
    return {"resourceType": "ServiceRequest", "id": "big", "status": "active", "intent": "order", **fields}


def test_model_input_work_is_bounded_by_the_output_not_the_event(monkeypatch):
    """8,000 notes and ~1 MB events: the join used to compare every value with every kept one
    (8,000 notes 2.2 s, a 1 MB event minutes). Now each field stops when its segment is full:
    the strings cleaned stay few and short whatever the event holds. The time ceiling is far above
    the expected milliseconds (speed figures come from ``ehr-worker bench``); it only catches a
    return to quadratic work, which takes seconds per case here."""
    import time

    import schemas.text as text_module

    cleaned: list[int] = []

    def counting_clean_text(value):
        cleaned.append(len(value) if isinstance(value, str) else 0)
        return clean_text(value)

    monkeypatch.setattr(text_module, "clean_text", counting_clean_text)
    cases = [
        _big_order(note=[{"text": f"note {i} reports pain"} for i in range(8000)]),
        _big_order(reasonCode=[{"text": f"reason {i}"} for i in range(40_000)]),  # ~1 MB
        _big_order(code={"coding": [{"system": "http://loinc.org", "code": str(i), "display": f"d {i}"} for i in range(20_000)]}),
        _big_order(note=[{"text": "word " * 200_000}]),  # one 1 MB note
        _big_order(supportingInfo=[{"reference": f"Observation/o{i}"} for i in range(20_000)]),
    ]
    for sr in cases:
        cleaned.clear()
        start = time.perf_counter()
        text = build_model_input(sr)
        references = context_references(sr)
        elapsed = time.perf_counter() - start
        assert len(cleaned) <= 2 * 256 + 20 and sum(cleaned) <= 3 * 16_000, (len(cleaned), sum(cleaned))
        assert elapsed < 1.0 and len(text) <= 2000 and len(references) <= 20


def test_bounded_join_gives_the_unbounded_text_for_real_orders():
    notes = [{"text": f"Note {i}."} for i in range(30)] + [{"text": "note 3."}]  # case-insensitive duplicate
    text = build_model_input(_big_order(note=notes))
    expected = " ".join(f"Note {i}." for i in range(30))
    assert text == "note: " + expected
