"""Generated clinical notes labelled with a rare disease, from the HPO disease annotations.

Panel (``disease_panel``): OMIM diseases of ``phenotype.hpoa.gz`` (release 2023-01-27) with at
least ``MIN_FEATURES`` distinct positive phenotypic-abnormality (aspect ``P``) annotations,
ordered by that count (descending) then by OMIM number; a disease whose feature set is
phenotypically indistinguishable from one already in the panel (Jaccard >= ``DEDUP_JACCARD`` of
the annotated HPO ids, e.g. "Autism susceptibility 1" vs "... 8") is dropped, because no note
could tell the two apart. ``max_diseases`` keeps the first N.

A note (``generate``) samples each annotated feature with its annotated frequency (obligate 1.0,
very frequent 0.9, frequent 0.55, occasional 0.17, very rare 0.02, ``n/m``, ``x%``, missing 0.5),
keeps 4-15 of them (frequent and disease-specific features preferred), renders each with its HPO label or a synonym in
lay form, adds age/sex consistent with the annotated onset and sex-specific features, excluded
(``NOT``) features and a few common pertinent negatives as negations, family history matching
the inheritance, and 0-3 unrelated benign findings, in one of several note styles, inside an
imaging order (code chosen loosely from the organ systems involved) or a genetic-test order.

Splits: ``train``/``val`` share templates and name choice (HPO label plus half of the synonyms);
``test`` uses other templates and the other half of the synonyms (falling back to the label
when a term has fewer than two synonyms), so it measures generalisation to unseen phrasings.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

from schemas.catalog import disease_coding
from schemas.labels import Label

from . import hpo
from .common import Dataset, LabelledOrder, Split, make_rng, service_request
from .noise import cap, join_list, surface

TASK = "diagnosis"
MIN_FEATURES = 8
DEDUP_JACCARD = 0.9
SOURCES = ("OMIM",)

# ------------------------------------------------------------------------------------------ panel


def _dedup(diseases: list[hpo.Disease], threshold: float) -> list[hpo.Disease]:
    """Greedy near-duplicate removal (keep the earlier disease) with prefix filtering."""
    df: dict[str, int] = {}
    sets = []
    for d in diseases:
        s = frozenset(h for h, _ in d.features)
        sets.append(s)
        for h in s:
            df[h] = df.get(h, 0) + 1
    index: dict[str, list[int]] = {}
    kept: list[int] = []
    for i, s in enumerate(sets):
        toks = sorted(s, key=lambda h: (df[h], h))
        plen = len(toks) - int(threshold * len(toks) + 1e-9) + 1
        cands: set[int] = set()
        for h in toks[:plen]:
            cands.update(index.get(h, ()))
        dup = False
        for j in cands:
            t = sets[j]
            inter = len(s & t)
            if inter / (len(s) + len(t) - inter) >= threshold:
                dup = True
                break
        if dup:
            continue
        kept.append(i)
        toks_j = toks
        for h in toks_j[: len(toks_j) - int(threshold * len(toks_j) + 1e-9) + 1]:
            index.setdefault(h, []).append(i)
    return [diseases[i] for i in kept]


@lru_cache(maxsize=1)
def _panel() -> tuple[hpo.Disease, ...]:
    diseases = [
        d for d in hpo.load_diseases().values()
        if d.database_id.split(":", 1)[0] in SOURCES and d.n_features >= MIN_FEATURES
    ]
    diseases.sort(key=lambda d: (-d.n_features, d.database_id.split(":", 1)[0], int(d.database_id.split(":", 1)[1])))
    return tuple(_dedup(diseases, DEDUP_JACCARD))


def panel_diseases(max_diseases: int | None = None) -> list[hpo.Disease]:
    panel = _panel()
    if max_diseases is not None:
        if max_diseases < 1:
            raise ValueError("max_diseases must be >= 1")
        panel = panel[:max_diseases]
    return list(panel)


def _label(d: hpo.Disease) -> Label:
    system, code = disease_coding(d.database_id)
    return Label(system, code, d.name)


def disease_panel(max_diseases: int | None = None) -> list[Label]:
    """The diagnosis label space, deterministic order (index = class id)."""
    return [_label(d) for d in panel_diseases(max_diseases)]


# ------------------------------------------------------------------------------------------ term names


def lay(name: str) -> str:
    """HPO label -> note phrasing: lower case (acronyms kept), "Abnormality of (the) X" -> "abnormal X"."""
    s = name.strip()
    m = re.match(r"(?i)^abnormality of (?:the )?(.+)$", s)
    if m:
        s = f"abnormal {m.group(1)}"
    words = [w if sum(c.isupper() for c in w) >= 2 else w.lower() for w in s.split()]
    return " ".join(words)


@lru_cache(maxsize=None)
def term_names(hpo_id: str, pool: str) -> tuple[str, ...]:
    """Names a note may use for a term: train = label + even synonyms, test = odd synonyms (or label)."""
    t = hpo.load_terms().get(hpo_id)
    if t is None:
        return ()
    syns = list(t.exact_synonyms) + list(t.other_synonyms)
    if pool == "test":
        names = syns[1::2] or [t.label]
    else:
        names = [t.label] + syns[0::2]
    out = []
    for n in names:
        ln = lay(n)
        if ln and ln not in out:
            out.append(ln)
    return tuple(out)


def term_name(hpo_id: str, rng: random.Random, pool: str) -> str:
    names = term_names(hpo_id, pool)
    if not names:
        return ""
    if pool == "train" and len(names) > 1 and rng.random() < 0.5:
        return names[0]  # the HPO label half of the time
    return rng.choice(names)


# ------------------------------------------------------------------------------------------ vocab

ONSET_AGES = {  # coarse onset -> (min, max) age in years at presentation
    "fetal": (0, 0), "antenatal": (0, 1), "congenital": (0, 10), "neonatal": (0, 4), "infantile": (0, 8),
    "childhood": (2, 14), "juvenile": (6, 17), "young_adult": (16, 35), "adult": (20, 65),
    "middle_age": (40, 65), "late": (55, 85), None: (0, 45),
}
ONSET_PHRASES = {
    "train": {
        "fetal": ("detected on prenatal ultrasound", "noted prenatally"),
        "antenatal": ("detected prenatally", "first noted on prenatal imaging"),
        "congenital": ("since birth", "noted at birth", "present from birth"),
        "neonatal": ("since the neonatal period", "from the first weeks of life"),
        "infantile": ("since infancy", "from the first year of life", "since early infancy"),
        "childhood": ("since early childhood", "starting in childhood"),
        "juvenile": ("since adolescence", "starting in the teenage years"),
        "young_adult": ("since early adulthood", "starting in {poss} twenties"),
        "adult": ("with adult onset", "starting in adulthood"),
        "middle_age": ("starting in middle age", "since {poss} forties"),
        "late": ("with late onset", "starting later in life"),
    },
    "test": {
        "fetal": ("first seen on a fetal scan",),
        "antenatal": ("with in-utero onset",),
        "congenital": ("evident at delivery", "congenital in onset"),
        "neonatal": ("beginning as a newborn",),
        "infantile": ("beginning in the first months of life", "with onset in infancy"),
        "childhood": ("beginning in the preschool years", "with onset during childhood"),
        "juvenile": ("beginning around puberty",),
        "young_adult": ("beginning in young adulthood",),
        "adult": ("that began in adult life",),
        "middle_age": ("beginning in midlife",),
        "late": ("beginning in older age",),
    },
}
AGE_SEX = {
    "train": {
        "years": ("{a}-year-old {boy}", "{a} yo {boy}", "{a} y/o {male}", "{a}yo {MF}", "{a}-year-old {male}"),
        "months": ("{m}-month-old {boy}", "{m} mo old {boy}", "{m} month old {male} infant"),
        "newborn": ("newborn {boy}", "{d}-day-old {boy}"),
    },
    "test": {
        "years": ("{boy} aged {a} years", "{a} yr old {male} patient", "{a}y {MF}", "{male} patient, age {a}"),
        "months": ("infant {boy} of {m} months", "{m}mo {male}"),
        "newborn": ("neonate ({male}, day {d} of life)",),
    },
}
FAMILY = {
    "train": {
        "AR": ("parents are consanguineous", "an older sibling is similarly affected", "healthy non-consanguineous parents",
               "parents are first cousins", "a sister with the same findings"),
        "AD": ("mother has similar features", "father similarly affected", "several relatives with similar findings",
               "affected paternal aunt", "maternal grandmother with similar findings"),
        "XLR": ("maternal uncle similarly affected", "brother with the same condition", "maternal cousin affected"),
        "XLD": ("mother mildly affected", "several affected females on the maternal side"),
        "XL": ("maternal uncle affected", "affected maternal relatives"),
        "MT": ("maternal relatives with similar symptoms", "mother and maternal aunt affected"),
        "none": ("no family history of similar disease", "family history noncontributory", "unremarkable family history"),
    },
    "test": {
        "AR": ("the parents are related", "one sibling has the same problems"),
        "AD": ("a parent shows the same features", "dominant-looking pedigree with affected relatives in three generations"),
        "XLR": ("an uncle on the mother's side has the same condition",),
        "XLD": ("affected mother",),
        "XL": ("male relatives on the maternal side affected",),
        "MT": ("symptoms in the maternal line",),
        "none": ("nobody else in the family is affected", "family history is negative"),
    },
}
NEGATION_FORMS = {
    "train": ("no {f}", "denies {f}", "without {f}", "{f} absent", "negative for {f}", "no evidence of {f}"),
    "test": ("{f} not present", "no sign of {f}", "free of {f}", "{f}: none", "never had {f}", "{f} ruled out"),
}
# (HPO id or None, phrase, keywords that must not occur in the disease's own feature labels)
COMMON_NEGATIVES = (
    ("HP:0001250", "seizures", ("seiz", "epilep", "spasm")),
    ("HP:0001263", "developmental delay", ("develop", "intellectual", "delay")),
    ("HP:0000365", "hearing loss", ("hearing", "deaf")),
    ("HP:0001627", "heart defects", ("heart", "cardi", "ventric", "atri", "valv", "aort")),
    ("HP:0000505", "visual impairment", ("vision", "visual", "blind", "retin", "optic", "cataract")),
    ("HP:0004322", "short stature", ("stature", "growth", "dwarf")),
    ("HP:0002650", "scoliosis", ("scolio", "kyph", "spine", "vertebra")),
    ("HP:0000077", "kidney problems", ("kidney", "renal", "nephr")),
    ("HP:0001249", "intellectual disability", ("intellectual", "cognit", "develop", "mental")),
    ("HP:0002240", "hepatomegaly", ("hepat", "liver")),
)
NOISE_FINDINGS = (
    ("HP:0000545", "mild myopia", ("myop",)),
    ("HP:0001763", "flat feet", ("pes planus", "flat feet")),
    ("HP:0001061", "acne", ("acne",)),
    ("HP:0003193", "seasonal allergic rhinitis", ("rhinitis",)),
    ("HP:0000964", "mild eczema", ("eczema", "dermatitis")),
    ("HP:0002315", "occasional tension headaches", ("headache", "migraine")),
    ("HP:0002019", "intermittent constipation", ("constipation",)),
    ("HP:0002099", "mild intermittent asthma", ("asthma",)),
    ("HP:0003764", "a few benign nevi", ("nevi", "nevus")),
    ("HP:0000403", "recurrent ear infections as a toddler", ("otitis",)),
    (None, "immunizations up to date", ()),
    (None, "allergic to penicillin", ()),
    (None, "fractured wrist after a fall at age 9", ("fracture", "bone fragility")),
    (None, "tonsillectomy at age 6", ()),
    (None, "dental caries", ("caries", "dental", "teeth", "tooth")),
    (None, "mild iron deficiency", ("anemia",)),
    (None, "lives with parents and two siblings", ()),
    (None, "seasonal influenza last winter", ()),
)
ORDER_BY_SYSTEM = {
    "neuro": (("seiz", "epilep", "ataxia", "intellectual", "developmental", "hypotonia", "brain", "cerebr", "cerebell",
               "spastic", "microceph", "macroceph", "dystonia", "leukodystroph", "hydroceph", "corpus callosum", "white matter"),
              ("MRI brain", "MR brain wo", "MRI head", "MRI brain without contrast")),
    "cardiac": (("cardi", "heart", "septal defect", "aortic", "valv", "tetralogy", "truncus", "coarctation",
                 "pulmonic stenosis", "pulmonary artery stenosis", "patent ductus", "atrial", "ventricular hypertrophy"),
                ("Echocardiogram", "TTE", "Echo", "Echocardiogram transthoracic")),
    "renal": (("renal", "kidney", "nephr", "hydroneph"), ("US renal", "Renal ultrasound", "US kidneys")),
    "abdominal": (("hepat", "liver", "splen", "spleen", "cholest", "jaundice", "pancrea"),
                  ("US abdomen", "Abdominal ultrasound", "US abdomen complete")),
    "skeletal": (("skelet", "bone", "vertebra", "scolio", "dysplasia", "metaphy", "epiphy", "osteo", "fracture", "rib",
                  "femur", "limb"), ("Skeletal survey", "XR skeletal survey", "XR spine", "XR bone age")),
    "eye": (("retin", "optic", "cataract", "ocular", "eye", "vision", "visual", "nystagmus", "coloboma"),
            ("MRI orbits", "MRI brain and orbits")),
    "lung": (("lung", "bronchiect", "respiratory infection", "pneumon", "interstitial", "emphysema", "pulmonary fibrosis"),
             ("CT chest", "XR chest", "CT chest without contrast")),
    "thyroid": ((" thyroid", "hypothyroid", "hyperthyroid", "goiter"), ("US thyroid", "Thyroid ultrasound")),
}
def in_system(label_lower: str, system: str) -> bool:
    """Whether an HPO label (lower case) belongs to an organ system of ``ORDER_BY_SYSTEM`` (by keyword)."""
    padded = " " + label_lower
    return any(kw in padded for kw in ORDER_BY_SYSTEM[system][0])


def dominant_system(database_id: str) -> str | None:
    """The organ system with most of the disease's annotated features (None when no keyword hits)."""
    prep = _prepared(database_id)
    scores = {s: 0 for s in ORDER_BY_SYSTEM}
    for systems in prep.systems_of_feature.values():
        for s in systems:
            scores[s] += 1
    best = max(scores, key=lambda s: (scores[s], s))
    return best if scores[best] else None


