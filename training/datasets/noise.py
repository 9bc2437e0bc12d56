"""Surface noise of real clinical free text: abbreviations, typos, casing, punctuation."""

from __future__ import annotations

import random
import re

# full phrase -> abbreviations clinicians write (matched case-insensitively on word boundaries)
ABBREVIATIONS: dict[str, tuple[str, ...]] = {
    "history of": ("h/o", "hx of", "hx"),
    "rule out": ("r/o", "ro"),
    "status post": ("s/p",),
    "complains of": ("c/o",),
    "complaining of": ("c/o",),
    "shortness of breath": ("SOB",),
    "right lower quadrant": ("RLQ",),
    "right upper quadrant": ("RUQ",),
    "left lower quadrant": ("LLQ",),
    "left upper quadrant": ("LUQ",),
    "with": ("w/",),
    "without": ("w/o",),
    "patient": ("pt",),
    "type 2 diabetes": ("DM2", "T2DM", "DMII"),
    "diabetes mellitus": ("DM",),
    "hypertension": ("HTN",),
    "hyperlipidemia": ("HLD",),
    "chronic kidney disease": ("CKD",),
    "end-stage renal disease": ("ESRD",),
    "coronary artery disease": ("CAD",),
    "atrial fibrillation": ("afib", "AF", "A-fib"),
    "congestive heart failure": ("CHF",),
    "heart failure": ("HF",),
    "chronic obstructive pulmonary disease": ("COPD",),
    "emergency department": ("ED",),
    "motor vehicle collision": ("MVC",),
    "motor vehicle accident": ("MVA",),
    "loss of consciousness": ("LOC",),
    "white blood cell count": ("WBC",),
    "follow-up": ("f/u", "FU"),
    "follow up": ("f/u",),
    "fracture": ("fx",),
    "evaluation": ("eval",),
    "evaluate": ("eval",),
    "bilateral": ("bilat", "b/l"),
    "pulmonary embolism": ("PE",),
    "deep vein thrombosis": ("DVT",),
    "transient ischemic attack": ("TIA",),
    "multiple sclerosis": ("MS",),
    "hepatocellular carcinoma": ("HCC",),
    "nausea and vomiting": ("N/V", "n/v"),
    "nausea/vomiting": ("N/V",),
    "weeks": ("wks", "wk"),
    "secondary to": ("2/2",),
    "negative": ("neg",),
    "positive": ("pos", "+"),
    "tenderness": ("TTP",),
    "tender to palpation": ("TTP",),
    "abdominal": ("abd",),
    "abdomen": ("abd",),
    "chest pain": ("CP",),
    "blood pressure": ("BP",),
    "heart rate": ("HR",),
    "urinary tract infection": ("UTI",),
    "gastroesophageal reflux disease": ("GERD",),
    "obstructive sleep apnea": ("OSA",),
    "last menstrual period": ("LMP",),
    "range of motion": ("ROM",),
    "lower extremity": ("LE",),
    "upper extremity": ("UE",),
    "metastases": ("mets",),
    "metastatic": ("met",),
    "pregnant": ("preg",),
    "approximately": ("approx", "~"),
    "month": ("mo",),
    "months": ("mos", "mo"),
    "years old": ("yo", "y/o", "yrs old"),
    "no known drug allergies": ("NKDA",),
    "cerebrovascular accident": ("CVA",),
    "magnetic resonance": ("MR",),
    "ultrasound": ("US", "u/s"),
    "physical therapy": ("PT",),
    "questionable": ("?",),
}

_ABBR_RE = re.compile(
    r"(?<![\w/])(" + "|".join(re.escape(k) for k in sorted(ABBREVIATIONS, key=len, reverse=True)) + r")(?![\w/])",
    re.IGNORECASE,
)

_KEYBOARD_NEIGHBOURS = {
    "a": "sqwz", "b": "vghn", "c": "xdfv", "d": "serfcx", "e": "wsdr", "f": "drtgvc", "g": "ftyhbv",
    "h": "gyujnb", "i": "ujko", "j": "huikmn", "k": "jiolm", "l": "kop", "m": "njk", "n": "bhjm",
    "o": "iklp", "p": "ol", "q": "wa", "r": "edft", "s": "awedxz", "t": "rfgy", "u": "yhji",
    "v": "cfgb", "w": "qase", "x": "zsdc", "y": "tghu", "z": "asx",
}


def abbreviate(text: str, rng: random.Random, p: float) -> str:
    """Replace known phrases by a clinician abbreviation, each occurrence with probability ``p``."""
    if p <= 0:
        return text

    def sub(m: re.Match) -> str:
        if rng.random() >= p:
            return m.group(0)
        return rng.choice(ABBREVIATIONS[m.group(0).lower()])

    return _ABBR_RE.sub(sub, text)


def typo(word: str, rng: random.Random) -> str:
    """One keyboard-style error: drop, swap, double or neighbouring key."""
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    kind = rng.random()
    if kind < 0.35:
        return word[:i] + word[i + 1 :]
    if kind < 0.65:
        return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    if kind < 0.8:
        return word[:i] + word[i] + word[i:]
    ch = word[i].lower()
    if ch in _KEYBOARD_NEIGHBOURS:
        rep = rng.choice(_KEYBOARD_NEIGHBOURS[ch])
        return word[:i] + (rep.upper() if word[i].isupper() else rep) + word[i + 1 :]
    return word


_WORD_RE = re.compile(r"[A-Za-z]{4,}")


def add_typos(text: str, rng: random.Random, rate: float) -> str:
    """Misspell each alphabetic word of 4+ letters with probability ``rate``."""
    if rate <= 0:
        return text
    return _WORD_RE.sub(lambda m: typo(m.group(0), rng) if rng.random() < rate else m.group(0), text)


def surface(text: str, rng: random.Random, *, abbrev_p: float = 0.3, typo_rate: float = 0.015,
            caps_p: float = 0.03, lower_p: float = 0.08, strip_punct_p: float = 0.05) -> str:
    """Abbreviations, typos, then occasional ALL-CAPS / all-lower-case / no-punctuation styles."""
    text = abbreviate(text, rng, abbrev_p)
    text = add_typos(text, rng, typo_rate)
    r = rng.random()
    if r < caps_p:
        text = text.upper()
    elif r < caps_p + lower_p:
        text = text.lower()
    if rng.random() < strip_punct_p:
        text = re.sub(r"[.;]\s*", " ", text).strip()
    return re.sub(r"\s{2,}", " ", text).strip()


def join_list(items: list[str], rng: random.Random, conj: str = "and") -> str:
    """'a, b and c' / 'a, b, c' / 'a; b; c' styles."""
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    style = rng.random()
    if style < 0.6:
        return ", ".join(items[:-1]) + f" {conj} " + items[-1]
    if style < 0.85:
        return ", ".join(items)
    return "; ".join(items)


def cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s
