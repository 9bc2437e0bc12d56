#!/usr/bin/env python
"""Write the demo fixtures (deterministic; re-running gives byte-identical files).

- ``workers/fixtures/orders/imaging-orders.ndjson``: 64 active imaging ServiceRequests. Each
  note describes a patient whose findings match one rare disease of the diagnosis panel (drawn
  from the first 500 panel diseases, so any default panel covers them), written in the held-out
  TEST style of ``training.datasets.diagnosis``, and the reason states a clear imaging
  indication for the protocol model.
- ``workers/fixtures/orders/non-imaging-orders.ndjson``: 8 active laboratory / genetic-test
  orders with notes (category Laboratory): these must get no protocol Task.
- ``workers/fixtures/patients.ndjson``: the synthetic Patient resources referenced.
- ``workers/fixtures/expected-labels.json``: order id -> expected protocol and disease.

Usage: ``python scripts/make_demo_fixtures.py [--out-dir workers/fixtures]``
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from schemas.catalog import PROTOCOL_SYSTEM, protocol_by_display  # noqa: E402
from schemas.text import is_imaging_order  # noqa: E402
from training.datasets import diagnosis as dx  # noqa: E402
from training.datasets import protocol_kb as kb  # noqa: E402
from training.datasets.common import CATEGORY_IMAGING, CATEGORY_LABORATORY  # noqa: E402
from training.datasets.noise import cap, join_list, surface  # noqa: E402
from training.datasets.protocol import KB_EVERY, QUESTION_FORMS, split_pool  # noqa: E402

SEED = "ehrw-demo-fixtures-v1"
REFERENCE_DATE = date(2025, 3, 3)
PANEL_LIMIT = 500  # demo diseases come from the first 500 panel diseases
N_IMAGING = 64
LOINC = "http://loinc.org"

def _train_q(*scenario_ids: str) -> tuple[str, ...]:
    """Clinical questions of knowledge-table scenarios, train-pool phrasings only: the protocol side of
    the demo reads like the protocol model's training data (the disease side is held-out test style)."""
    out: list[str] = []
    for sc in kb.SCENARIOS:
        if sc.id in scenario_ids:
            out += [q for q in split_pool(sc.q, "train", KB_EVERY) if q not in out]
    if not out:
        raise SystemExit(f"no train-pool questions for scenarios {scenario_ids}")
    return tuple(out)


def _train_orders(display: str, k: int = 3) -> tuple[str, ...]:
    return split_pool(kb.ORDER_NAMES[display], "train")[:k]


# protocol -> (organ system of ``diagnosis.ORDER_BY_SYSTEM``, order names, clinical questions, how many)
PLAN: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], int]] = {
    kb.MRB: ("neuro", _train_orders(kb.MRB), _train_q("peds_neuro"), 22),
    kb.ECHO: ("cardiac", _train_orders(kb.ECHO), _train_q("syndromic_heart", "murmur"), 13),
    kb.US_RENAL: ("renal", _train_orders(kb.US_RENAL), _train_q("renal_cysts"), 9),
    kb.US_ABD: ("abdominal", _train_orders(kb.US_ABD), _train_q("organomegaly"), 8),
    kb.CT_CH_WO: ("lung", _train_orders(kb.CT_CH_WO), _train_q("bronchiectasis", "emphysema_young"), 2),
    kb.US_THY: ("thyroid", _train_orders(kb.US_THY), _train_q("thyroid_nodule"), 1),
    kb.MRB_WWO: ("neuro", _train_orders(kb.MRB_WWO), _train_q("vascular_malformation_screen", "brain_tumor_fu"), 3),
    kb.CTA_HN: ("cardiac", _train_orders(kb.CTA_HN), _train_q("ctd_vascular"), 2),
}

AUTO_PROTOCOLS = (kb.MRB, kb.ECHO, kb.US_RENAL, kb.US_ABD)  # the rest: curated diseases only

