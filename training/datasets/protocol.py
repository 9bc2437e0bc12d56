"""Generated imaging orders labelled with the appropriate protocol (``protocol_kb`` knowledge table).

``generate(n, seed=0, split="train")`` returns ``n`` FHIR ServiceRequests whose ``code.text`` is
the (often generic) ordered procedure, ``reasonCode[].text`` the indication and ``note[].text``
the clinical note, each labelled with the protocol code of ``schemas.catalog.PROTOCOLS``.

- Label mix: Zipf-like like a real order mix (``protocol_kb.VOLUME``) with a floor of 0.5 % of
  ``n`` (at least one) per protocol, so every protocol has examples once ``n >= 34``.
- Splits: ``train`` and ``val`` draw from the same phrasing pools and note templates (different
  random streams); ``test`` uses note templates, question/duration/demographic phrasings and a
  share of every knowledge-table phrase list that train never sees. ``group`` is
  ``"<pool>:<template>"``, so ``{test groups} & {train groups} == {}``.
- Patient factors that change the answer (renal function, contrast allergy, pregnancy, age,
  MRI-unsafe implants) appear when they flip the protocol, as negated mentions ("Cr 0.8", "NKDA")
  when they could have, and as harmless distractors elsewhere.
- Surface: clinician abbreviations, ~1.5 % typos, casing and punctuation styles, past history
  that does not drive the protocol, and (4-15 %) a rare-disease phenotype background.
- Rare-disease workup orders (``WORKUP``, 20 % of MRI brain, echo, renal/abdominal US, chest CT
  and thyroid US examples): a genetics-style case description from the HPO annotations in the
  note and the imaging question in the reason, like the demo fixtures.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

from schemas.catalog import PROTOCOL_SYSTEM, PROTOCOLS, protocol_by_display
from schemas.labels import Label

from . import protocol_kb as kb
from . import protocol_orders as orders
from . import protocol_styles as styles
from . import protocol_workup as workup
from .common import Dataset, LabelledOrder, Split, make_rng, service_request
from .noise import cap, join_list, surface
from .protocol_fillers import DURATIONS, demographics, fill, fits  # noqa: F401  (DURATIONS re-exported)
from .protocol_pools import KB_EVERY, QUESTION_FORMS, split_pool

TASK = "protocol"


def protocol_labels() -> list[Label]:
    """The protocol label space in catalog order (index = class id)."""
    return [Label(PROTOCOL_SYSTEM, p.code, p.display) for p in PROTOCOLS]


def _code(display: str) -> str:
    return protocol_by_display(display).code




# ------------------------------------------------------------------------------------------ candidates


@dataclass(frozen=True)
class Candidate:
    scenario: kb.Scenario
    factor: str | None  # the flip factor, or None for the plain scenario
    label: str  # protocol display
    weight: float


def _effect(scenario: kb.Scenario, factor: str, protocol: str | None = None) -> str | None:
    """What ``factor`` does to ``protocol`` (default: the scenario's): a replacement display, BLOCK, or None."""
    base = protocol or scenario.protocol
    if protocol is None and factor in scenario.flips:
        return scenario.flips[factor]
    if base in kb.BLOCKED.get(factor, ()):
        return kb.BLOCK
    return kb.FLIPS.get(factor, {}).get(base)


def _factor_possible(scenario: kb.Scenario, factor: str) -> bool:
    lo, hi = scenario.age
    if factor == "pregnant":
        return scenario.sex != "M" and lo <= 42 and hi >= 18
    if factor == "child":
        return lo < 16 and hi >= 16
    return True


@lru_cache(maxsize=1)
def candidates_by_label() -> dict[str, tuple[Candidate, ...]]:
    out: dict[str, list[Candidate]] = {p.display: [] for p in PROTOCOLS}
    for sc in kb.SCENARIOS:
        out[sc.protocol].append(Candidate(sc, None, sc.protocol, sc.weight))
        for factor in kb.FACTORS:
            if factor in sc.fixed or not _factor_possible(sc, factor):
                continue
            eff = _effect(sc, factor)
            if eff and eff != kb.BLOCK and eff != sc.protocol:
                out[eff].append(Candidate(sc, factor, eff, sc.weight * kb.FLIP_WEIGHT[factor]))
    missing = [k for k, v in out.items() if not v]
    if missing:
        raise RuntimeError(f"knowledge table has no scenario for protocols {missing}")
    return {k: tuple(v) for k, v in out.items()}


def allocate(n: int, rng: random.Random) -> dict[str, int]:
    """Examples per protocol display: a floor of 0.5 % of n (>= 1), the rest by order volume."""
    displays = [p.display for p in PROTOCOLS]
    vol = [kb.VOLUME[d] for d in displays]
    if n < len(displays):
        chosen: list[str] = []
        pool = list(zip(displays, vol))
        for _ in range(n):
            d = rng.choices([p[0] for p in pool], weights=[p[1] for p in pool])[0]
            chosen.append(d)
            pool = [p for p in pool if p[0] != d]
        return {d: 1 for d in chosen}
    floor = max(1, int(0.005 * n))
    rest = n - floor * len(displays)
    total = sum(vol)
    raw = [rest * v / total for v in vol]
    counts = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: rest - sum(counts)]:
        counts[i] += 1
    return {d: floor + c for d, c in zip(displays, counts)}


