"""Is an order an imaging order? (DESIGN.md: category SNOMED CT 363679005 |Imaging|, or a code
that names an imaging procedure: a LOINC or SNOMED imaging code, or text naming a modality.)

Only the order's category and code are looked at: "prior CT showed..." in a note does not make a
colonoscopy an imaging order. Non-imaging orders get no protocol suggestion, so a false positive
costs a useless Task in a radiology worklist; the patterns lean towards precision.
"""

from __future__ import annotations

import re
from typing import Any

from schemas.catalog import LOINC_SYSTEM, PROTOCOL_SYSTEM, PROTOCOLS
from schemas.fhirjson import clean_text, codings, has_code, objects

SNOMED_SYSTEM = "http://snomed.info/sct"
V2_0074_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0074"

# Category codes meaning "imaging": SNOMED CT 363679005 |Imaging|, HL7 v2 table 0074 diagnostic
# service sections for radiology, and the LOINC part LP29684-5 |Radiology| (US Core).
_IMAGING_CATEGORIES: dict[str, frozenset[str]] = {
    SNOMED_SYSTEM: frozenset({"363679005"}),
    V2_0074_SYSTEM: frozenset({"RAD", "CT", "NMR", "NMS", "RUS", "VUS", "OUS", "CUS", "RX", "XRC"}),
    LOINC_SYSTEM: frozenset({"LP29684-5"}),
}
_IMAGING_CATEGORY_TEXT = re.compile(r"\b(?:imaging|radiology|radiography)\b", re.IGNORECASE)

# Order codes known to be imaging procedures. Kept to codes whose meaning is certain; anything
# else is decided by the display/text patterns below (LOINC radiology displays start with the
# modality, e.g. "CT Chest", "XR Chest 2 Views").
_IMAGING_CODES: dict[str, frozenset[str]] = {
    SNOMED_SYSTEM: frozenset(
        {
            "363679005",  # Imaging (procedure)
            "77477000",  # Computerized axial tomography (procedure)
            "303653007",  # Computed tomography of head
            "113091000",  # Magnetic resonance imaging (procedure)
            "241615005",  # Magnetic resonance imaging of breast
            "16310003",  # Diagnostic ultrasonography (procedure)
            "363680008",  # Radiographic imaging procedure (procedure)
            "168537006",  # Plain radiography (procedure)
            "71651007",  # Mammography (procedure)
            "82918005",  # Positron emission tomography (procedure)
            "40701008",  # Echocardiography (procedure)
        }
    ),
    # 24627-2 CT Chest, 24725-4 CT Head, and the catalog's own LOINC codes
    LOINC_SYSTEM: frozenset({"24627-2", "24725-4"} | {p.loinc for p in PROTOCOLS if p.loinc}),
    PROTOCOL_SYSTEM: frozenset(p.code for p in PROTOCOLS),
}

# Modality words. Abbreviations that are also ordinary words or units ("US", "PET", "MG" as in
# milligrams, "Ct" as in PCR cycle threshold, "MR" as in Mr) count only in upper case; "MG" only
# before a breast word. "Tomography" alone is not enough (optical coherence tomography is not
# radiology), nor is "angiography" (cardiac catheterisation) or therapeutic ultrasound.
_MODALITY_UPPER = re.compile(
    r"\b(?:CT|CTA|CTPA|CTV|MR|MRA|MRV|MRI|MRCP|US|XR|CXR|KUB|NM|PET|SPECT|TTE|TEE|DXA|DEXA)\b"
    r"|\bMG\s+(?i:breast|mammo)",
)
# Laboratory tests whose names contain those abbreviations: "CT/NG" (Chlamydia trachomatis /
# N. gonorrhoeae NAAT), "MR-proADM"/"MR-proANP" (mid-regional peptides).
_LAB_ABBREVIATIONS = re.compile(r"chlamydia|gonorrh|\bCT\s*/\s*NG\b|\bMR-?pro", re.IGNORECASE)
_MODALITY_WORDS = re.compile(
    r"\b(?:cat\s+scan|computed\s+tomograph\w*|computeri[sz]ed\s+(?:axial\s+)?tomograph\w*|mri|"
    r"magnetic\s+resonance|(?<!therapeutic\s)ultrasound(?!\s+therap)|ultrasonograph\w*|sonogra\w+|"
    r"echocardiogra\w+|echo(?!\s*virus)|x-?rays?|x\s+rays?|radiograph\w*|mammogra\w+|mammo|tomosynthesis|"
    r"positron\s+emission|scintigra\w+|nuclear\s+medicine|bone\s+scan|"
    r"myocardial\s+perfusion\s+(?:imaging|scan|study)|"
    r"bone\s+densitometry|dexa|fluoroscop\w*)\b",
    re.IGNORECASE,
)


def is_imaging_order(service_request: dict[str, Any]) -> bool:
    """True when the order's category is imaging, or its code is a known imaging code or names a
    modality."""
    for category in objects(service_request.get("category")):
        if has_code(category, _IMAGING_CATEGORIES):
            return True
        texts = [category.get("text")] + [c.get("display") for c in codings(category)]
        if any(isinstance(t, str) and _IMAGING_CATEGORY_TEXT.search(t) for t in texts):
            return True
    code = service_request.get("code")
    if not isinstance(code, dict):
        return False
    if has_code(code, _IMAGING_CODES):
        return True
    texts = [code.get("text")] + [c.get("display") for c in codings(code)]
    return any(isinstance(t, str) and names_imaging_modality(t) for t in texts)


def names_imaging_modality(text: str) -> bool:
    """True when ``text`` names an imaging modality ("Chest CT", "US abdomen", "Computed tomography
    of head"); false for "Colonoscopy", "Free T4", "Insertion of grommets"."""
    text = clean_text(text)
    if _MODALITY_WORDS.search(text):
        return True
    return bool(_MODALITY_UPPER.search(text)) and not _LAB_ABBREVIATIONS.search(text)
