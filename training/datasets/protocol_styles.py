"""How real indications are written, beyond the tidy templates of ``protocol``: one to three words
("headache", "r/o PE", "f/u nodule"), and long neurology- or admission-style narratives ("This 60
y/o RHM with a history of HTN and DM presented on 3/2/96 with ...") with ages, handedness, dates
and history mixed in. Train and test templates differ (the test split's phrasings are never
trained on).

Each template takes the rendered ``protocol.Parts`` and a random stream and returns
``(reasons, notes)`` like the templates of ``protocol``.
"""

from __future__ import annotations

import random
import re

from .noise import cap, join_list

_QUESTION_PREFIX = re.compile(r"^(?:r/o|rule out|eval(?:uate)?(?: for)?|concern for|c/f|assess for|\?)\s*", re.IGNORECASE)


def _bare(q: str) -> str:
    return _QUESTION_PREFIX.sub("", q).strip(" ?")


def _shortest(options: list[str], max_words: int) -> str:
    options = [o for o in options if o]
    short = [o for o in options if len(o.split()) <= max_words]
    return short[0] if short else (min(options, key=len) if options else "")


# ------------------------------------------------------------------ short reasons (1-3 words)

_FOLLOW_UP = {"train": ("f/u {x}", "follow up {x}", "FU {x}", "{x} f/u", "hx {x}", "h/o {x}", "known {x}"),
              "test": ("interval f/u {x}", "{x}, follow-up", "surveillance {x}", "{x} - recheck", "prior {x}")}
_ASK = {"train": ("r/o {x}", "eval {x}", "?{x}", "{x}", "{x}", "{x}"),
        "test": ("{x}?", "exclude {x}", "{x}", "query {x}", "{x}")}


def short_reason(p, r: random.Random, pool: str) -> tuple[list[str], list[str]]:
    """The indication as a clinician types it into a one-line field."""
    q = p.q_raw or (_bare(p.q) if p.q else "")
    candidates = [c for c in (q, p.sx, *(p.hx or [])) if c]
    rr = r.random()
    if p.hx and rr < 0.2:
        text = r.choice(_FOLLOW_UP[pool]).replace("{x}", _shortest(list(p.hx), 4))
    elif q and rr < 0.6:
        text = r.choice(_ASK[pool]).replace("{x}", q)
    else:
        text = _shortest(candidates, 3)
    bits = [text]
    # the fact that decides the protocol (a key finding, renal failure, pregnancy) is kept
    if p.facts and (p.key_required or r.random() < 0.15):
        bits.append(p.facts[0])
    if p.demo_required and p.demo:
        bits.insert(0, p.demo)
    return [", ".join(b for b in bits if b)], []


# ------------------------------------------------------------------ neurology / admission narratives

_HAND: dict[str, dict[str, tuple[str, ...]]] = {"train": {"M": ("RHM", "LHM", "right-handed man", "R-handed male"), "F": ("RHF", "LHF", "right-handed woman", "R-handed female")},
         "test": {"M": ("right handed male", "left-handed gentleman", "RH man"), "F": ("right handed female", "left-handed lady", "RH woman")}}
_CHILD = {"M": ("boy",), "F": ("girl",)}
_WHEN = {"train": ("on {d}", "{n} days prior to admission", "the morning of admission", "{n} weeks ago", "on the evening of {d}",
                   "in {mon} {yr}", "{n} days ago"),
         "test": ("{n} days before presentation", "earlier today", "last {dow}", "around {d}", "{n} months ago")}
_OPEN = {"train": ("This {age} y/o {hand} with a history of {pmh} presented {when} with {sx}",
                   "This is a {age} y/o {hand} with PMHx of {pmh} who presented {when} with {sx}",
                   "{age} y/o {hand}, hx of {pmh}, who presented {when} with {sx}",
                   "This {age} year old {hand} was in his usual state of health until {when}, when he developed {sx}"),
         "test": ("Mr./Ms. is a {age}-year-old {hand} with past history significant for {pmh}, seen {when} for {sx}",
                  "The patient is a {age} yo {hand} ({pmh}) who came in {when} because of {sx}",
                  "Pleasant {age} year-old {hand}; background {pmh}; developed {sx} {when}")}
_MONTHS = ("January", "March", "May", "July", "September", "November")
_DOW = ("Monday", "Tuesday", "Friday", "Sunday")


def _when(r: random.Random, pool: str) -> str:
    d = f"{r.randint(1, 12)}/{r.randint(1, 28)}/{r.choice(('92', '96', '03', '19', '2021', '2023'))}"
    return (r.choice(_WHEN[pool]).replace("{d}", d).replace("{n}", str(r.randint(2, 10)))
            .replace("{mon}", r.choice(_MONTHS)).replace("{yr}", str(r.randint(1990, 2024))).replace("{dow}", r.choice(_DOW)))


def _he(text: str, sex: str) -> str:
    if sex == "F":
        text = re.sub(r"\bhis\b", "her", text)
        text = re.sub(r"\bhe\b", "she", text)
    return text


def narrative(p, r: random.Random, pool: str) -> tuple[list[str], list[str]]:
    """A neurology- or admission-style HPI paragraph; the imaging question, if any, at the end."""
    age, sex = p.age, p.sex
    hand = r.choice(_HAND[pool][sex]) if age >= 16 else f"{'right' if r.random() < 0.85 else 'left'}-handed {_CHILD[sex][0]}"
    pmh = join_list(p.pmh, r) if p.pmh else r.choice(("no significant past history", "HTN", "unremarkable PMH"))
    sx = p.sx or (p.hx[0] if p.hx else "symptoms")
    opening = _he(r.choice(_OPEN[pool]), sex).format(age=age, hand=hand, pmh=pmh, when=_when(r, pool), sx=sx)
    rest = list(p.hx if p.sx else p.hx[1:])
    sentences = [opening]
    if rest:
        sentences.append(cap(r.choice(("He also has ", "There is a history of ", "Notably ", "")) + join_list(rest, r)))
    if p.find:
        sentences.append(cap(r.choice(("Exam: ", "On exam ", "Neuro exam showed ", "Workup: ", "")) + ", ".join(p.find)))
    if p.neg:
        sentences.append(cap(", ".join(p.neg)))
    if p.facts:
        sentences.append(cap(", ".join(p.facts)))
    if p.bg:
        sentences.append(cap(p.bg))
    if r.random() < 0.3:
        sentences.append(r.choice(("Outside CT head was reportedly unremarkable", "He was admitted for further workup",
                                   "Labs were otherwise unremarkable", "Symptoms have been stable since")))
    if p.q:
        sentences.append(cap(r.choice(("Imaging requested to evaluate for {q}", "Please evaluate for {q}", "{q}",
                                       "Concern for {q}")).replace("{q}", p.q_raw or _bare(p.q))))
    note = _he(". ".join(s.rstrip(".") for s in sentences if s) + ".", sex)
    return [], [note]


TEMPLATES = {
    "train": (("minimal", short_reason, 2.0), ("neuro-hpi", narrative, 1.2)),
    "test": (("minimal", short_reason, 2.0), ("neuro-hpi", narrative, 1.2)),
}