# Well-known diseases with a clear imaging question; the rest is filled automatically.
CURATED: tuple[tuple[str, str], ...] = (
    ("OMIM:194050", kb.ECHO),  # Williams-Beuren syndrome
    ("OMIM:214800", kb.ECHO),  # CHARGE syndrome
    ("OMIM:188400", kb.ECHO),  # DiGeorge syndrome
    ("OMIM:154700", kb.ECHO),  # Marfan syndrome
    ("OMIM:190685", kb.ECHO),  # Down syndrome
    ("OMIM:306955", kb.ECHO),  # Heterotaxy, visceral, X-linked
    ("OMIM:270400", kb.MRB),  # Smith-Lemli-Opitz syndrome
    ("OMIM:117550", kb.MRB),  # Sotos syndrome
    ("OMIM:235730", kb.MRB),  # Mowat-Wilson syndrome
    ("OMIM:182290", kb.MRB),  # Smith-Magenis syndrome
    ("OMIM:304050", kb.MRB),  # Aicardi syndrome
    ("OMIM:208900", kb.MRB),  # Ataxia-telangiectasia
    ("OMIM:312080", kb.MRB),  # Pelizaeus-Merzbacher disease
    ("OMIM:176270", kb.MRB),  # Prader-Willi syndrome
    ("OMIM:175780", kb.MRB),  # Brain small vessel disease 1 (COL4A1)
    ("OMIM:219800", kb.US_RENAL),  # Cystinosis, nephropathic
    ("OMIM:309000", kb.US_RENAL),  # Lowe syndrome
    ("OMIM:120330", kb.US_RENAL),  # Papillorenal syndrome
    ("OMIM:161200", kb.US_RENAL),  # Nail-patella syndrome
    ("OMIM:614527", kb.US_RENAL),  # Chromosome 17q12 deletion syndrome
    ("OMIM:277900", kb.US_ABD),  # Wilson disease
    ("OMIM:118450", kb.US_ABD),  # Alagille syndrome 1
    ("OMIM:608013", kb.US_ABD),  # Gaucher disease, perinatal lethal
    ("OMIM:614700", kb.CT_CH_WO),  # Common variable immunodeficiency 8
    ("OMIM:613177", kb.CT_CH_WO),  # Cutis laxa, autosomal recessive, type IC
    ("OMIM:158350", kb.US_THY),  # Cowden syndrome 1
    ("OMIM:187300", kb.MRB_WWO),  # Hereditary hemorrhagic telangiectasia type 1
    ("OMIM:109400", kb.MRB_WWO),  # Basal cell nevus syndrome
    ("OMIM:130050", kb.CTA_HN),  # Ehlers-Danlos syndrome, vascular type
)

QUESTION_OVERRIDE = {
    "OMIM:614700": _train_q("bronchiectasis"),
    "OMIM:613177": _train_q("emphysema_young"),
    "OMIM:187300": _train_q("vascular_malformation_screen"),
    "OMIM:109400": _train_q("brain_tumor_fu"),
}

# the imaging context of the curated surveillance orders, in the knowledge table's (train-pool) words
REASON_LEAD = {
    "OMIM:187300": "HHT, screening for cerebral AVMs",
    "OMIM:109400": "tumor predisposition syndrome, surveillance",
    "OMIM:130050": "suspected vascular Ehlers-Danlos",
}

FIRST_NAMES = {
    "M": ("Liam", "Noah", "Mateo", "Arjun", "Kofi", "Hiroshi", "Elias", "Omar", "Lucas", "Ivan", "Tomas", "Kai",
          "Samuel", "Diego", "Felix", "Jonah", "Rafael", "Aarav", "Theo", "Malik", "Anton", "Oscar", "Nikolai", "Yusuf"),
    "F": ("Ava", "Maya", "Sofia", "Amara", "Yuki", "Leila", "Chloe", "Ingrid", "Priya", "Zara", "Elena", "Nia",
          "Hannah", "Lucia", "Mei", "Freya", "Aisha", "Clara", "Noor", "Isla", "Rosa", "Talia", "Vera", "Anika"),
}
FAMILY_NAMES = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Haddad", "Kowalski", "Fernandes", "Novak", "Oduya",
                "Brennan", "Castellano", "Dubois", "Eriksen", "Farouk", "Garcia", "Hollis", "Ibrahim", "Jansen",
                "Kimura", "Larsen", "Mensah", "Nakamura", "Ortega", "Petrov", "Quinn", "Rossi", "Sato", "Tembo",
                "Underwood", "Valdez", "Weber", "Xu", "Yilmaz", "Zielinski")
