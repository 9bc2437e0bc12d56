"""Patient details of generated imaging orders: lab values and durations filled into the
knowledge table's phrases (``{o2}``, ``{dur}``), demographic phrasings per split pool, and which
sex- or age-specific phrases fit a patient."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from . import protocol_kb as kb


def _f1(lo: float, hi: float) -> Callable[[random.Random], str]:
    return lambda r: f"{r.uniform(lo, hi):.1f}"


def _i(lo: int, hi: int) -> Callable[[random.Random], str]:
    return lambda r: str(r.randint(lo, hi))


FILLERS: dict[str, Callable[[random.Random], str]] = {
    "o2": _i(84, 93), "temp": _f1(38.1, 39.8), "wbc_hi": _f1(11.5, 22.0), "bnp": lambda r: str(r.randrange(450, 3500, 10)),
    "ddimer": lambda r: f"{r.uniform(0.6, 5.0):.2f}", "hr": _i(101, 135),
    "wells": lambda r: r.choice(["4.5", "5", "6", "6.5", "7.5"]), "cr_hi": _f1(2.1, 7.5), "egfr_lo": _i(6, 28),
    "cr_ok": _f1(0.6, 1.1), "egfr_ok": _i(65, 115), "wk": _i(6, 38), "mm": _i(4, 14), "mon": _i(1, 12),
    "yr": _i(2019, 2024), "afp": _i(25, 900), "psa": _f1(4.5, 45.0), "lipase": _i(400, 4000), "bili": _f1(2.5, 12.0),
    "alp": _i(180, 900), "prl": _i(60, 400), "nihss": _i(4, 22), "lkw": lambda r: r.choice(["30", "45", "60", "90", "120"]),
    "hcg": _i(800, 6000), "surgery": lambda r: r.choice(kb.SURGERIES), "inr": _f1(2.0, 4.2), "sbp": _i(150, 210),
    "crp": _i(20, 180), "lactate": _f1(2.2, 6.0), "moca": _i(12, 24), "alt": _i(80, 400),
}

DURATIONS = {
    "train": ("x2 days", "x 3d", "for 2 days", "since yesterday", "x1 wk", "for several hours", "since this AM",
              "x 4 days", "for 1 week", "x 6 hrs", "x2 weeks"),
    "test": ("for the past 48 hours", "over the last week", "that began last night", "of 5 days duration",
             "ongoing for about 10 days", "starting 3 days ago", "for a fortnight"),
}


_SEX_WORDS = {
    # style key -> (male, female)
    "MF": ("M", "F"), "male": ("male", "female"), "man": ("man", "woman"), "boy": ("boy", "girl"),
    "gent": ("gentleman", "lady"), "sexword": ("male", "female"), "child": ("son", "daughter"),
}
DEMOGRAPHICS = {
    "train": {
        "adult": ("{a} yo {MF}", "{a}{MF}", "{a} y/o {male}", "{a}-year-old {man}", "{a} yo {male}", "pt is {a} yo {MF}",
                  "{a} year old {man}", "{a}yo {MF}"),
        "child": ("{a} yo {boy}", "{a}-year-old {boy}", "{a}yo {MF}", "{a} y/o {boy}"),
        "infant": ("{m} mo old {boy}", "{m}-month-old {boy}", "{m} mo {MF}"),
    },
    "test": {
        "adult": ("{a} year old {gent}", "{sexword} aged {a}", "{a}yr {MF}", "{MF}/{a}", "{a}-yr-old {sexword} pt",
                  "age {a}, {sexword}"),
        "child": ("{a}y {boy}", "{a} yr old {boy}", "{MF}/{a}y", "{sexword} child aged {a}"),
        "infant": ("{m} month old baby {boy}", "infant ({m} months, {sexword})", "{m}mo {sexword} infant"),
    },
}


_FEMALE_ONLY = re.compile(r"postpartum|\bocps?\b|pregnan|menses|menstru|ovar|uter|hysterect|endometri|cervical ca", re.IGNORECASE)
_CHILDBEARING = re.compile(r"postpartum|\bocps?\b", re.IGNORECASE)
_MALE_ONLY = re.compile(r"prostat|\bpsa\b|testic|\bbph\b|scrot", re.IGNORECASE)


def fits(phrase: str, sex: str, age: int) -> bool:
    """Sex- and age-specific phrasings only for patients they fit."""
    if sex == "M" and _FEMALE_ONLY.search(phrase):
        return False
    if sex == "F" and _MALE_ONLY.search(phrase):
        return False
    return not (_CHILDBEARING.search(phrase) and not 15 <= age <= 50)


def fill(text: str, rng: random.Random, pool: str) -> str:
    """``text`` with its ``{dur}`` and value placeholders filled in (durations from ``pool``)."""
    if "{" not in text:
        return text
    out = text
    for key in ("dur",):
        while "{dur}" in out:
            out = out.replace("{dur}", rng.choice(DURATIONS[pool]), 1)
    for key, fn in FILLERS.items():
        token = "{" + key + "}"
        while token in out:
            out = out.replace(token, fn(rng), 1)
    return out


def demographics(rng: random.Random, age: int, sex: str, pool: str, months: int | None = None) -> str:
    """``"54 yo M"``, ``"infant (8 months, female)"``: the patient in one of ``pool``'s phrasings."""
    kind = "infant" if months is not None else ("child" if age < 16 else "adult")
    template = rng.choice(DEMOGRAPHICS[pool][kind])
    male = sex == "M"
    out = template.replace("{a}", str(age)).replace("{m}", str(months if months is not None else 0))
    for key, (m, f) in _SEX_WORDS.items():
        out = out.replace("{" + key + "}", m if male else f)
    return out