# ------------------------------------------------------------------------------------------ rendering


@dataclass
class Parts:
    demo: str = ""
    demo_required: bool = False
    sx: str = ""
    hx: list[str] = field(default_factory=list)
    find: list[str] = field(default_factory=list)
    q: str = ""
    q_raw: str = ""  # the question without its "r/o ..." form
    neg: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)  # factor mentions (required ones included)
    pmh: list[str] = field(default_factory=list)
    bg: str = ""  # syndromic background (rare-disease phenotype terms), a distractor
    age: int = 50
    sex: str = "F"
    key_required: bool = False  # facts[0] is the scenario's key fact (or the flip factor)


def _s(*bits: str, sep: str = ". ") -> str:
    """Join non-empty bits as sentences."""
    out = [b.strip().rstrip(".") for b in bits if b and b.strip()]
    return (sep.join(out) + ".") if out else ""


def _core(p: Parts) -> list[str]:
    return [x for x in [p.sx, *p.hx, p.q] if x]


# Train templates ---------------------------------------------------------------------------------


def _tr_short(p: Parts, r: random.Random):
    bits = _core(p)[:2] if r.random() < 0.5 else _core(p)[:1] + ([p.q] if p.q and p.q not in _core(p)[:1] else [])
    bits = bits + p.facts
    head = p.demo if (p.demo_required or r.random() < 0.3) else ""
    return [", ".join(x for x in [head, "; ".join(bits)] if x)], []


def _tr_ed(p: Parts, r: random.Random):
    first = f"{p.demo} c/o {p.sx}" if p.sx else (f"{p.demo} with {join_list(p.hx, r)}" if p.hx else p.demo)
    rest_hx = p.hx if p.sx else []
    pmh = f"PMH: {', '.join(p.pmh)}" if p.pmh else ""
    note = _s(first, join_list(rest_hx, r), ", ".join(p.find), ", ".join(p.neg), ", ".join(p.facts), p.bg, pmh)
    return [p.q or p.sx or (p.hx[0] if p.hx else "")], [note]


def _tr_history(p: Parts, r: random.Random):
    hist = ", ".join(x for x in [p.demo, *p.hx, p.sx, *p.find] if x)
    note = _s(f"Clinical history: {hist}" if hist else "", ", ".join(p.facts), p.bg,
              f"Reason for exam: {p.q}" if p.q else "")
    return [], [note]


def _tr_narrative(p: Parts, r: random.Random):
    who = p.demo or "Pt"
    who = cap(who)
    if p.pmh:
        who += f" with PMH of {join_list(p.pmh, r)}"
    pres = f"{who} who presents with {p.sx}" if p.sx else who
    note = _s(pres, join_list(p.hx, r), ", ".join(p.find), ", ".join(p.neg), ", ".join(p.facts), p.bg, cap(p.q))
    reasons = [p.q] if p.q and r.random() < 0.3 else []
    return reasons, [note]