CLINICIANS = ("Dr. R. Alvarez", "Dr. S. Chen", "Dr. M. Okoye", "Dr. P. Lindgren", "Dr. A. Haddad", "Dr. J. Novak")

_PAREN = re.compile(r"\s*\([^)]*\)")
_TRAILING_NUMBER = re.compile(
    r"^(.*?)[ ,]+(?:(?:type|group|complementation group)\s+)?([A-Z]?[0-9]+[A-Z]?|[IVX]+[A-Z]?)$", re.IGNORECASE)


def _family_stem(name: str) -> str:
    """'Fanconi anemia, complementation group D2' -> 'fanconi anemia'; numbered family members share a stem."""
    s = _PAREN.sub("", name).strip()
    s = re.split(r",? with(?:out)? | and/or ", s)[0]
    m = _TRAILING_NUMBER.match(s)
    while m:
        s = m.group(1)
        m = _TRAILING_NUMBER.match(s)
    return re.sub(r"[, ]+(?:complementation group|group|type)$", "", s.strip(), flags=re.IGNORECASE).lower()


def _jaccard_max(panel) -> dict[str, float]:
    sets = {d.database_id: frozenset(h for h, _ in d.features) for d in panel}
    index: dict[str, list[str]] = {}
    for k, s in sets.items():
        for h in s:
            index.setdefault(h, []).append(k)
    out = {}
    for k, s in sets.items():
        best = 0.0
        counts: dict[str, int] = {}
        for h in s:
            for j in index[h]:
                if j != k:
                    counts[j] = counts.get(j, 0) + 1
        for j, inter in counts.items():
            best = max(best, inter / (len(s) + len(sets[j]) - inter))
        out[k] = best
    return out


def _system_count(database_id: str, system: str) -> int:
    return sum(1 for _, _, low in dx._prepared(database_id).features if dx.in_system(low, system))


def _auto_ok(d, proto: str, used: set[str], jmax: dict, stems: dict) -> bool:
    system = PLAN[proto][0]
    if d.database_id in used or jmax[d.database_id] >= 0.25 or stems[_family_stem(d.name)] > 1:
        return False
    if "susceptibility" in d.name.lower() or dx.dominant_system(d.database_id) != system:
        return False
    if _system_count(d.database_id, system) < 3:
        return False
    if proto == kb.MRB and not set(d.onsets) & {"congenital", "neonatal", "infantile", "childhood", "fetal", "antenatal"}:
        return False
    return True


def choose_diseases() -> list[tuple[str, str]]:
    """(disease id, protocol display) pairs: the curated ones, then automatic picks per protocol."""
    panel = dx.panel_diseases(PANEL_LIMIT)
    in_panel = {d.database_id for d in panel}
    wide = dx.panel_diseases(600)
    jmax = _jaccard_max(wide)
    stems: dict[str, int] = {}
    for d in wide:
        stems[_family_stem(d.name)] = stems.get(_family_stem(d.name), 0) + 1
    chosen: list[tuple[str, str]] = []
    for db, proto in CURATED:
        if db not in in_panel:
            raise SystemExit(f"curated demo disease {db} is not among the first {PANEL_LIMIT} panel diseases")
        chosen.append((db, proto))
    used = {db for db, _ in chosen}
    for proto, (system, _, _, want) in PLAN.items():
        have = sum(1 for _, p in chosen if p == proto)
        if proto not in AUTO_PROTOCOLS:
            continue  # only curated diseases for these
        for d in panel:
            if have >= want:
                break
            if not _auto_ok(d, proto, used, jmax, stems):
                continue
            chosen.append((d.database_id, proto))
            used.add(d.database_id)
            have += 1
    # top up (round robin over the protocols with the largest pools) to N_IMAGING
    for proto in [kb.MRB, kb.ECHO, kb.US_RENAL] * N_IMAGING:
        if len(chosen) >= N_IMAGING:
            break
        for d in panel:
            if not _auto_ok(d, proto, used, jmax, stems):
                continue
            chosen.append((d.database_id, proto))
            used.add(d.database_id)
            break
    return chosen[:N_IMAGING]