GENETIC_ORDERS = ("Genetic testing", "Exome sequencing", "Chromosomal microarray", "Genetics consult", "Gene panel",
                  "Whole genome sequencing", "Trio exome", "Molecular genetic testing")
MALE_WORDS = ("cryptorchid", "micropenis", "hypospadias", "testic", "testis", "testes", "scrot", "penis", "penile",
              "azoosperm", "prostat")
FEMALE_WORDS = ("ovar", "uter", "menstru", "menses", "amenorrh", "vagin", "menarche", "cervix", "labia", "clitor", "mammary")
ADULT_WORDS = ("menses", "menstru", "amenorrh", "menopaus", "infertil", "azoosperm", "erectile", "libido", "oligosperm")


# ------------------------------------------------------------------------------------------ per-disease prep


@dataclass(frozen=True)
class Prepared:
    disease: hpo.Disease
    features: tuple[tuple[str, float, str], ...]  # (hpo id, frequency, lower-case label)
    labels_blob: str  # all feature labels, lower case (keyword checks)
    excluded: tuple[str, ...]
    sex_of_feature: dict = field(default_factory=dict)  # hpo id -> "M"/"F" for sex-specific features
    systems_of_feature: dict = field(default_factory=dict)  # hpo id -> organ systems (ORDER_BY_SYSTEM keys)
    negative_pool: tuple = ()  # (hpo id, phrase) of COMMON_NEGATIVES the disease does not have
    noise_pool: tuple = ()  # NOISE_FINDINGS phrases unrelated to the disease