def _tr_oneliner(p: Parts, r: random.Random):
    main = " ".join(x for x in [p.demo, p.sx or (p.hx[0] if p.hx else "")] if x)
    bits = [main] + (p.hx[1:] if not p.sx else p.hx) + p.find[:1] + ([p.q] if p.q else []) + p.facts
    return [", ".join(b for b in bits if b)], []


def _tr_hx_q(p: Parts, r: random.Random):
    reason = _s(join_list(p.hx, r) if p.hx else p.sx, p.q)
    note = _s(p.demo, ", ".join(p.find), ", ".join(p.facts), p.bg,
              f"PMH {', '.join(p.pmh)}" if p.pmh else "") if (p.facts or p.find or p.pmh or p.demo_required) else ""
    return [reason], [note] if note else []


# Test templates ----------------------------------------------------------------------------------


def _te_indication(p: Parts, r: random.Random):
    ind = "; ".join(x for x in [p.demo, p.sx, *p.hx] if x)
    note = _s(f"Indication: {ind}" if ind else "", ", ".join(p.find), ", ".join(p.facts), p.bg,
              f"Question: {p.q}" if p.q else "")
    return [], [note]


def _te_soap(p: Parts, r: random.Random):
    s = f"S: {p.demo or 'patient'} reports {p.sx}" if p.sx else f"S: {p.demo or 'patient'}"
    o = f"O: {', '.join(p.find)}" if p.find else ""
    hx = f"Hx: {'; '.join(p.hx)}" if p.hx else ""
    a = f"A/P: {p.q}, imaging requested" if p.q else "A/P: imaging requested"
    pmh = f"PMH {', '.join(p.pmh)}" if p.pmh else ""
    return [], [_s(s, hx, o, ", ".join(p.facts), p.bg, a, pmh)]


def _te_question_first(p: Parts, r: random.Random):
    reason = cap(p.q) if p.q else (p.sx or (p.hx[0] if p.hx else ""))
    bits = [p.demo, p.sx if p.q else "", *p.hx, *p.find, *p.neg, *p.facts, p.bg]
    return [reason], ["; ".join(b for b in bits if b)]


def _te_terse(p: Parts, r: random.Random):
    bits = [p.demo, p.sx, *p.hx, *p.find[:1], *p.facts, p.q]
    return [" / ".join(b for b in bits if b)], []


def _te_consult(p: Parts, r: random.Random):
    note = _s(p.demo, f"Presenting problem: {p.sx}" if p.sx else "", f"Relevant hx: {'; '.join(p.hx)}" if p.hx else "",
              f"Exam/labs: {', '.join(p.find)}" if p.find else "", ", ".join(p.facts), p.bg,
              f"Clinical question: {p.q}" if p.q else "")
    return [], [note]


def _te_hpi(p: Parts, r: random.Random):
    hpi = f"HPI: {p.demo or 'patient'} presenting with {p.sx}" if p.sx else f"HPI: {p.demo or 'patient'}"
    note = _s(hpi, ", ".join(p.neg), join_list(p.hx, r), ", ".join(p.find),
              f"Pertinent: {', '.join(p.facts)}" if p.facts else "", p.bg)
    return [p.q] if p.q else [], [note]


TEMPLATES = {
    "train": (("short", _tr_short, 2.0), ("ed", _tr_ed, 2.0), ("history", _tr_history, 1.5),
              ("narrative", _tr_narrative, 1.5), ("oneliner", _tr_oneliner, 1.5), ("hx-q", _tr_hx_q, 1.0)),
    "test": (("indication", _te_indication, 1.5), ("soap", _te_soap, 1.0), ("question-first", _te_question_first, 1.5),
             ("terse", _te_terse, 1.5), ("consult", _te_consult, 1.0), ("hpi", _te_hpi, 1.0)),
}


