"""The ordered exam: parsing order codes and texts, and which protocols each kind of exam allows."""

from __future__ import annotations

import pytest

from schemas.catalog import LOINC_SYSTEM, PROTOCOL_SYSTEM, PROTOCOLS, protocol_by_code
from schemas.exam_mask import ExamMasker, catalog_traits, compatible_mask
from schemas.exams import CPT_SYSTEM, parse_exam_text, parse_ordered_exam

TRAITS = catalog_traits()


def allowed(text: str) -> set[str]:
    weights = compatible_mask(parse_exam_text(text), TRAITS)
    assert weights is not None, f"{text!r} should name an exam"
    return {p.code for p, w in zip(PROTOCOLS, weights) if w > 0}


def preferred(text: str) -> set[str]:
    weights = compatible_mask(parse_exam_text(text), TRAITS)
    assert weights is not None
    return {p.code for p, w in zip(PROTOCOLS, weights) if w == 1.0}


# (ordered exam as hospitals write it, the protocols it allows)
EXAMS = [
    ("CT CHEST W CONTRAST", {"CT-CHEST-WO", "CT-CHEST-W", "CTA-CHEST-PE"}),
    ("CT chest", {"CT-CHEST-WO", "CT-CHEST-W", "CTA-CHEST-PE"}),
    ("CTA chest PE protocol", {"CTA-CHEST-PE"}),
    ("CT HEAD WO CONTRAST", {"CT-HEAD-WO", "CT-HEAD-WWO"}),
    ("CT head", {"CT-HEAD-WO", "CT-HEAD-WWO", "CTA-HEAD-NECK"}),
    ("CTA HEAD/NECK", {"CTA-HEAD-NECK"}),
    ("CT C-SPINE WO", {"CT-CSPINE-WO"}),
    ("CT ABD/PELVIS W CONTRAST", {"CT-ABDPEL-W", "CT-ABDPEL-WO-STONE", "CT-ABD-LIVER-MP"}),
    ("CT abdomen", {"CT-ABDPEL-W", "CT-ABDPEL-WO-STONE", "CT-ABD-LIVER-MP"}),
    ("CT sinus wo", {"CT-SINUS-FACE"}),
    ("MRI BRAIN W/WO", {"MR-BRAIN-WO", "MR-BRAIN-WWO"}),
    ("MRI spine", {"MR-CSPINE", "MR-LSPINE"}),
    ("MRI L-SPINE WO", {"MR-LSPINE"}),
    ("MR C spine", {"MR-CSPINE"}),
    ("MRI R knee", {"MR-KNEE"}),
    ("MRI shoulder left", {"MR-SHOULDER"}),
    ("MRCP", {"MR-ABD-LIVER-MRCP"}),
    ("MRI pelvis w/wo", {"MR-PELVIS"}),
    ("US OB", {"US-OB"}),
    ("US pelvis", {"US-PELVIS", "US-OB"}),
    ("US RUQ", {"US-RUQ", "US-ABD-COMPLETE"}),
    ("US renal", {"US-RENAL"}),
    ("US carotid duplex", {"US-CAROTID", "US-THYROID"}),
    ("US LE venous doppler bilat", {"US-LE-VENOUS"}),
    ("XR CHEST PA/LAT", {"XR-CHEST-2V"}),
    ("CXR", {"XR-CHEST-2V"}),
    ("MAMMO SCREENING BILAT", {"MG-SCREEN", "MG-DIAG"}),
    ("NM myocardial perfusion stress", {"NM-MPI"}),
    ("Nuclear stress test", {"NM-MPI"}),
    ("NM bone scan whole body", {"NM-BONE"}),
    ("PET/CT", {"PET-CT-SKULL-THIGH"}),
    ("PET CT skull base to mid thigh", {"PET-CT-SKULL-THIGH"}),
    ("ECHO TTE", {"ECHO-TTE"}),
    ("Echocardiogram complete", {"ECHO-TTE"}),
]