@lru_cache(maxsize=None)
def _prepared(database_id: str) -> Prepared:
    d = hpo.load_diseases()[database_id]
    terms = hpo.load_terms()
    feats = []
    sex_of = {}
    for h, f in d.features:
        t = terms.get(h)
        if t is None:
            continue
        low = t.label.lower()
        feats.append((h, f, low))
        if any(w in low for w in MALE_WORDS):
            sex_of[h] = "M"
        elif any(w in low for w in FEMALE_WORDS):
            sex_of[h] = "F"
    blob = " ".join(x[2] for x in feats)
    excl = tuple(h for h in d.excluded if h in terms)
    systems = {h: tuple(s for s in ORDER_BY_SYSTEM if in_system(low, s)) for h, _, low in feats}
    ids = {h for h, _, _ in feats}
    negs = tuple((h, phrase) for h, phrase, kws in COMMON_NEGATIVES if h not in ids and not any(kw in blob for kw in kws))
    noise = tuple(phrase for h, phrase, kws in NOISE_FINDINGS if h not in ids and not any(kw in blob for kw in kws))
    return Prepared(d, tuple(feats), blob, excl, sex_of, systems, negs, noise)


# ------------------------------------------------------------------------------------------ case sampling


@dataclass
class Case:
    disease_id: str
    age: int
    months: int | None
    days: int | None
    sex: str  # "M" / "F"
    onset: str | None
    features: list[str]  # rendered names, most characteristic first
    feature_ids: list[str]
    negatives: list[str]  # rendered negations
    family: str
    noise: list[str]
    system: str | None  # organ system for the imaging order
    age_sex: str = ""
    onset_phrase: str = ""