def _pick(rng: random.Random, items, k_max: int, p_each: float) -> list:
    items = list(items)
    rng.shuffle(items)
    return [x for x in items[:k_max] if rng.random() < p_each]


def _syndromic_background(rng: random.Random, pool: str) -> str:
    from .diagnosis import background_phenotypes

    terms = background_phenotypes(rng, pool, k=rng.randint(2, 4) if rng.random() < 0.6 else rng.randint(5, 9))
    lead = rng.choice(("known genetic syndrome with", "PMH notable for", "hx", "background:") if pool == "train"
                      else ("longstanding", "relevant background of", "also has"))
    return f"{lead} {join_list(terms, rng)}"


def _render(rng: random.Random, cand: Candidate, pool: str) -> tuple[dict, str]:
    sc = cand.scenario
    label = cand.label
    lo, hi = sc.age
    flip = cand.factor
    child_sensitive = _factor_possible(sc, "child") and _effect(sc, "child") not in (None, kb.BLOCK)
    if flip == "child":
        lo, hi = max(lo, 3), 15
    elif child_sensitive:
        lo = max(lo, 16)
    pregnant = flip == "pregnant" or "pregnant" in sc.fixed
    if pregnant:
        lo, hi = max(lo, 18), min(hi, 42)
    age = rng.randint(lo, hi)
    sex = "F" if pregnant else (sc.sex or ("F" if rng.random() < 0.52 else "M"))
    months = None
    if sc.infant and age <= 1 and rng.random() < 0.8:
        months = rng.randint(1, 11) if age == 0 else rng.randint(12, 23)

    p = Parts(age=age, sex=sex)
    p.demo_required = child_sensitive or hi < 18 or sc.infant
    p.demo = demographics(rng, age, sex, pool, months) if (p.demo_required or rng.random() < 0.85) else ""

    def take(lst):
        return [fill(x, rng, pool) for x in split_pool(lst, pool, KB_EVERY) if fits(x, sex, age)]

    sx, hx, find, qs, neg = take(sc.sx), take(sc.hx), take(sc.find), take(sc.q), take(sc.neg)
    if sx and rng.random() < 0.85:
        p.sx = rng.choice(sx)
    p.hx = _pick(rng, hx, 2, 0.6)
    p.find = _pick(rng, find, 3, 0.45)
    if qs and (rng.random() < 0.75 or not (p.sx or p.hx or p.find)):
        p.q_raw = rng.choice(qs)
        p.q = rng.choice(QUESTION_FORMS[pool]).replace("{q}", p.q_raw)
    # the context that makes the question answerable is always there: a complaint or history
    # when the scenario has them, else findings and the question
    if (sx or hx) and not (p.sx or p.hx):
        if sx and (not hx or rng.random() < 0.5):
            p.sx = rng.choice(sx)
        else:
            p.hx = [rng.choice(hx)]
    if not (sx or hx):
        if find and not p.find:
            p.find = [rng.choice(find)]
        if qs and not p.q:
            p.q_raw = rng.choice(qs)
        p.q = rng.choice(QUESTION_FORMS[pool]).replace("{q}", p.q_raw)
    p.neg = _pick(rng, neg, 2, 0.35)

    # factors: required (flip / fixed), negated mentions of the ones that matter, distractors
    facts: list[str] = []
    decisive: list[str] = []
    for factor in kb.FACTORS:
        if factor == "child":
            continue
        present_texts, absent_texts = kb.FACTOR_TEXT[factor]
        present_texts, absent_texts = split_pool(present_texts, pool), split_pool(absent_texts, pool)
        if factor == flip or factor in sc.fixed:
            facts.append(fill(rng.choice(present_texts), rng, pool))
            decisive.append(facts[-1])
            continue
        eff = _effect(sc, factor)
        sensitive = eff is not None and eff != sc.protocol
        if sensitive:
            if factor == "pregnant" and (sex == "M" or not 14 <= age <= 50):
                continue
            p_neg = 0.15 if factor == "pacemaker" else 0.25
            if rng.random() < p_neg:
                facts.append(fill(rng.choice(absent_texts), rng, pool))
            continue
        # distractor: harmless for the base protocol and for the label
        if label != sc.protocol and _effect(sc, factor, label) is not None:
            continue
        if factor == "pregnant" and not (sex == "F" and 18 <= age <= 42 and label in kb.PREGNANCY_NEUTRAL):
            continue
        if rng.random() < kb.DISTRACTOR_P[factor]:
            facts.append(fill(rng.choice(present_texts), rng, pool))
    rng.shuffle(facts)
    if decisive:  # the factor that decides the answer first, so that short reasons keep it
        facts = [decisive[0]] + [x for x in facts if x != decisive[0]]
        p.key_required = True
    if sc.key:  # the fact that makes this scenario's answer: rendered by every template
        facts.insert(0, rng.choice(take(sc.key)))
        p.key_required = True
    p.facts = facts

    if rng.random() < 0.45:
        pmh = [x for x in split_pool(kb.PMH, pool)
               if not (sex == "F" and x in kb.PMH_MALE_ONLY) and not (sex == "M" and x in kb.PMH_FEMALE_ONLY)]
        p.pmh = rng.sample(pmh, rng.randint(1, 4))
    # rare-disease phenotype background (a distractor for the protocol): more common in children
    if rng.random() < (0.15 if sc.age[0] < 18 else 0.04):
        p.bg = _syndromic_background(rng, pool)

    templates = kb_templates(pool)
    name, fn, _ = rng.choices(templates, weights=[t[2] for t in templates])[0]
    reasons, notes = fn(p, rng)
    reasons = [surface(x, rng) for x in reasons if x]
    notes = [surface(x, rng) for x in notes if x]

    # many real orders carry the whole indication in the note (reasonCode empty)
    if reasons and rng.random() < 0.45:
        notes, reasons = [" ".join(reasons + notes)], []
    sr = service_request(rng, code_text=_ordered_exam(rng, sc, label, pool), reasons=reasons, notes=notes, imaging=True)
    return sr, f"{pool}:{name}"