@pytest.mark.parametrize(("text", "expected"), EXAMS, ids=[t for t, _ in EXAMS])
def test_every_kind_of_ordered_exam_allows_only_its_protocols(text, expected):
    assert allowed(text) == expected
    # never another modality than the one ordered
    modality = parse_exam_text(text).modality
    assert {protocol_by_code(c).modality for c in expected} == {modality}


def test_contrast_and_named_variants_are_preferred_not_forced():
    assert preferred("MRI BRAIN W/WO") == {"MR-BRAIN-WWO"}
    assert preferred("MRI brain wo") == {"MR-BRAIN-WO"}
    assert preferred("CT HEAD W/O") == {"CT-HEAD-WO"}
    assert preferred("CT ABD/PELVIS W CONTRAST") == {"CT-ABDPEL-W", "CT-ABD-LIVER-MP"}
    assert preferred("CT abd/pel stone protocol") == {"CT-ABDPEL-WO-STONE"}
    assert preferred("Screening mammogram") == {"MG-SCREEN"}
    assert preferred("US thyroid") == {"US-THYROID"}
    # no contrast named: the indication decides
    assert preferred("MRI brain") == {"MR-BRAIN-WO", "MR-BRAIN-WWO"}


@pytest.mark.parametrize("text", ["Imaging study", "Radiology consult", "", "Outpatient imaging"])
def test_an_order_that_names_no_exam_is_not_masked(text):
    assert compatible_mask(parse_exam_text(text), TRAITS) is None


def test_an_exam_the_catalog_lacks_gets_the_nearest_protocols():
    # no thoracic spine protocol: the other spinal segments of that modality
    assert allowed("MRI T-spine w/wo") == {"MR-CSPINE", "MR-LSPINE"}
    # no MRI of the ankle: any MRI (the model decides), never another modality
    assert {protocol_by_code(c).modality for c in allowed("MRI ankle")} == {"MR"}


@pytest.mark.parametrize(
    ("text", "modality", "regions", "contrast", "laterality"),
    [
        ("CT ABD/PELVIS W CONTRAST", "CT", {"abdomen-pelvis"}, "with", None),
        ("MRI BRAIN W/WO", "MR", {"head"}, "with-and-without", None),
        ("MRI brain w & w/o contrast", "MR", {"head"}, "with-and-without", None),
        ("CT head non-contrast", "CT", {"head"}, "none", None),
        ("MRI L knee wo", "MR", {"knee"}, "none", "left"),
        ("US LE venous duplex bilateral", "US", {"lower-extremity"}, None, "bilateral"),
        ("MRI RT SHOULDER", "MR", {"shoulder"}, None, "right"),
        ("US RUQ", "US", {"ruq"}, None, None),
        ("PET/CT skull base to mid-thigh", "PT", {"whole-body"}, None, None),
    ],
)
def test_parse_exam_text(text, modality, regions, contrast, laterality):
    exam = parse_exam_text(text)
    assert (exam.modality, set(exam.regions), exam.contrast, exam.laterality) == (modality, regions, contrast, laterality)


def test_codes_fix_the_exam_and_text_fills_the_gaps():
    sr = {"code": {"coding": [{"system": CPT_SYSTEM, "code": "70553", "display": "MRI brain"}]}}
    exam = parse_ordered_exam(sr)
    assert (exam.modality, exam.regions, exam.contrast, exam.source) == ("MR", {"head"}, "with-and-without", "cpt")
    sr = {"code": {"coding": [{"system": CPT_SYSTEM, "code": "72148"}]}}
    assert allowed_for(sr) == {"MR-LSPINE"}
    sr = {"code": {"coding": [{"system": LOINC_SYSTEM, "code": "24627-2"}], "text": "CT chest w contrast"}}
    exam = parse_ordered_exam(sr)
    assert (exam.modality, exam.contrast, exam.source) == ("CT", "with", "loinc")
    # a coding in the protocol system names the protocol outright
    sr = {"code": {"coding": [{"system": PROTOCOL_SYSTEM, "code": "US-RENAL"}], "text": "US abdomen"}}
    assert allowed_for(sr) == {"US-RENAL"}
    # a local code with text: the text is read
    sr = {"code": {"coding": [{"system": "urn:oid:1.2.3.4", "code": "IMG123", "display": "NM CARDIAC STRESS"}]}}
    assert allowed_for(sr) == {"NM-MPI"}