def _weighted_sample(rng: random.Random, items: list, weights: list[float], k: int) -> list:
    """k items without replacement, P ~ weight (Efraimidis-Spirakis)."""
    keyed = sorted(((rng.random() ** (1.0 / max(w, 1e-6)), i) for i, w in enumerate(weights)), reverse=True)
    return [items[i] for _, i in keyed[:k]]


def _n_features(rng: random.Random) -> int:
    """How many findings a note names. Case descriptions and genetics referrals list most of what
    was found (a median of about 8); a 3-finding note ("ID, seizures, hypotonia") fits hundreds of
    diseases equally, so short notes are kept but rarer."""
    r = rng.random()
    if r < 0.15:
        return rng.randint(4, 5)
    if r < 0.70:
        return rng.randint(6, 10)
    return rng.randint(11, 15)


# Clinicians mention what is characteristic: a feature's chance of being named grows with its
# specificity across the panel (idf ** SPECIFIC_BIAS) as well as its frequency in the disease.
SPECIFIC_BIAS = 1.0


@lru_cache(maxsize=1)
def _feature_idf() -> dict[str, float]:
    """log(N / number of panel diseases annotated with the term): how specific a feature is."""
    import math

    panel = _panel()
    df: dict[str, int] = {}
    for d in panel:
        for h, _ in d.features:
            df[h] = df.get(h, 0) + 1
    return {h: math.log(len(panel) / c) for h, c in df.items()}


