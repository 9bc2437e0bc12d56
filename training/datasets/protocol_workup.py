"""Rare-disease workup orders for the protocol data set: a genetics-style case description from the
HPO annotations (rendered by ``diagnosis``) in the note, the imaging question in the reason, like
the demo fixtures. ``protocol.generate`` draws ``WORKUP_SHARE`` of the examples of these protocols
from here.
"""

from __future__ import annotations

import random
from functools import lru_cache

from . import protocol_kb as kb
from . import protocol_orders as orders
from .common import service_request
from .noise import join_list, surface
from .protocol_pools import KB_EVERY, QUESTION_FORMS, split_pool

# Rare-disease workup orders: a genetics-style case description in the note (rendered from the HPO
# annotations by ``diagnosis``), the imaging question in the reason. protocol -> (organ system of
# ``diagnosis.ORDER_BY_SYSTEM``, knowledge-table scenarios whose questions are used)
WORKUP: dict[str, tuple[str, tuple[str, ...]]] = {
    kb.MRB: ("neuro", ("peds_neuro",)),
    kb.ECHO: ("cardiac", ("syndromic_heart", "murmur")),
    kb.US_RENAL: ("renal", ("renal_cysts",)),
    kb.US_ABD: ("abdominal", ("organomegaly",)),
    kb.CT_CH_WO: ("lung", ("bronchiectasis", "emphysema_young")),
    kb.US_THY: ("thyroid", ("thyroid_nodule",)),
}
WORKUP_SHARE = 0.2  # of the examples of those protocols


@lru_cache(maxsize=1)
def _diseases_by_system() -> dict[str, tuple[str, ...]]:
    from . import diagnosis as dx

    out: dict[str, list[str]] = {}
    for d in dx.panel_diseases():
        system = dx.dominant_system(d.database_id)
        if system:
            out.setdefault(system, []).append(d.database_id)
    return {k: tuple(v) for k, v in out.items()}


def workup_questions(display: str, pool: str) -> tuple[str, ...]:
    ids = WORKUP[display][1]
    out: list[str] = []
    for sc in kb.SCENARIOS:
        if sc.id in ids:
            out += [q for q in split_pool(sc.q, pool, KB_EVERY) if q not in out]
    return tuple(out)


def workup_example(rng: random.Random, display: str, pool: str) -> tuple[dict, str]:
    from . import diagnosis as dx

    system = WORKUP[display][0]
    candidates = _diseases_by_system().get(system) or _diseases_by_system()["neuro"]
    db = rng.choice(candidates)
    terms = dx.hpo.load_terms()
    case = dx.sample_case(db, rng, pool)
    if display == kb.MRB and case.age >= 18:
        case = dx.sample_case(db, rng, pool)
    hits = [n for n, h in zip(case.features, case.feature_ids) if dx.in_system(terms[h].label.lower(), system)]
    reasons, notes, name = dx.render_case(case, rng, pool)
    q = rng.choice(QUESTION_FORMS[pool]).replace("{q}", rng.choice(workup_questions(display, pool)))
    lead = join_list(hits[:2], rng) if hits else rng.choice(("syndromic features", "genetic syndrome workup"))
    reason = surface(f"{lead}; {q}", rng, abbrev_p=0.2, typo_rate=0.01)
    notes = [surface(x, rng, abbrev_p=0.15, typo_rate=0.01, caps_p=0.0) for x in notes + reasons]
    code_text = display if rng.random() < 0.05 else orders.exam_name(display, rng, pool, split_pool)
    sr = service_request(rng, code_text=code_text, reasons=[reason], notes=notes, imaging=True)
    return sr, f"{pool}:workup-{name}"