def allowed_for(sr: dict) -> set[str]:
    weights = ExamMasker(PROTOCOLS).weights(sr)
    assert weights is not None
    return {p.code for p, w in zip(PROTOCOLS, weights) if w > 0}


def _order(code_text: str, note: str) -> dict:
    return {"resourceType": "ServiceRequest", "id": "x", "code": {"text": code_text}, "note": [{"text": note}]}


def favoured(code_text: str, note: str) -> set[str]:
    weights = ExamMasker(PROTOCOLS).weights(_order(code_text, note))
    assert weights is not None
    top = max(weights)
    return {p.code for p, w in zip(PROTOCOLS, weights) if w == top}


@pytest.mark.parametrize(
    ("note", "segment"),
    [
        ("neck pain radiating down the right arm with numbness in the thumb", "MR-CSPINE"),
        ("arm numbness", "MR-CSPINE"),
        ("progressive hand clumsiness, positive Hoffmann sign, r/o cervical myelopathy", "MR-CSPINE"),
        ("low back pain", "MR-LSPINE"),
        ("sciatica L leg x 6 wks", "MR-LSPINE"),
        ("LBP radiating to the buttock, no neck pain", "MR-LSPINE"),
        ("saddle anesthesia and urinary retention", "MR-LSPINE"),
    ],
)
def test_spinal_segment_follows_the_symptoms(note, segment):
    assert favoured("MRI spine", note) == {segment}
    assert allowed("MRI spine") == {"MR-CSPINE", "MR-LSPINE"}  # the other segment stays listed


@pytest.mark.parametrize(
    ("note", "protocol"),
    [
        ("brain tumor follow-up", "MR-BRAIN-WWO"),
        ("new onset seizure", "MR-BRAIN-WWO"),
        ("optic neuritis, painful vision loss", "MR-BRAIN-WWO"),
        ("MS, new numbness", "MR-BRAIN-WWO"),
        ("fever, headache, r/o brain abscess", "MR-BRAIN-WWO"),
        ("metastatic lung cancer, new headache", "MR-BRAIN-WWO"),
        ("acute stroke symptoms, CT negative for bleed", "MR-BRAIN-WO"),
        ("memory loss, r/o dementia", "MR-BRAIN-WO"),
        ("head trauma with persistent symptoms", "MR-BRAIN-WO"),
        ("seizure work-up, 20 weeks pregnant", None),  # cues on both sides: the model decides
    ],
)
def test_contrast_follows_the_indication(note, protocol):
    expected = {protocol} if protocol else {"MR-BRAIN-WO", "MR-BRAIN-WWO"}
    assert favoured("MRI BRAIN", note) == expected
    # a contrast named in the order is not overridden by the cues
    assert favoured("MRI BRAIN W/WO", note) == {"MR-BRAIN-WWO"}


def test_other_indication_cues():
    assert favoured("CT CHEST W CONTRAST", "SOB, positive D-dimer, r/o PE") == {"CTA-CHEST-PE"}
    assert favoured("CT ABD/PELVIS", "R flank pain and hematuria, h/o stones") == {"CT-ABDPEL-WO-STONE"}
    assert favoured("US PELVIS", "positive hCG, pain, r/o ectopic") == {"US-OB"}
    assert favoured("US PELVIS", "postmenopausal bleeding") == {"US-PELVIS"}