def sample_case(database_id: str, rng: random.Random, pool: str, *, k_range: tuple[int, int] | None = None,
                frequent_bias: float = 1.0, specific_bias: float = 0.0, negation_p: float = 0.55,
                noise_max: int = 3) -> Case:
    """One synthetic patient of a disease. ``frequent_bias``/``specific_bias`` > 0 prefer frequent /
    disease-specific (rare across the panel) features when more are present than a note mentions."""
    prep = _prepared(database_id)
    d = prep.disease
    # features present in this patient: each with its annotated frequency
    present = [(h, f, low) for h, f, low in prep.features if rng.random() < f]
    k = rng.randint(*k_range) if k_range else _n_features(rng)
    k = min(k, len(prep.features))
    if len(present) > k:
        idf = _feature_idf() if specific_bias else {}
        weights = [f ** frequent_bias * (idf.get(h, 1.0) ** specific_bias if specific_bias else 1.0)
                   for h, f, _ in present]
        present = _weighted_sample(rng, present, weights, k)
    if len(present) < min(3, k):
        # an atypical sampling: top up with the most frequent remaining features
        have = {h for h, _, _ in present}
        rest = sorted((x for x in prep.features if x[0] not in have), key=lambda x: (-x[1], rng.random()))
        present += rest[: min(3, k) - len(present)]

    # sex: annotated, X-linked recessive (mostly boys), or forced by sex-specific features
    sex = None
    for h, _, _ in present:
        if h in prep.sex_of_feature:
            sex = prep.sex_of_feature[h]
            break
    if sex is None:
        if d.sex in ("male", "female"):
            sex = "M" if d.sex == "male" else "F"
        elif "XLR" in d.inheritance:
            sex = "M" if rng.random() < 0.9 else "F"
        else:
            sex = "M" if rng.random() < 0.5 else "F"
    present = [x for x in present if prep.sex_of_feature.get(x[0], sex) == sex]

    onset = rng.choice(d.onsets) if d.onsets else None
    lo, hi = ONSET_AGES.get(onset, ONSET_AGES[None])
    if onset is None and rng.random() < 0.7:
        hi = 17  # unannotated onset: most of these syndromic diseases present in childhood
    age = rng.randint(lo, hi)
    months = days = None
    if age == 0:
        if onset in ("fetal", "antenatal", "neonatal") and rng.random() < 0.5:
            days = rng.randint(1, 27)
        else:
            months = rng.randint(1, 11)
    elif age == 1 and rng.random() < 0.5:
        months = rng.randint(12, 23)

    if age < 13:  # no menstrual / fertility findings in children
        present = [x for x in present if not any(w in x[2] for w in ADULT_WORDS)] or present
    # most characteristic (frequent) first, with some shuffling
    present.sort(key=lambda x: -(x[1] + 0.6 * rng.random()))
    names, ids = [], []
    for h, _, _ in present:
        n = term_name(h, rng, pool)
        if n and n not in names:
            names.append(n)
            ids.append(h)

    # negations: annotated NOT features first, then common negatives the disease does not have
    negs: list[str] = []
    forms = NEGATION_FORMS[pool]
    if prep.excluded and rng.random() < negation_p + 0.2:
        for h in rng.sample(list(prep.excluded), min(len(prep.excluded), rng.randint(1, 2))):
            n = term_name(h, rng, pool)
            if n:
                negs.append(rng.choice(forms).replace("{f}", n))
    if rng.random() < negation_p:
        pool_negs = prep.negative_pool
        for h, phrase in rng.sample(pool_negs, min(len(pool_negs), rng.randint(1, 2))):
            negs.append(rng.choice(forms).replace("{f}", phrase))

    # family history by inheritance
    fam = ""
    if rng.random() < 0.35:
        mode = next((m for m in d.inheritance if m in FAMILY[pool]), "none")
        fam = rng.choice(FAMILY[pool][mode])

    # 0-3 unrelated benign findings
    noise: list[str] = []
    n_noise = min(noise_max, rng.choice((0, 0, 1, 1, 2, 3)))
    if n_noise:
        ok = [phrase for phrase in prep.noise_pool
              if not (age < 9 and "age 9" in phrase) and not (age < 6 and "age 6" in phrase)]
        noise = rng.sample(ok, min(n_noise, len(ok)))

    # organ system of the order
    scores: dict[str, int] = {}
    for h, _, _ in present:
        for s_ in prep.systems_of_feature.get(h, ()):
            scores[s_] = scores.get(s_, 0) + 1
    system = max(scores, key=lambda s_: (scores[s_], s_)) if scores else None

    case = Case(database_id, age, months, days, sex, onset, names, ids, negs, fam, noise, system)
    case.age_sex = _age_sex(case, rng, pool)
    case.onset_phrase = _onset_phrase(case, rng, pool)
    return case


