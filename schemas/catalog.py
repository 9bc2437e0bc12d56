"""Label catalogs: the imaging-protocol CodeSystem and the rare-disease coding systems.

The 34 protocol display names are fixed by DESIGN.md (people and tools match on them), and the
short codes are the stable keys that models, manifests and written Tasks use: never rename one,
only add. LOINC codes are given only where the LOINC/RSNA Radiology Playbook term matches the
protocol exactly (modality, region *and* contrast); a near miss would mislead downstream systems,
so the rest stay ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROTOCOL_SYSTEM = "https://ehr-worker.dev/fhir/CodeSystem/imaging-protocol"
PROTOCOL_CATALOG_VERSION = "1.0.0"

OMIM_SYSTEM = "https://omim.org"
ORPHA_SYSTEM = "https://www.orpha.net"
DECIPHER_SYSTEM = "https://www.deciphergenomics.org"
LOINC_SYSTEM = "http://loinc.org"

MODALITIES = ("CT", "MR", "US", "XR", "MG", "NM", "PT", "ECHO")
CONTRASTS = ("none", "with", "with-and-without", "n/a")


@dataclass(frozen=True)
class Protocol:
    code: str
    display: str
    modality: str
    body_region: str
    contrast: str
    loinc: str | None


def _p(
    code: str, display: str, modality: str, body_region: str, contrast: str, loinc: str | None = None
) -> Protocol:
    return Protocol(code, display, modality, body_region, contrast, loinc)


# Contrast for protocols whose name does not say: the department default for that study
# (MRI spine/joints plain; liver MRI, multiphase liver CT and pelvic MRI with and without).
# Ultrasound, radiography, mammography, nuclear medicine, PET and echo get "n/a": a
# radiotracer or an ultrasound enhancing agent is not what the contrast field tracks.
PROTOCOLS: tuple[Protocol, ...] = (
    _p("CT-HEAD-WO", "CT head without contrast", "CT", "head", "none", "30799-1"),
    _p("CT-HEAD-WWO", "CT head with and without contrast", "CT", "head", "with-and-without"),
    _p("CTA-HEAD-NECK", "CTA head and neck", "CT", "head-and-neck", "with"),
    _p("CT-CSPINE-WO", "CT cervical spine without contrast", "CT", "cervical-spine", "none"),
    _p("CT-CHEST-WO", "CT chest without contrast", "CT", "chest", "none", "29252-4"),
    _p("CT-CHEST-W", "CT chest with contrast", "CT", "chest", "with"),
    _p("CTA-CHEST-PE", "CTA chest pulmonary embolism protocol", "CT", "chest", "with"),
    _p("CT-ABDPEL-W", "CT abdomen and pelvis with contrast", "CT", "abdomen-pelvis", "with"),
    _p(
        "CT-ABDPEL-WO-STONE",
        "CT abdomen and pelvis without contrast renal stone protocol",
        "CT",
        "abdomen-pelvis",
        "none",
    ),
    _p("CT-ABD-LIVER-MP", "CT abdomen multiphase liver", "CT", "abdomen", "with-and-without"),
    _p("CT-SINUS-FACE", "CT sinus and facial bones", "CT", "sinuses-face", "none"),
    _p("MR-BRAIN-WO", "MRI brain without contrast", "MR", "brain", "none"),
    _p("MR-BRAIN-WWO", "MRI brain with and without contrast", "MR", "brain", "with-and-without"),
    _p("MR-CSPINE", "MRI cervical spine", "MR", "cervical-spine", "none"),
    _p("MR-LSPINE", "MRI lumbar spine", "MR", "lumbar-spine", "none"),
    _p("MR-KNEE", "MRI knee", "MR", "knee", "none"),
    _p("MR-SHOULDER", "MRI shoulder", "MR", "shoulder", "none"),
    _p("MR-ABD-LIVER-MRCP", "MRI abdomen liver and MRCP", "MR", "abdomen", "with-and-without"),
    _p("MR-PELVIS", "MRI pelvis", "MR", "pelvis", "with-and-without"),
    _p("US-ABD-COMPLETE", "US abdomen complete", "US", "abdomen", "n/a"),
    _p("US-RUQ", "US right upper quadrant", "US", "right-upper-quadrant", "n/a"),
    _p("US-PELVIS", "US pelvis", "US", "pelvis", "n/a"),
    _p("US-RENAL", "US renal", "US", "kidneys", "n/a"),
    _p("US-LE-VENOUS", "US lower extremity venous duplex", "US", "lower-extremity", "n/a"),
    _p("US-CAROTID", "US carotid duplex", "US", "neck", "n/a"),
    _p("US-THYROID", "US thyroid", "US", "neck", "n/a"),
    _p("US-OB", "US obstetric", "US", "gravid-uterus", "n/a"),
    _p("XR-CHEST-2V", "XR chest two views", "XR", "chest", "n/a", "36643-5"),
    _p("MG-SCREEN", "Mammography screening", "MG", "breast", "n/a", "24606-6"),
    _p("MG-DIAG", "Mammography diagnostic", "MG", "breast", "n/a", "24604-1"),
    _p("NM-BONE", "NM bone scan", "NM", "whole-body", "n/a"),
    _p("NM-MPI", "NM myocardial perfusion", "NM", "heart", "n/a"),
    _p("PET-CT-SKULL-THIGH", "PET/CT skull base to mid-thigh", "PT", "skull-base-to-mid-thigh", "n/a"),
    _p("ECHO-TTE", "Echocardiogram transthoracic", "ECHO", "heart", "n/a"),
)

_BY_CODE = {p.code: p for p in PROTOCOLS}
_BY_DISPLAY = {p.display.casefold(): p for p in PROTOCOLS}


def protocol_by_code(code: str) -> Protocol:
    """The protocol with this short code; ``KeyError`` when unknown (codes are case-sensitive)."""
    try:
        return _BY_CODE[code]
    except KeyError:
        raise KeyError(f"unknown protocol code {code!r}") from None


def protocol_by_display(name: str) -> Protocol:
    """The protocol with this display name, ignoring case and surrounding/repeated whitespace."""
    key = " ".join(name.split()).casefold()
    try:
        return _BY_DISPLAY[key]
    except KeyError:
        raise KeyError(f"unknown protocol display name {name!r}") from None


def protocol_codesystem() -> dict[str, Any]:
    """The protocol catalog as a FHIR R4 CodeSystem (``content: complete``), ready to PUT."""
    concepts = []
    for p in PROTOCOLS:
        properties: list[dict[str, Any]] = [
            {"code": "modality", "valueCode": p.modality},
            {"code": "body-region", "valueCode": p.body_region},
            {"code": "contrast", "valueCode": p.contrast},
        ]
        if p.loinc:
            properties.append({"code": "loinc", "valueCoding": {"system": LOINC_SYSTEM, "code": p.loinc}})
        concepts.append({"code": p.code, "display": p.display, "property": properties})
    return {
        "resourceType": "CodeSystem",
        "id": "imaging-protocol",
        "url": PROTOCOL_SYSTEM,
        "version": PROTOCOL_CATALOG_VERSION,
        "name": "EhrWorkerImagingProtocol",
        "title": "ehr-worker imaging protocols",
        "status": "active",
        "experimental": False,
        "publisher": "ehr-worker",
        "description": "Imaging protocols that the ehr-worker protocol model suggests for imaging orders.",
        "caseSensitive": True,
        "content": "complete",
        "count": len(PROTOCOLS),
        "property": [
            {"code": "modality", "description": "DICOM modality, or ECHO", "type": "code"},
            {"code": "body-region", "description": "Body region imaged", "type": "code"},
            {"code": "contrast", "description": "none | with | with-and-without | n/a", "type": "code"},
            {"code": "loinc", "uri": LOINC_SYSTEM, "description": "Equivalent LOINC code", "type": "Coding"},
        ],
        "concept": concepts,
    }


# HPO annotation database prefixes (phenotype.hpoa `database_id`) -> FHIR coding systems.
_DISEASE_PREFIXES = {
    "OMIM": OMIM_SYSTEM,
    "ORPHA": ORPHA_SYSTEM,
    "ORPHANET": ORPHA_SYSTEM,
    "DECIPHER": DECIPHER_SYSTEM,
}
_DISEASE_SYSTEM_PREFIX = {OMIM_SYSTEM: "OMIM", ORPHA_SYSTEM: "ORPHA", DECIPHER_SYSTEM: "DECIPHER"}


def disease_coding(database_id: str) -> tuple[str, str]:
    """``"OMIM:203400"`` -> ``("https://omim.org", "203400")``; also ORPHA and DECIPHER ids."""
    prefix, sep, code = database_id.strip().partition(":")
    system = _DISEASE_PREFIXES.get(prefix.strip().upper())
    code = code.strip()
    if not sep or system is None or not code:
        raise ValueError(f"not an OMIM/ORPHA/DECIPHER disease id: {database_id!r}")
    return system, code


def disease_database_id(system: str, code: str) -> str:
    """The inverse of :func:`disease_coding`: ``("https://omim.org", "203400")`` -> ``"OMIM:203400"``."""
    try:
        return f"{_DISEASE_SYSTEM_PREFIX[system]}:{code}"
    except KeyError:
        raise ValueError(f"not a disease coding system: {system!r}") from None


# --------------------------------------------------------------------------- a hospital's own catalog

LOCAL_PROTOCOL_SYSTEM = "urn:ehr-worker:local-protocol"  # a CSV that names no system


@dataclass(frozen=True)
class ProtocolCatalog:
    """A protocol catalog: its coding system, the protocols (label order) and example indications."""

    system: str
    protocols: tuple[Protocol, ...]
    examples: dict[str, tuple[str, ...]]

    @property
    def is_default(self) -> bool:
        return self.system == PROTOCOL_SYSTEM and self.protocols == PROTOCOLS

    def attributes(self) -> list[dict[str, str]]:
        """What a manifest stores so that the worker can restrict to the ordered exam."""
        return [{"code": p.code, "display": p.display, "modality": p.modality, "body_region": p.body_region,
                 "contrast": p.contrast} for p in self.protocols]


DEFAULT_CATALOG = ProtocolCatalog(PROTOCOL_SYSTEM, PROTOCOLS, {})
_CSV_REQUIRED = ("code", "display", "modality", "region", "contrast")


def load_protocol_catalog(path) -> ProtocolCatalog:
    """A hospital's catalog from a CSV (columns ``code, display, modality, region, contrast``;
    optional ``system``, ``loinc`` and ``examples`` - example indications separated by ``|``) or a
    FHIR R4 CodeSystem JSON (``url`` = system; concept properties ``modality``, ``body-region``,
    ``contrast``, optional ``example`` strings). Raises ``ValueError`` naming the row and problem."""
    import csv
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such catalog file")
    if path.suffix.lower() == ".json":
        return _catalog_from_codesystem(json.loads(path.read_text(encoding="utf-8-sig")), str(path))
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        missing = [c for c in _CSV_REQUIRED if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(_CSV_REQUIRED)})")
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    systems = {r.get("system", "") for r in rows} - {""}
    if len(systems) > 1:
        raise ValueError(f"{path}: one catalog, one system; found {', '.join(sorted(systems))}")
    protocols, examples = [], {}
    for n, r in enumerate(rows, start=2):
        protocols.append(_checked(r["code"], r["display"], r["modality"], r["region"], r["contrast"],
                                  r.get("loinc") or None, f"{path}:{n}"))
        if r.get("examples"):
            examples[r["code"]] = tuple(x.strip() for x in r["examples"].split("|") if x.strip())
    return _catalog(next(iter(systems), LOCAL_PROTOCOL_SYSTEM), protocols, examples, str(path))


def _catalog_from_codesystem(cs: Any, where: str) -> ProtocolCatalog:
    if not isinstance(cs, dict) or cs.get("resourceType") != "CodeSystem" or not cs.get("url"):
        raise ValueError(f"{where}: expected a FHIR CodeSystem with a url")
    protocols, examples = [], {}
    for n, concept in enumerate(cs.get("concept") or []):
        props: dict[str, list[Any]] = {}
        for prop in concept.get("property") or []:
            value = next((prop[k] for k in prop if k.startswith("value")), None)
            props.setdefault(prop.get("code"), []).append(value)
        first = {k: (v[0] if v else "") for k, v in props.items()}
        loinc = first.get("loinc")
        protocols.append(_checked(str(concept.get("code", "")), str(concept.get("display", "")), str(first.get("modality", "")),
                                  str(first.get("body-region", "")), str(first.get("contrast", "")),
                                  loinc.get("code") if isinstance(loinc, dict) else None, f"{where}: concept[{n}]"))
        if props.get("example"):
            examples[protocols[-1].code] = tuple(str(x) for x in props["example"] if x)
    return _catalog(str(cs["url"]), protocols, examples, where)


def _checked(code: str, display: str, modality: str, region: str, contrast: str, loinc: str | None, where: str) -> Protocol:
    if not code or not display:
        raise ValueError(f"{where}: code and display are required")
    modality = modality.upper()
    if modality not in MODALITIES:
        raise ValueError(f"{where}: modality {modality!r} is not one of {', '.join(MODALITIES)}")
    contrast = contrast.lower()
    if contrast not in CONTRASTS:
        raise ValueError(f"{where}: contrast {contrast!r} is not one of {', '.join(CONTRASTS)}")
    if not region:
        raise ValueError(f"{where}: region is required (e.g. head, chest, lumbar-spine; see the default catalog)")
    return Protocol(code, display, modality, region.lower(), contrast, loinc)


def _catalog(system: str, protocols: list[Protocol], examples: dict, where: str) -> ProtocolCatalog:
    if len(protocols) < 2:
        raise ValueError(f"{where}: a catalog needs at least 2 protocols")
    codes = [p.code for p in protocols]
    dupes = sorted({c for c in codes if codes.count(c) > 1})
    if dupes:
        raise ValueError(f"{where}: duplicate code(s) {', '.join(dupes)}")
    return ProtocolCatalog(system, tuple(protocols), examples)