def _ordered_exam(rng: random.Random, sc: kb.Scenario, label: str, pool: str) -> str | None:
    """The order's exam name: the label's exam as hospitals name it; when a patient factor changed only
    the contrast (same modality and region), half the time the exam the clinician first ordered."""
    src = label
    if label != sc.protocol and rng.random() < 0.5:
        a, b = protocol_by_display(label), protocol_by_display(sc.protocol)
        if (a.modality, a.body_region) == (b.modality, b.body_region):
            src = sc.protocol
    r = rng.random()
    if r < 0.05:
        return label  # the protocol's own name
    return orders.exam_name(src, rng, pool, split_pool)


WORKUP, WORKUP_SHARE = workup.WORKUP, workup.WORKUP_SHARE  # rare-disease workup orders (protocol_workup)


def kb_templates(pool: str):
    """The tidy templates above plus the real-writing styles of ``protocol_styles`` (one-to-three-word
    reasons, neurology/admission narratives), all as ``fn(parts, rng)``."""
    styled = tuple((name, (lambda p, r, fn=fn: fn(p, r, pool)), w) for name, fn, w in styles.TEMPLATES[pool])
    return TEMPLATES[pool] + styled


def generate(n: int, *, seed: int = 0, split: Split = "train") -> Dataset:
    """``n`` labelled imaging orders (see module docstring)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = make_rng(TASK, seed, split)
    pool = "test" if split == "test" else "train"
    cands = candidates_by_label()
    items: list[LabelledOrder] = []
    for display, count in allocate(n, rng).items():
        cs = cands[display]
        weights = [c.weight for c in cs]
        code = _code(display)
        for _ in range(count):
            if display in workup.WORKUP and rng.random() < workup.WORKUP_SHARE:
                sr, group = workup.workup_example(rng, display, pool)
            else:
                cand = rng.choices(cs, weights=weights)[0]
                sr, group = _render(rng, cand, pool)
            items.append(LabelledOrder(sr, code, group))
    rng.shuffle(items)
    return Dataset(items, protocol_labels())