def _age_sex(case: Case, rng: random.Random, pool: str) -> str:
    male = case.sex == "M"
    adult = case.age >= 18
    if case.days is not None:
        t = rng.choice(AGE_SEX[pool]["newborn"])
    elif case.months is not None:
        t = rng.choice(AGE_SEX[pool]["months"])
    else:
        t = rng.choice(AGE_SEX[pool]["years"])
    words = {
        "{boy}": ("man" if adult else "boy") if male else ("woman" if adult else "girl"),
        "{male}": "male" if male else "female",
        "{MF}": "M" if male else "F",
        "{a}": str(case.age), "{m}": str(case.months or 0), "{d}": str(case.days or 0),
    }
    for k, v in words.items():
        t = t.replace(k, v)
    return t.replace(" 1 years", " 1 year")


def _onset_phrase(case: Case, rng: random.Random, pool: str) -> str:
    if case.onset is None or rng.random() < 0.3:
        return ""
    phrase = rng.choice(ONSET_PHRASES[pool][case.onset])
    return phrase.replace("{poss}", "his" if case.sex == "M" else "her")


# ------------------------------------------------------------------------------------------ note templates


def _article(s: str) -> str:
    vowel = s[:1].lower() in "aeiou" and not s.lower().startswith(("uni", "one"))
    eight = re.match(r"(8|11|18|8\d)\b", s) is not None
    return ("an " if vowel or eight else "a ") + s