@lru_cache(maxsize=1)
def _annotation_index() -> dict[str, list[tuple[str, float]]]:
    """HPO id -> [(disease id, annotated frequency)] over the 600 first panel diseases."""
    index: dict[str, list[tuple[str, float]]] = {}
    for d in dx.panel_diseases(600):
        for h, f in d.features:
            index.setdefault(h, []).append((d.database_id, f))
    return index


def _matches_best(case: dx.Case) -> bool:
    """Whether a simple phenotype-matching score (shared features weighted by specificity and
    frequency, normalised by annotation count) ranks the case's own disease first: a case that
    looks like another disease would make a misleading demo."""
    idf = dx._feature_idf()
    n_feat = {d.database_id: d.n_features for d in dx.panel_diseases(600)}
    scores: dict[str, float] = {}
    for h in case.feature_ids:
        for db, f in _annotation_index().get(h, ()):
            scores[db] = scores.get(db, 0.0) + idf.get(h, 0.0) * (0.5 + f)
    ranked = sorted(scores, key=lambda db: -scores[db] / n_feat[db] ** 0.3)
    return bool(ranked) and ranked[0] == case.disease_id


def _sample(db: str, rng: random.Random) -> dx.Case:
    return dx.sample_case(db, rng, "test", k_range=(7, 10), frequent_bias=2.0, specific_bias=2.0, negation_p=0.6,
                          noise_max=1)


def _case_for(db: str, proto: str | None, rng: random.Random) -> dx.Case:
    """A test-style case of the disease that shows the protocol's organ system, has a plausible age,
    and matches its own disease best; the closest try when none does in 60."""
    system = PLAN[proto][0] if proto else None
    terms = dx.hpo.load_terms()
    adult_onset = set(dx.hpo.load_diseases()[db].onsets) & {"adult", "young_adult", "middle_age", "late"}
    best, best_level = None, -1
    for _ in range(60):
        case = _sample(db, rng)
        hits = system is None or any(dx.in_system(terms[h].label.lower(), system) for h in case.feature_ids)
        # paediatric scenarios for MRI brain; diseases without an adult onset are shown in children
        age_ok = case.age < 18 if (proto == kb.MRB or not adult_onset) else True
        level = (2 if hits and age_ok else int(hits)) + (3 if _matches_best(case) else 0)
        if level == 5:
            return case
        if level > best_level:
            best, best_level = case, level
    return best


def _indication(case: dx.Case, proto: str, rng: random.Random) -> str:
    system, _, questions, _ = PLAN[proto]
    terms = dx.hpo.load_terms()
    hits = [n for n, h in zip(case.features, case.feature_ids) if dx.in_system(terms[h].label.lower(), system)]
    questions = QUESTION_OVERRIDE.get(case.disease_id, questions)
    lead = REASON_LEAD.get(case.disease_id) or (join_list(hits[:2], rng) if hits else "syndromic features")
    q_word = rng.choice([x for x in questions if x.lower() not in lead.lower()] or list(questions))
    q = rng.choice(split_pool(QUESTION_FORMS["train"], "train")).replace("{q}", q_word)
    return cap(f"{lead}; {q}")


