"""The ordered exam as structure: an order's code -> modality, body region, laterality, contrast and
any protocol it already names.

Protocoling decides *how* to perform the exam that was ordered; it does not change the exam. So the
protocol model scores only the protocols compatible with the ordered exam (``schemas.exam_mask``),
and an order that names no exam (no code, or "Imaging study") keeps every protocol.

Sources, most specific first: CPT codes (AMA CPT radiology and echo ranges: facts), a few LOINC and
SNOMED CT imaging codes whose meaning is certain (LOINC/RSNA Radiology Playbook attributes), then the
code's text and the codings' displays, read with patterns for the way hospitals name exams
("CT ABD/PELVIS W CONTRAST", "MRI BRAIN W/WO", "XR CHEST PA/LAT", "NM myocardial perfusion stress",
"US OB", "PET/CT", "ECHO TTE"). Laterality is parsed and reported, but the catalog has no
laterality to filter on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from schemas.catalog import LOINC_SYSTEM, PROTOCOL_SYSTEM, PROTOCOLS, Protocol
from schemas.fhirjson import clean_text, codings

SNOMED_SYSTEM = "http://snomed.info/sct"
CPT_SYSTEM = "http://www.ama-assn.org/go/cpt"

WITH, WITHOUT, WITH_AND_WITHOUT = "with", "none", "with-and-without"


@dataclass(frozen=True)
class OrderedExam:
    """What an order asks for. Every field may be unknown (``None`` / empty)."""

    modality: str | None = None  # one of schemas.catalog.MODALITIES
    regions: frozenset[str] = frozenset()  # order regions (keys of ORDER_REGIONS)
    laterality: str | None = None  # left | right | bilateral
    contrast: str | None = None  # none | with | with-and-without
    angio: bool = False  # CTA / MRA / "angiogram"
    hints: frozenset[str] = frozenset()  # protocol words the order names ("stone", "screening", ...)
    protocol: str | None = None  # a catalog code the order names outright (protocol system coding)
    source: str = "none"  # where it came from: protocol | cpt | loinc | snomed | text | none

    @property
    def names_exam(self) -> bool:
        """True when the order says enough (a modality or a region) to restrict the protocols."""
        return self.protocol is not None or self.modality is not None or bool(self.regions)

    def describe(self) -> str:
        """Codes only ("CT chest with"), for logs and Task notes: no free text."""
        bits = [self.modality or "?", "/".join(sorted(self.regions)) or "?"]
        if self.contrast:
            bits.append(self.contrast)
        if self.angio:
            bits.append("angio")
        if self.laterality:
            bits.append(self.laterality)
        return " ".join(bits)


# --------------------------------------------------------------------------- order regions

# Order region -> the catalog ``body_region`` values it covers. A "CT abdomen" order may be done as
# an abdomen-pelvis protocol; a "US pelvis" on a pregnant patient is an obstetric scan.
ORDER_REGIONS: dict[str, frozenset[str]] = {
    "head": frozenset({"head", "brain", "head-and-neck"}),
    "face": frozenset({"sinuses-face"}),
    "neck": frozenset({"neck", "head-and-neck", "cervical-spine"}),
    "carotid": frozenset({"neck", "head-and-neck"}),
    "thyroid": frozenset({"neck"}),
    "cervical-spine": frozenset({"cervical-spine"}),
    # no thoracic spine protocol in the default catalog: the other segments are the nearest
    "thoracic-spine": frozenset({"thoracic-spine", "cervical-spine", "lumbar-spine"}),
    "lumbar-spine": frozenset({"lumbar-spine"}),
    "spine": frozenset({"cervical-spine", "thoracic-spine", "lumbar-spine", "spine"}),
    "chest": frozenset({"chest"}),
    "heart": frozenset({"heart"}),
    "breast": frozenset({"breast"}),
    "abdomen": frozenset({"abdomen", "abdomen-pelvis", "right-upper-quadrant", "kidneys"}),
    "ruq": frozenset({"right-upper-quadrant", "abdomen"}),
    "abdomen-pelvis": frozenset({"abdomen-pelvis", "abdomen", "pelvis"}),
    "pelvis": frozenset({"pelvis", "abdomen-pelvis", "gravid-uterus"}),
    "obstetric": frozenset({"gravid-uterus"}),
    "kidneys": frozenset({"kidneys", "abdomen-pelvis"}),
    "lower-extremity": frozenset({"lower-extremity", "knee"}),
    "knee": frozenset({"knee"}),
    "shoulder": frozenset({"shoulder"}),
    "upper-extremity": frozenset({"upper-extremity", "shoulder"}),
    "whole-body": frozenset({"whole-body", "skull-base-to-mid-thigh"}),
}

# Words that name a protocol more precisely than its region; a protocol "matches" a hint when its
# display or code contains one of the hint's words. Used only to narrow among compatible protocols.
HINT_WORDS: dict[str, tuple[str, ...]] = {
    "carotid": ("carotid",),
    "thyroid": ("thyroid",),
    "sinus": ("sinus", "facial", "face"),
    "stone": ("stone",),
    "pe": ("embolism", "pe"),
    "liver": ("liver",),
    "mrcp": ("mrcp",),
    "venous": ("venous", "dvt"),
    "renal": ("renal",),
    "ruq": ("right upper quadrant", "ruq"),
    "obstetric": ("obstetric", "ob"),
    "screening": ("screening", "screen"),
    "diagnostic": ("diagnostic", "diag"),
    "perfusion": ("perfusion", "mpi"),
    "bone-scan": ("bone scan", "bone"),
    "transthoracic": ("transthoracic", "tte"),
}

# --------------------------------------------------------------------------- text patterns


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


# Modality patterns, tried in order: PET/CT and SPECT/CT are nuclear exams, not CT; a CT KUB is CT.
_MODALITY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("PT", _rx(r"\bpet\b|positron|\bfdg\b")),
    ("ECHO", _rx(r"\becho\w*|\btte\b|\btee\b|transthoracic")),
    ("NM", _rx(r"\bnm\b|nuclear|scintigra|\bspect\b|\bmpi\b|myocardial\s+perfusion|sestamibi|\bmibi\b|"
               r"thallium|tetrofosmin|lexiscan|regadenoson|\bbone\s+scan|\bmuga\b|\bhida\b|\bv/?q\b")),
    ("MG", _rx(r"mammo\w*|\bmg\b|tomosynthesis|\bdbt\b")),
    ("MR", _rx(r"\bmri?\b|\bmra\b|\bmrv\b|\bmrcp\b|magnetic\s+resonance|\bmri?[-/]|\bnmr\b")),
    ("CT", _rx(r"\bct\b|\bcta\b|\bctpa\b|\bctv\b|\bcat\s+scan|computed\s+tomograph|computeri[sz]ed\s+(?:axial\s+)?"
               r"tomograph|\bncct\b|\bcect\b|\bhrct\b|\bldct\b|\bct[-/]|\bcta[-/]")),
    ("US", _rx(r"\bus\b|\bu/s\b|ultrasound|ultrasonograph|sonogra|\bduplex\b|doppler|\btvus\b|\bsono\b|\busg\b")),
    ("XR", _rx(r"\bxr\b|\bcxr\b|x-?ray|radiograph|\bplain\s+film|\b[1-4]\s*v(?:iews?|w)?\b|\bpa\s*(?:/|and|&)\s*lat|"
               r"\bpa\s+lateral|\bkub\b|\bdx\b")),
)
# A stress test with no modality word is a nuclear myocardial perfusion study in this catalog.
_STRESS = _rx(r"\bstress\b|\bcardiac\s+perfusion")

_REGION_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("obstetric", _rx(r"(?<!non-)(?<!non )\bob\b|obstet|pregnan|\bfetal|gestation|\bnuchal|\bbpp\b|biophysical|\btrimester|\bnt\s+scan|dating")),
    ("carotid", _rx(r"carotid")),
    ("thyroid", _rx(r"thyroid|parathyroid")),
    ("face", _rx(r"sinus|facial|\bface\b|maxillofacial|\borbit|mandible|\bmaxfac")),
    ("cervical-spine", _rx(r"\bc[-\s]?spine|cervical\s+spine|\bcspine|spine\s+cervical|\bc\d\s*-\s*c?\d|neck\s+spine")),
    ("thoracic-spine", _rx(r"\bt[-\s]?spine|thoracic\s+spine|\btspine|spine\s+thoracic|dorsal\s+spine")),
    ("lumbar-spine", _rx(r"\bl[-\s]?spine|lumbar|lumbosacral|\bls\s+spine|\blspine|spine\s+lumbar|\bl\d\s*-\s*[ls]?\d|\bsacrum")),
    ("spine", _rx(r"\bspine\b|spinal|\bback\b|\bwhole\s+spine|\bcomplete\s+spine")),
    ("head", _rx(r"\bhead\b|\bbrain\b|\bcranial|\bskull\b|\biac\b|\bpituitary|\bsella\b|intracranial|\bcerebr|\bneuro\b|stroke")),
    ("neck", _rx(r"\bneck\b|soft\s+tissue\s+neck")),
    ("heart", _rx(r"\bheart\b|cardiac|myocard|coronary|\bmpi\b|\btte\b|\becho\w*|lexiscan|\bstress\b|\bmuga\b|"
                  r"transthoracic")),
    ("breast", _rx(r"breast|mammo\w*|\bmg\b|tomosynthesis")),
    ("abdomen-pelvis", _rx(r"abd\w*\s*(?:/|&|and|\+|-)\s*pel\w*|\ba\s*/\s*p\b|\bctap\b|\babd\s*pel|abdominopelvic|"
                           r"\bkub\b|\bstone\s+protocol")),
    ("ruq", _rx(r"\bruq\b|right\s+upper\s+quadrant|gall\s*bladder|\bgb\b|biliary|hepatobiliary|\bliver\b|hepatic|"
                r"\bmrcp\b|pancrea")),
    ("kidneys", _rx(r"\brenal\b|kidney|\bbladder\b|retroperiton|\bkub\b|urogra|\bnephr")),
    ("abdomen", _rx(r"\babd\w*|\bbelly\b")),
    ("pelvis", _rx(r"pelvi\w*|\btvus\b|transvaginal|endovaginal|\buterus|ovar|\bprostate\b|\brectum\b|\bscrot")),
    ("chest", _rx(r"\bchest\b|thora\w*|\blungs?\b|pulmonary|\bcxr\b|\bctpa\b|\bribs?\b|\bpe\s+protocol|\bpa\s*/\s*lat")),
    ("knee", _rx(r"\bknee")),
    ("shoulder", _rx(r"shoulder|rotator\s+cuff")),
    ("lower-extremity", _rx(r"lower\s+(?:extremit|limb)|\ble\b|\bleg\b|\blegs\b|\bcalf|venous|\bdvt\b|\bfemoral\b|"
                            r"\blle\b|\brle\b|\bles\b")),
    ("upper-extremity", _rx(r"upper\s+(?:extremit|limb)|\bue\b|\barm\b|\belbow|\bwrist|\bhand\b")),
    ("whole-body", _rx(r"whole\s+body|skull\s+base|mid[-\s]?thigh|\bbone\s+scan|total\s+body|\beyes?\s+to\s+thigh")),
)

_HINT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("carotid", _rx(r"carotid")),
    ("thyroid", _rx(r"thyroid")),
    ("sinus", _rx(r"sinus|facial|maxillofacial|\bface\b")),
    ("stone", _rx(r"stone|\bkub\b|urolith|renal\s+colic|\bcalcul")),
    ("pe", _rx(r"\bpe\b|\bctpa\b|pulmonary\s+(?:embol|angio)|\bpe\s+protocol|embolism")),
    ("liver", _rx(r"\bliver\b|hepatic|multi\s*-?\s*phas|tri\s*-?\s*phas|3\s*-?\s*phase|four\s*-?\s*phase|\bhcc\b")),
    ("mrcp", _rx(r"\bmrcp\b|cholangio")),
    ("venous", _rx(r"venous|\bdvt\b|\bvein")),
    ("renal", _rx(r"\brenal\b|kidney|retroperiton")),
    ("ruq", _rx(r"\bruq\b|right\s+upper\s+quadrant|gall\s*bladder|\bgb\b|biliary|hepatobiliary")),
    ("obstetric", _rx(r"(?<!non-)(?<!non )\bob\b|obstet|pregnan|\bfetal|gestation|\bnuchal|\bbpp\b|biophysical|trimester")),
    ("screening", _rx(r"screen")),
    ("diagnostic", _rx(r"diagnostic|\bdiag\b|\bdx\s+mammo|unilateral|\bspot\b|callback|call-back")),
    ("perfusion", _rx(r"perfusion|\bmpi\b|stress|lexiscan|regadenoson|sestamibi|\bmibi\b|tetrofosmin|thallium|spect")),
    ("bone-scan", _rx(r"bone\s+scan|skeletal\s+scint|\bmdp\b")),
    ("transthoracic", _rx(r"\btte\b|transthoracic")),
)

_ANGIO = _rx(r"\bcta\b|\bmra\b|\bctpa\b|angio\w*|\bcta[-/]|\bct\s+angio")
# Contrast, tried in order: "with and without" before either alone.
_CONTRAST_WWO = _rx(
    r"\bw\s*(?:/|\\)?\s*(?:and|&|\+|-)?\s*w\s*/?\s*o\b|\bwo\s*(?:/|&|and|\+|-)\s*w\b|w/o\s*(?:&|and|\+|/|-)\s*w/?\b|"
    r"with\s*(?:and|&|/|\+)\s*without|without\s*(?:and|&|/|\+)\s*with|\bpre\s*(?:and|&|/|-)\s*post|"
    r"\bw\s*&\s*w/?o\b|\bw\+wo\b|\bw/\s*wo\b|\bwwo\b|\bw-wo\b"
)
_CONTRAST_WO = _rx(
    r"\bw/o\b|\bwo\b|without|\bnon[-\s]?con\w*|\bnoncontrast|\bno\s+(?:iv\s+)?contrast|\bnc\b|\bncct\b|\bunenhanced|"
    r"\bplain\b|\bstone\s+protocol|\bkub\b|\bhrct\b|\bldct\b|low[-\s]dose"
)
_CONTRAST_W = _rx(
    r"\bw/\s*(?:iv\s+)?(?:contrast|con|gad\w*|dye)?|\bw\s+(?:iv\s+)?(?:contrast|con\b|gad)|\bw\s*$|\bw\b(?!\s*/?\s*o\b)|"
    r"with\s+(?:iv\s+|oral\s+and\s+iv\s+|gadolinium\s+)?contrast|\bwith\s+gad|\biv\s+contrast|contrast[-\s]enhanced|\bcect\b|"
    r"\benhanced\b|\bcta\b|\bctpa\b|\bangio|\bwith\b(?!\s*(?:and|&|/)\s*without)|\bpe\s+protocol|multi\s*-?\s*phas|"
    r"tri\s*-?\s*phas|\bgad\b|\bcontrast\b"
)
_LEFT = _rx(r"\bleft\b|\blt\b|\bl\s+(?=knee|shoulder|breast|leg|arm|hip|ankle|foot|le\b|ue\b)|\(l\)|\blle\b|\blue\b")
_RIGHT = _rx(r"\bright\b(?!\s+upper\s+quadrant)|\brt\b|\br\s+(?=knee|shoulder|breast|leg|arm|hip|ankle|foot|le\b|ue\b)|\(r\)|"
             r"\brle\b|\brue\b")
_BILATERAL = _rx(r"\bbilat\w*|\bboth\b|\bbil\b|\bb/l\b")


def parse_exam_text(text: str) -> OrderedExam:
    """Structure from an exam name as hospitals write it ("CT ABD/PELVIS W CONTRAST")."""
    return _parse_exam_text(clean_text(text))


@lru_cache(maxsize=8192)  # a hospital's order catalog repeats the same few hundred names
def _parse_exam_text(text: str) -> OrderedExam:
    if not text:
        return OrderedExam()
    modality = next((m for m, rx in _MODALITY_PATTERNS if rx.search(text)), None)
    regions = {r for r, rx in _REGION_PATTERNS if rx.search(text)}
    if modality is None and _STRESS.search(text) and not _rx(r"\becho|treadmill|\bekg|\becg").search(text):
        modality = "NM"
    angio = bool(_ANGIO.search(text)) and modality in ("CT", "MR", None)
    regions = _tidy_regions(regions, modality)
    contrast = _contrast(text, modality, angio)
    hints = frozenset(h for h, rx in _HINT_PATTERNS if rx.search(text))
    return OrderedExam(
        modality=modality,
        regions=frozenset(regions),
        laterality=_laterality(text),
        contrast=contrast,
        angio=angio,
        hints=hints,
        source="text" if (modality or regions) else "none",
    )


def _tidy_regions(regions: set[str], modality: str | None) -> set[str]:
    # "MRI cervical spine" also matches the neck pattern; "CT head and neck" is both; a specific
    # spinal segment makes the generic "spine" redundant; "abdomen/pelvis" covers both parts.
    if regions & {"cervical-spine", "thoracic-spine", "lumbar-spine"}:
        regions -= {"spine", "neck", "chest"}
    if "spine" in regions:
        regions.discard("neck")
    if "abdomen-pelvis" in regions:
        regions -= {"abdomen", "pelvis"}
        if modality == "CT":
            regions.discard("kidneys")  # "CT KUB" is an abdomen-pelvis protocol
    if "ruq" in regions:
        regions.discard("abdomen")
    if regions & {"carotid", "thyroid"}:
        regions.discard("neck")
    if "obstetric" in regions:
        regions.discard("pelvis")
    if modality in ("ECHO", "NM") and "heart" in regions:
        regions.discard("chest")
    if modality == "PT":
        # PET/CT is whole-body unless a region is named (a brain PET still maps to the nearest)
        regions = {"whole-body"} if not regions or "whole-body" in regions else regions | {"whole-body"}
    if modality == "MG":
        regions = {"breast"}
    if modality == "ECHO":
        regions = {"heart"}
    if "whole-body" in regions and modality not in ("PT", "NM"):
        regions.discard("whole-body")
    return regions


def _contrast(text: str, modality: str | None, angio: bool) -> str | None:
    if modality not in ("CT", "MR", None):
        return None  # ultrasound enhancing agents, radiotracers: not what the catalog's contrast tracks
    if _CONTRAST_WWO.search(text):
        return WITH_AND_WITHOUT
    if _CONTRAST_WO.search(text):
        return WITHOUT
    if angio or _CONTRAST_W.search(text):
        return WITH
    return None


def _laterality(text: str) -> str | None:
    if _BILATERAL.search(text):
        return "bilateral"
    left, right = bool(_LEFT.search(text)), bool(_RIGHT.search(text))
    if left and right:
        return "bilateral"
    return "left" if left else ("right" if right else None)


# --------------------------------------------------------------------------- codes


def _cpt(modality: str, region: str, contrast: str | None = None, angio: bool = False, *hints: str) -> OrderedExam:
    return OrderedExam(modality, frozenset({region}), None, contrast, angio, frozenset(hints), None, "cpt")


def _cpt_triplet(first: int, modality: str, region: str, *hints: str) -> dict[str, OrderedExam]:
    # CPT's without / with / with-and-without triplets (70450-70470, 71250-71270, 74176-74178, ...)
    return {str(first + i): _cpt(modality, region, c, False, *hints) for i, c in enumerate((WITHOUT, WITH, WITH_AND_WITHOUT))}


# CPT (AMA) diagnostic radiology, nuclear medicine and echocardiography codes (facts, not text).
CPT_EXAMS: dict[str, OrderedExam] = {
    "70450": _cpt("CT", "head", WITHOUT), "70460": _cpt("CT", "head", WITH), "70470": _cpt("CT", "head", WITH_AND_WITHOUT),
    **_cpt_triplet(70486, "CT", "face", "sinus"),
    **_cpt_triplet(70490, "CT", "neck"),
    "70496": _cpt("CT", "head", WITH, True), "70498": _cpt("CT", "neck", WITH, True),
    "70551": _cpt("MR", "head", WITHOUT), "70552": _cpt("MR", "head", WITH), "70553": _cpt("MR", "head", WITH_AND_WITHOUT),
    "70544": _cpt("MR", "head", WITHOUT, True), "70547": _cpt("MR", "neck", WITHOUT, True),
    **{str(c): _cpt("XR", "chest") for c in range(71045, 71049)},
    **_cpt_triplet(71250, "CT", "chest"),
    "71271": _cpt("CT", "chest", WITHOUT, False, "screening"),
    "71275": _cpt("CT", "chest", WITH, True, "pe"),
    **_cpt_triplet(72125, "CT", "cervical-spine"),
    **_cpt_triplet(72128, "CT", "thoracic-spine"),
    **_cpt_triplet(72131, "CT", "lumbar-spine"),
    "72141": _cpt("MR", "cervical-spine", WITHOUT), "72142": _cpt("MR", "cervical-spine", WITH),
    "72156": _cpt("MR", "cervical-spine", WITH_AND_WITHOUT),
    "72146": _cpt("MR", "thoracic-spine", WITHOUT), "72147": _cpt("MR", "thoracic-spine", WITH),
    "72157": _cpt("MR", "thoracic-spine", WITH_AND_WITHOUT),
    "72148": _cpt("MR", "lumbar-spine", WITHOUT), "72149": _cpt("MR", "lumbar-spine", WITH),
    "72158": _cpt("MR", "lumbar-spine", WITH_AND_WITHOUT),
    **_cpt_triplet(72192, "CT", "pelvis"),
    **_cpt_triplet(72195, "MR", "pelvis"),
    **_cpt_triplet(73221, "MR", "shoulder"),
    **_cpt_triplet(73721, "MR", "knee"),
    "74150": _cpt("CT", "abdomen", WITHOUT), "74160": _cpt("CT", "abdomen", WITH),
       "74170": _cpt("CT", "abdomen", WITH_AND_WITHOUT, False, "liver"),
    **_cpt_triplet(74176, "CT", "abdomen-pelvis"),
    "74174": _cpt("CT", "abdomen-pelvis", WITH, True),
    **_cpt_triplet(74181, "MR", "abdomen"),
    "76536": _cpt("US", "neck", None, False, "thyroid"),
    "76700": _cpt("US", "abdomen"), "76705": _cpt("US", "ruq", None, False, "ruq"),
    "76770": _cpt("US", "kidneys", None, False, "renal"), "76775": _cpt("US", "kidneys", None, False, "renal"),
    **{str(c): _cpt("US", "obstetric", None, False, "obstetric") for c in range(76801, 76829)},
    "76830": _cpt("US", "pelvis"), "76856": _cpt("US", "pelvis"), "76857": _cpt("US", "pelvis"),
    "93880": _cpt("US", "carotid", None, False, "carotid"), "93882": _cpt("US", "carotid", None, False, "carotid"),
    "93970": _cpt("US", "lower-extremity", None, False, "venous"), "93971": _cpt("US", "lower-extremity", None, False, "venous"),
    "77065": _cpt("MG", "breast", None, False, "diagnostic"), "77066": _cpt("MG", "breast", None, False, "diagnostic"),
    "77067": _cpt("MG", "breast", None, False, "screening"),
    **{str(c): _cpt("NM", "whole-body", None, False, "bone-scan") for c in (78300, 78305, 78306)},
    **{str(c): _cpt("NM", "heart", None, False, "perfusion") for c in range(78451, 78455)},
    **{str(c): _cpt("PT", "whole-body") for c in range(78811, 78817)},
    **{str(c): _cpt("ECHO", "heart", None, False, "transthoracic") for c in range(93303, 93309)},
    "93350": _cpt("ECHO", "heart"), "93351": _cpt("ECHO", "heart"),
}


def _coded(source: str, modality: str | None, region: str | None, contrast: str | None = None, *hints: str) -> OrderedExam:
    return OrderedExam(modality, frozenset({region} if region else ()), None, contrast, False, frozenset(hints), None, source)


# LOINC radiology terms (LOINC/RSNA Radiology Playbook attributes: modality, region, contrast) and
# SNOMED CT imaging procedures whose meaning is certain. Other codes are read from their display.
LOINC_EXAMS: dict[str, OrderedExam] = {
    "24627-2": _coded("loinc", "CT", "chest"),
    "29252-4": _coded("loinc", "CT", "chest", WITHOUT),
    "24725-4": _coded("loinc", "CT", "head"),
    "30799-1": _coded("loinc", "CT", "head", WITHOUT),
    "36643-5": _coded("loinc", "XR", "chest"),
    "24606-6": _coded("loinc", "MG", "breast", None, "screening"),
    "24604-1": _coded("loinc", "MG", "breast", None, "diagnostic"),
}
SNOMED_EXAMS: dict[str, OrderedExam] = {
    "77477000": _coded("snomed", "CT", None),
    "303653007": _coded("snomed", "CT", "head"),
    "169069000": _coded("snomed", "CT", "chest"),
    "113091000": _coded("snomed", "MR", None),
    "16310003": _coded("snomed", "US", None),
    "45036003": _coded("snomed", "US", "abdomen"),
    "363680008": _coded("snomed", "XR", None),
    "168537006": _coded("snomed", "XR", None),
    "399208008": _coded("snomed", "XR", "chest"),
    "71651007": _coded("snomed", "MG", "breast"),
    "24623002": _coded("snomed", "MG", "breast", None, "screening"),
    "82918005": _coded("snomed", "PT", "whole-body"),
    "40701008": _coded("snomed", "ECHO", "heart"),
    "433236007": _coded("snomed", "ECHO", "heart", None, "transthoracic"),
}
_CODE_TABLES = {CPT_SYSTEM: CPT_EXAMS, LOINC_SYSTEM: LOINC_EXAMS, SNOMED_SYSTEM: SNOMED_EXAMS}


def parse_ordered_exam(service_request: dict[str, Any], catalog: Sequence[Protocol] = PROTOCOLS,
                       catalog_system: str = PROTOCOL_SYSTEM) -> OrderedExam:
    """The exam an order asks for, from its ``code`` (codings first, then text and displays).

    A coding in the catalog's own system names the protocol outright. Coded facts win over text
    for the fields they fix; text fills in what the codes leave open (e.g. a LOINC "CT Chest" with
    "w contrast" in the text)."""
    code = service_request.get("code") if isinstance(service_request, dict) else None
    if not isinstance(code, dict):
        return OrderedExam()
    coded = OrderedExam()
    for coding in codings(code):
        system, value = coding.get("system"), clean_text(coding.get("code"))
        if system == catalog_system and any(p.code == value for p in catalog):
            p = next(p for p in catalog if p.code == value)
            return OrderedExam(p.modality, frozenset(), None, None, False, frozenset(), p.code, "protocol")
        table = _CODE_TABLES.get(str(system))
        if table and value in table:
            coded = table[value]
            break
    texts = [clean_text(code.get("text"))] + [clean_text(c.get("display")) for c in codings(code)]
    from_text = parse_exam_text(" ; ".join(t for t in texts if t))
    return merge(coded, from_text)


def merge(coded: OrderedExam, text: OrderedExam) -> OrderedExam:
    """Coded fields win; text fills the gaps (regions only when the code names none)."""
    if coded.source == "none":
        return text
    return replace(
        coded,
        modality=coded.modality or text.modality,
        regions=coded.regions or text.regions,
        laterality=coded.laterality or text.laterality,
        contrast=coded.contrast or text.contrast,
        angio=coded.angio or text.angio,
        hints=coded.hints | text.hints,
    )