def _neg_sentence(c: Case, r: random.Random) -> str:
    return cap("; ".join(c.negatives)) if c.negatives else ""


def _sent(*bits: str) -> str:
    out = [b.strip().rstrip(".") for b in bits if b and b.strip()]
    return (". ".join(cap(b) for b in out) + ".") if out else ""


def _tr_case_report(c: Case, r: random.Random):
    f = join_list(c.features, r)
    lead = f"We describe {_article(c.age_sex)} with {f}"
    if c.onset_phrase:
        lead += f", {c.onset_phrase}"
    noise = f"Other history: {join_list(c.noise, r)}" if c.noise else ""
    return [], [_sent(lead, _neg_sentence(c, r), c.family, noise)]


def _tr_clinical(c: Case, r: random.Random):
    f = ", ".join(c.features)
    head = f"Pt w/ {f}"
    if c.onset_phrase:
        head += f" {c.onset_phrase}"
    noise = f"Also {', '.join(c.noise)}" if c.noise else ""
    reason = [c.age_sex] if r.random() < 0.6 else []
    return reason, [_sent(head, _neg_sentence(c, r), c.family, noise)]


def _tr_referral(c: Case, r: random.Random):
    first, rest = c.features[:1], c.features[1:]
    reason = f"Referred for {first[0]}" if first else "Referred for evaluation"
    who = f"{c.age_sex}" + (f", {c.onset_phrase}" if c.onset_phrase else "")
    exam = f"Exam notable for {join_list(rest, r)}" if rest else ""
    noise = f"PMH: {', '.join(c.noise)}" if c.noise else ""
    return [reason], [_sent(who, exam, _neg_sentence(c, r), c.family, noise)]


def _tr_problem_list(c: Case, r: random.Random):
    parts = [c.age_sex, "Problems: " + "; ".join(c.features)]
    if c.negatives:
        parts.append("Negatives: " + "; ".join(c.negatives))
    if c.family:
        parts.append(f"FHx: {c.family}")
    if c.noise:
        parts.append("Other: " + ", ".join(c.noise))
    return [], [". ".join(parts) + "."]


def _tr_short_hx(c: Case, r: random.Random):
    head, rest = c.features[:2], c.features[2:]
    reason = f"{c.age_sex} with {join_list(head, r)}"
    note = _sent(f"Additional findings: {', '.join(rest)}" if rest else "", c.onset_phrase and f"Symptoms {c.onset_phrase}",
                 _neg_sentence(c, r), c.family, ", ".join(c.noise))
    return [reason], [note] if note else []


def _te_presentation(c: Case, r: random.Random):
    a, b = c.features[:2], c.features[2:]
    lead = f"{cap(c.age_sex)} presenting with {join_list(a, r)}"
    if b:
        lead += f", found to have {join_list(b, r)}"
    negs = f"Notably absent: {', '.join(c.negatives)}" if c.negatives else ""
    return [], [_sent(lead, c.onset_phrase and f"Symptoms {c.onset_phrase}", negs, c.family,
                      (f"Incidentally, {join_list(c.noise, r)}" if c.noise else ""))]