def _birth_date(rng: random.Random, age: int, months: int | None, days: int | None) -> str:
    if days is not None:
        born = REFERENCE_DATE - timedelta(days=days)
    elif months is not None:
        born = REFERENCE_DATE - timedelta(days=int(months * 30.44) + rng.randint(0, 20))
    else:
        born = REFERENCE_DATE - timedelta(days=int(age * 365.25) + rng.randint(1, 360))
    return born.isoformat()


def _patient(n: int, sex: str, birth: str, rng: random.Random) -> dict:
    return {
        "resourceType": "Patient",
        "id": f"demo-{n}",
        "identifier": [{"system": "https://ehr-worker.dev/demo/mrn", "value": f"DEMO{n:06d}"}],
        "active": True,
        "name": [{"use": "official", "family": rng.choice(FAMILY_NAMES), "given": [rng.choice(FIRST_NAMES[sex])]}],
        "gender": "male" if sex == "M" else "female",
        "birthDate": birth,
    }


def _order(order_id: str, n: int, *, imaging: bool, code: dict, reason: str, note: str, minute: int,
           rng: random.Random) -> dict:
    authored = datetime(2025, 3, 3, 8, 0, tzinfo=timezone.utc) + timedelta(minutes=minute)
    sr = {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "active",
        "intent": "order",
        "category": [CATEGORY_IMAGING if imaging else CATEGORY_LABORATORY],
        "priority": "routine",
        "code": code,
        "subject": {"reference": f"Patient/demo-{n}"},
        "authoredOn": authored.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "requester": {"display": rng.choice(CLINICIANS)},
        "reasonCode": [{"text": reason}],
        "note": [{"text": note}],
    }
    return sr


def _render_note(case: dx.Case, rng: random.Random) -> str:
    reasons, notes, _ = dx.render_case(case, rng, "test")
    text = " ".join(notes) if notes else ""
    # a clean demo: abbreviations but no typos
    return surface(text, rng, abbrev_p=0.1, typo_rate=0.0, caps_p=0.0, lower_p=0.0, strip_punct_p=0.0)


NON_IMAGING = (
    # (code, reason, genetic note? , free note, age, sex) - genetic notes describe an automatically chosen panel disease
    ({"text": "Exome sequencing"}, "Suspected inherited disorder", True, None, None, None),
    ({"text": "Chromosomal microarray"}, "Developmental delay with dysmorphic features", True, None, None, None),
    ({"text": "Plasma amino acids and urine organic acids"}, "Suspected inborn error of metabolism", True, None, None, None),
    ({"text": "Gene panel - connective tissue disorders"}, "Possible hereditary connective tissue disease", True, None,
     None, None),
    ({"coding": [{"system": LOINC, "code": "58410-2", "display": "CBC panel - Blood by Automated count"}],
      "text": "CBC with differential"}, "Fatigue and pallor", False,
     "34 yo F with 3 months of fatigue and heavy menses. Pale conjunctivae. Check for iron deficiency anemia.", 34, "F"),
    ({"coding": [{"system": LOINC, "code": "24323-8", "display": "Comprehensive metabolic 2000 panel - Serum or Plasma"}],
      "text": "Comprehensive metabolic panel"}, "Annual physical, on lisinopril", False,
     "58 yo M with HTN on lisinopril 20 mg, routine monitoring of electrolytes and renal function.", 58, "M"),
    ({"coding": [{"system": LOINC, "code": "57698-3", "display": "Lipid panel with direct LDL - Serum or Plasma"}],
      "text": "Lipid panel"}, "Hyperlipidemia follow-up", False,
     "62 yo F on atorvastatin 40 mg, 3 month follow-up after dose change. Fasting.", 62, "F"),
    ({"coding": [{"system": LOINC, "code": "3016-3", "display": "Thyrotropin [Units/volume] in Serum or Plasma"}],
      "text": "TSH"}, "Fatigue and weight gain", False,
     "45 yo F with fatigue, cold intolerance and 5 kg weight gain over 6 months. No prior thyroid disease.", 45, "F"),
)


