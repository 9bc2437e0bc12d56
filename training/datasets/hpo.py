"""Parsing of the vendored HPO files (``training/data/hpo/``), cached once per process.

- ``phenotype.hpoa.gz``: HPO disease annotations, release 2023-01-27 (12 tab-separated columns,
  pre-2023-04 header names ``#DatabaseID DiseaseName Qualifier HPO_ID Reference Evidence Onset
  Frequency Sex Modifier Aspect Biocuration``).
- ``hp_terms.tsv.gz``: ``hpo_id, label, deprecated, replaced_by, exact_synonyms, other_synonyms,
  definition`` (synonyms separated by ``|``; other synonyms carry a ``[hasXxxSynonym]`` suffix).

Attribution: see ``training/data/NOTICE.md`` (Human Phenotype Ontology, https://hpo.jax.org).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

HPO_DIR = Path(__file__).resolve().parent.parent / "data" / "hpo"
ANNOTATIONS_PATH = HPO_DIR / "phenotype.hpoa.gz"
TERMS_PATH = HPO_DIR / "hp_terms.tsv.gz"
HPO_RELEASE = "2023-01-27"

# HPO frequency terms -> probability that a patient with the disease shows the feature.
FREQUENCY_TERMS = {
    "HP:0040280": 1.0,  # obligate
    "HP:0040281": 0.9,  # very frequent (80-99 %)
    "HP:0040282": 0.55,  # frequent (30-79 %)
    "HP:0040283": 0.17,  # occasional (5-29 %)
    "HP:0040284": 0.02,  # very rare (1-4 %)
    "HP:0040285": 0.0,  # excluded (0 %)
}
MISSING_FREQUENCY = 0.5

ONSET_TERMS = {
    "HP:0011461": "fetal",
    "HP:0030674": "antenatal",
    "HP:0034198": "antenatal",  # second trimester onset
    "HP:0034199": "antenatal",  # late first trimester onset
    "HP:0011460": "antenatal",  # embryonal onset
    "HP:0034197": "antenatal",  # third trimester onset
    "HP:0003577": "congenital",
    "HP:0003623": "neonatal",
    "HP:0003593": "infantile",
    "HP:0011463": "childhood",
    "HP:0003621": "juvenile",
    "HP:0003581": "adult",
    "HP:0011462": "young_adult",
    "HP:0025708": "young_adult",  # early young adult onset
    "HP:0025709": "young_adult",  # intermediate young adult onset
    "HP:0025710": "young_adult",  # late young adult onset
    "HP:0003596": "middle_age",
    "HP:0003584": "late",
}

INHERITANCE_TERMS = {
    "HP:0000006": "AD",
    "HP:0000007": "AR",
    "HP:0001419": "XLR",
    "HP:0001423": "XLD",
    "HP:0001417": "XL",
    "HP:0001427": "MT",
    "HP:0003745": "sporadic",
}

_SYN_SUFFIX = re.compile(r"\s*\[has(\w+)Synonym\]\s*$")


@dataclass(frozen=True)
class Term:
    hpo_id: str
    label: str
    exact_synonyms: tuple[str, ...]
    other_synonyms: tuple[str, ...]  # related/broad synonyms (narrow ones are dropped: too specific)


@dataclass(frozen=True)
class Disease:
    database_id: str  # "OMIM:203400"
    name: str
    features: tuple[tuple[str, float], ...]  # positive phenotypic abnormalities (HPO id, frequency)
    excluded: tuple[str, ...]  # NOT-qualified phenotypic abnormalities
    onsets: tuple[str, ...]  # coarse onset classes (ONSET_TERMS values): disease-level, else per-feature by count
    inheritance: tuple[str, ...]  # INHERITANCE_TERMS values
    sex: str | None  # "male" / "female" where the annotations say the disease affects one sex

    @property
    def n_features(self) -> int:
        return len(self.features)


def parse_frequency(value: str) -> float:
    """Frequency column -> probability: an HPO frequency term, a fraction ``n/m`` or a percentage."""
    value = value.strip()
    if not value:
        return MISSING_FREQUENCY
    if value in FREQUENCY_TERMS:
        return FREQUENCY_TERMS[value]
    try:
        if value.endswith("%"):
            return max(0.0, min(1.0, float(value[:-1]) / 100.0))
        if "/" in value:
            num, den = value.split("/", 1)
            if int(den) <= 0:
                return MISSING_FREQUENCY
            return max(0.0, min(1.0, float(Fraction(int(num), int(den)))))
    except (ValueError, ZeroDivisionError):
        return MISSING_FREQUENCY
    return MISSING_FREQUENCY


def _clean_synonym(s: str) -> tuple[str, str]:
    m = _SYN_SUFFIX.search(s)
    kind = m.group(1).lower() if m else "exact"
    return _SYN_SUFFIX.sub("", s).strip(), kind


def _usable_synonym(s: str) -> bool:
    # inverted forms ("Hearing loss, sensorineural, bilateral") and codes are not how notes read
    return bool(s) and "_" not in s and ", " not in s and len(s) <= 70 and not any(ch.isdigit() for ch in s[:1])


@lru_cache(maxsize=1)
def load_terms() -> dict[str, Term]:
    terms: dict[str, Term] = {}
    with gzip.open(TERMS_PATH, "rt", encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if header[:2] != ["hpo_id", "label"]:
            raise ValueError(f"{TERMS_PATH}: unexpected header {header!r}")
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 6:
                continue
            hpo_id, label = parts[0], parts[1]
            seen = {label.lower()}
            exact: list[str] = []
            for s in parts[4].split("|"):
                s = s.strip()
                if _usable_synonym(s) and s.lower() not in seen:
                    seen.add(s.lower())
                    exact.append(s)
            other: list[str] = []
            for raw in parts[5].split("|"):
                s, kind = _clean_synonym(raw)
                if kind == "narrow" or not _usable_synonym(s) or s.lower() in seen:
                    continue
                seen.add(s.lower())
                other.append(s)
            terms[hpo_id] = Term(hpo_id, label, tuple(exact), tuple(other))
    return terms


@lru_cache(maxsize=1)
def load_diseases() -> dict[str, Disease]:
    """All diseases of the annotation file, keyed by database id (OMIM, ORPHA, DECIPHER)."""
    feats: dict[str, dict[str, float]] = {}
    names: dict[str, str] = {}
    excluded: dict[str, list[str]] = {}
    onsets: dict[str, list[str]] = {}  # disease-level (aspect C) onset annotations
    feature_onsets: dict[str, dict[str, int]] = {}  # onset column of feature rows, counted
    inh: dict[str, list[str]] = {}
    sexes: dict[str, set[str]] = {}
    with gzip.open(ANNOTATIONS_PATH, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#"):
                continue
            p = line.rstrip("\n").split("\t")
            if len(p) < 11:
                continue
            db, name, qual, hpo, _ref, _ev, onset, freq, sex, _mod, aspect = p[:11]
            names.setdefault(db, name)
            if aspect == "P":
                if qual == "NOT":
                    lst = excluded.setdefault(db, [])
                    if hpo not in lst:
                        lst.append(hpo)
                    continue
                f = parse_frequency(freq)
                d = feats.setdefault(db, {})
                d[hpo] = max(d.get(hpo, 0.0), f)
                if onset in ONSET_TERMS:
                    fo = feature_onsets.setdefault(db, {})
                    fo[ONSET_TERMS[onset]] = fo.get(ONSET_TERMS[onset], 0) + 1
                if sex:
                    sexes.setdefault(db, set()).add(sex.lower())
            elif aspect == "C" and qual != "NOT" and hpo in ONSET_TERMS:
                lst = onsets.setdefault(db, [])
                if ONSET_TERMS[hpo] not in lst:
                    lst.append(ONSET_TERMS[hpo])
            elif aspect == "I" and qual != "NOT" and hpo in INHERITANCE_TERMS:
                lst = inh.setdefault(db, [])
                if INHERITANCE_TERMS[hpo] not in lst:
                    lst.append(INHERITANCE_TERMS[hpo])
    out: dict[str, Disease] = {}
    for db, name in names.items():
        fs = feats.get(db, {})
        pos = tuple((h, f) for h, f in fs.items() if f > 0.0)
        excl = tuple(h for h in excluded.get(db, []) if h not in fs)
        sx = sexes.get(db, set())
        out[db] = Disease(
            database_id=db,
            name=name,
            features=pos,
            excluded=excl,
            onsets=tuple(onsets.get(db, []))
            or tuple(sorted(feature_onsets.get(db, {}), key=lambda o: -feature_onsets[db][o])),
            inheritance=tuple(inh.get(db, [])),
            sex=next(iter(sx)) if len(sx) == 1 else None,
        )
    return out