def _te_hpi_exam(c: Case, r: random.Random):
    half = max(1, len(c.features) // 2)
    hpi = f"HPI: {c.age_sex}" + (f", problems {c.onset_phrase}" if c.onset_phrase else "")
    hpi += f"; history of {join_list(c.features[:half], r)}"
    exam = f"Exam: {', '.join(c.features[half:])}" if c.features[half:] else ""
    fam = f"FHx: {c.family}" if c.family else ""
    return [], [_sent(hpi, exam, _neg_sentence(c, r), fam, ("Misc: " + ", ".join(c.noise)) if c.noise else "")]


def _te_summary(c: Case, r: random.Random):
    bits = [f"Clinical summary - the patient is {_article(c.age_sex)}", "findings: " + "; ".join(c.features)]
    if c.negatives:
        bits.append("pertinent negatives: " + "; ".join(c.negatives))
    if c.family:
        bits.append(c.family)
    if c.noise:
        bits.append("unrelated: " + ", ".join(c.noise))
    return [], ["; ".join(bits) + "."]


TEST_REASONS = ("Evaluate for underlying genetic syndrome", "Suspected inherited disorder", "Unifying diagnosis?",
                "Syndromic features - workup", "Possible rare disease")


def _te_indication(c: Case, r: random.Random):
    sig = f"{cap(c.age_sex)} whose history is significant for {join_list(c.features[:3], r)}"
    also = f"Also noted: {', '.join(c.features[3:])}" if c.features[3:] else ""
    return [r.choice(TEST_REASONS)], [_sent(sig, also, _neg_sentence(c, r), c.family, c.onset_phrase and
                                            f"Symptoms {c.onset_phrase}", ", ".join(c.noise))]


TEMPLATES = {
    "train": (("case-report", _tr_case_report, 1.5), ("clinical", _tr_clinical, 1.5), ("referral", _tr_referral, 1.0),
              ("problem-list", _tr_problem_list, 1.0), ("short-hx", _tr_short_hx, 1.0)),
    "test": (("presentation", _te_presentation, 1.0), ("hpi-exam", _te_hpi_exam, 1.0), ("summary", _te_summary, 1.0),
             ("indication", _te_indication, 1.0)),
}


def render_case(c: Case, rng: random.Random, pool: str, template: str | None = None) -> tuple[list[str], list[str], str]:
    """(reasons, notes, template name) for a sampled case."""
    temps = TEMPLATES[pool]
    if template is None:
        name, fn, _ = rng.choices(temps, weights=[t[2] for t in temps])[0]
    else:
        name, fn, _ = next(t for t in temps if t[0] == template)
    reasons, notes = fn(c, rng)
    return reasons, notes, name


def _order(c: Case, rng: random.Random) -> tuple[str | None, bool]:
    r = rng.random()
    if c.system and r < 0.55:
        return rng.choice(ORDER_BY_SYSTEM[c.system][1]), True
    if r < 0.62:
        return rng.choice(("Imaging", "Diagnostic imaging", None)), True
    return rng.choice(GENETIC_ORDERS), False


def _example(database_id: str, rng: random.Random, pool: str) -> tuple[dict, str]:
    case = sample_case(database_id, rng, pool, specific_bias=SPECIFIC_BIAS)
    reasons, notes, name = render_case(case, rng, pool)
    typo = 0.01 if pool == "train" else 0.012
    reasons = [surface(x, rng, abbrev_p=0.15, typo_rate=typo, caps_p=0.0, strip_punct_p=0.02) for x in reasons]
    notes = [surface(x, rng, abbrev_p=0.15, typo_rate=typo, caps_p=0.01, strip_punct_p=0.02) for x in notes]
    code_text, imaging = _order(case, rng)
    sr = service_request(rng, code_text=code_text, reasons=reasons, notes=notes, imaging=imaging)
    return sr, f"{pool}:{name}"


def generate(n_per_disease: int, *, seed: int = 0, split: Split = "train", max_diseases: int | None = None) -> Dataset:
    """``n_per_disease`` notes for every disease of ``disease_panel(max_diseases)``."""
    if n_per_disease < 0:
        raise ValueError("n_per_disease must be >= 0")
    rng = make_rng(TASK, seed, split)
    pool = "test" if split == "test" else "train"
    panel = panel_diseases(max_diseases)
    items: list[LabelledOrder] = []
    for d in panel:
        for _ in range(n_per_disease):
            sr, group = _example(d.database_id, rng, pool)
            items.append(LabelledOrder(sr, d.database_id, group))
    rng.shuffle(items)
    return Dataset(items, [_label(d) for d in panel])


# ------------------------------------------------------------------------------------------ helpers for other generators


def background_phenotypes(rng: random.Random, pool: str, k: int = 3, top: int = 2000) -> list[str]:
    """k rendered phenotype names of a random panel disease (a realistic syndromic background)."""
    panel = _panel()
    d = panel[rng.randrange(min(top, len(panel)))]
    feats = [h for h, f in d.features if rng.random() < f] or [h for h, _ in d.features]
    out = []
    for h in rng.sample(feats, min(k, len(feats))):
        n = term_name(h, rng, pool)
        if n:
            out.append(n)
    return out