def _genetic_diseases(used: set[str], k: int) -> list[str]:
    """k further distinct panel diseases (not used by the imaging orders)."""
    panel = dx.panel_diseases(PANEL_LIMIT)
    jmax = _jaccard_max(dx.panel_diseases(600))
    stems: dict[str, int] = {}
    for d in dx.panel_diseases(600):
        stems[_family_stem(d.name)] = stems.get(_family_stem(d.name), 0) + 1
    out = []
    for d in panel:
        if len(out) >= k:
            break
        if d.database_id in used or jmax[d.database_id] >= 0.25 or stems[_family_stem(d.name)] > 1:
            continue
        if "susceptibility" in d.name.lower():
            continue
        out.append(d.database_id)
    return out


def build(out_dir: Path) -> dict[str, int]:
    rng = random.Random(SEED)
    pairs = choose_diseases()
    if len(pairs) < 60:
        raise SystemExit(f"only {len(pairs)} demo diseases found")
    names = {d.database_id: d.name for d in dx.panel_diseases()}
    imaging, non_imaging, patients, labels = [], [], [], {}
    n = 0
    for i, (db, proto_display) in enumerate(pairs, start=1):
        n += 1
        case = _case_for(db, proto_display, rng)
        proto = protocol_by_display(proto_display)
        order_id = f"demo-img-{i:03d}"
        code = {"text": rng.choice(PLAN[proto_display][1])}
        sr = _order(order_id, n, imaging=True, code=code, reason=_indication(case, proto_display, rng),
                    note=_render_note(case, rng), minute=7 * i, rng=rng)
        assert is_imaging_order(sr), order_id
        imaging.append(sr)
        patients.append(_patient(n, case.sex, _birth_date(rng, case.age, case.months, case.days), rng))
        labels[order_id] = {"protocol": proto.code, "protocol_display": proto.display, "protocol_system": PROTOCOL_SYSTEM,
                            "disease": db, "disease_name": names[db]}
    genetic = iter(_genetic_diseases({db for db, _ in pairs}, sum(1 for x in NON_IMAGING if x[2])))
    for j, (code, reason, is_genetic, free_note, age, sex) in enumerate(NON_IMAGING, start=1):
        n += 1
        order_id = f"demo-lab-{j:02d}"
        db = next(genetic) if is_genetic else None
        if db is not None:
            case = _case_for(db, None, rng)
            note, sex, birth = _render_note(case, rng), case.sex, _birth_date(rng, case.age, case.months, case.days)
        else:
            note, birth = free_note, _birth_date(rng, age, None, None)
        sr = _order(order_id, n, imaging=False, code=code, reason=reason, note=note, minute=7 * (len(pairs) + j), rng=rng)
        assert not is_imaging_order(sr), order_id
        non_imaging.append(sr)
        patients.append(_patient(n, sex, birth, rng))
        labels[order_id] = {"protocol": None, "disease": db, "disease_name": names.get(db) if db else None}

    orders_dir = out_dir / "orders"
    orders_dir.mkdir(parents=True, exist_ok=True)

    def write_ndjson(path: Path, rows: list[dict]) -> None:
        path.write_text("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows), encoding="utf-8")

    write_ndjson(orders_dir / "imaging-orders.ndjson", imaging)
    write_ndjson(orders_dir / "non-imaging-orders.ndjson", non_imaging)
    write_ndjson(out_dir / "patients.ndjson", patients)
    (orders_dir.parent / "expected-labels.json").write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"imaging": len(imaging), "non_imaging": len(non_imaging), "patients": len(patients)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "workers" / "fixtures")
    args = ap.parse_args(argv)
    counts = build(args.out_dir)
    print(f"wrote {counts['imaging']} imaging orders, {counts['non_imaging']} non-imaging orders, "
          f"{counts['patients']} patients under {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
