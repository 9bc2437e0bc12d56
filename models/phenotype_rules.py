"""Findings that case reports state as numbers rather than words: "height 192 cm (+3.1 SD)", "head
circumference below the 3rd centile", "IQ of 55", "platelet count of 62 x 10^9/L", "creatine kinase
18,000 U/L", "sweat chloride 98 mmol/L" -> HPO terms, with the character span of the statement.

Thresholds are the usual clinical ones (two standard deviations, the 3rd/97th centile, IQ bands,
adult reference limits for the laboratory values). Only explicit numbers count; a statement the text
negates or places in a relative gets its status from the scopes in :mod:`models.phenotypes`.
"""

from __future__ import annotations

import re

SHORT, TALL = "HP:0004322", "HP:0000098"
MICRO, MACRO = "HP:0000252", "HP:0000256"
LOW_WEIGHT, OBESITY = "HP:0004325", "HP:0001513"
_MEASURE = {"height": (SHORT, TALL), "length": (SHORT, TALL), "stature": (SHORT, TALL),
            "head circumference": (MICRO, MACRO), "ofc": (MICRO, MACRO), "occipitofrontal circumference": (MICRO, MACRO),
            "occipito-frontal circumference": (MICRO, MACRO), "hc": (MICRO, MACRO), "weight": (LOW_WEIGHT, None),
            "bmi": (None, OBESITY), "body mass index": (None, OBESITY)}
_NAMES = "|".join(sorted((re.escape(k) for k in _MEASURE), key=len, reverse=True))
_NUM = r"(\d+(?:[.,]\d+)*)"
# "height was 192 cm (+3.1 SD)", "OFC -2.2 SDS", "head circumference at +2.5 SD"
_SD = re.compile(rf"\b({_NAMES})\b[^.;:]{{0,60}}?([+\-\u2212\u2013]\s?\d+(?:[.,]\d+)?)\s?(?:SDS?|s\.d\.|z|standard deviations?)\b",
                 re.IGNORECASE)
# "head circumference below the 3rd centile", "height < 1st percentile", "weight >97th centile"
_CENTILE = re.compile(rf"\b({_NAMES})\b[^.;:]{{0,60}}?\b(below|under|less than|<|above|over|greater than|>)\s*(?:the\s+)?"
                      r"(\d{1,2}(?:\.\d+)?)(?:st|nd|rd|th)?\s*(?:centile|percentile|%ile)", re.IGNORECASE)
_IQ = re.compile(r"\b(?:full[- ]scale\s+)?(?:IQ|intelligence quotient|FSIQ|DQ|developmental quotient)\b(?:\s*(?:score|was|of|=|:|at))*\s*"
                 r"(?:of\s+)?(\d{2,3})\b", re.IGNORECASE)
_LABS = (  # (pattern before the number, unit pattern, test(value in that unit) -> HPO id or None)
    (r"platelets?(?: count)?", r"(?:\s?(?:x|\u00d7)\s?10\^?9\s?/\s?l|\s?/\s?(?:\u00b5l|ul|mm3))?",
     lambda v: "HP:0001873" if v < 150 or 1000 <= v < 150_000 else None),
    (r"(?:hemoglobin|haemoglobin|hb)", r"\s?(g/dl|g/l)",
     lambda v: "HP:0001903" if (v < 11 if v < 30 else v < 110) else None),
    (r"(?:creatine kinase|creatine phosphokinase|ck|cpk)(?: level)?", r"\s?(?:u|iu)/l",
     lambda v: "HP:0003236" if v > 400 else None),
    (r"sweat chloride(?: concentration| level| test)?", r"\s?mmol/l", lambda v: "HP:0012236" if v >= 60 else None),
)
_LAB_RES = [(re.compile(rf"\b{name}\b(?:\s*(?:was|were|of|at|=|:|level|count|concentration|value|elevated|raised|"
                        rf"increased|markedly|reduced|decreased|to|high|low))*\s*{_NUM}{unit}", re.IGNORECASE), test)
            for name, unit, test in _LABS]


_LAB_WORDS = (("platelet",), ("hemoglobin", "haemoglobin", "hb"), ("creatine", "ck", "cpk"), ("sweat",))
_ANY_NUMBER = re.compile(r"\d")


def _value(s: str) -> float:
    s = s.replace("\u2212", "-").replace("\u2013", "-").replace(" ", "")
    if re.fullmatch(r"\d{1,3}(,\d{3})+", s):
        s = s.replace(",", "")
    return float(s.replace(",", "."))


def _iq_term(v: float) -> str | None:
    if v < 20:
        return "HP:0002187"
    if v < 35:
        return "HP:0010864"
    if v < 50:
        return "HP:0002342"
    if v < 70:
        return "HP:0001256"
    if v < 85:
        return "HP:0006889"
    return None


def measurement_findings(text: str) -> list[tuple[str, int, int]]:
    """``(HPO id, start, end)`` for each out-of-range measurement the text states."""
    out: list[tuple[str, int, int]] = []
    if not _ANY_NUMBER.search(text):
        return out
    lower = text.lower()
    sd, centile = "sd" in lower or "standard deviation" in lower, "centile" in lower or "%ile" in lower
    for m in _SD.finditer(text) if sd else ():
        low, high = _MEASURE[m.group(1).lower()]
        v = _value(m.group(2))
        term = low if v <= -2 else high if v >= 2 else None
        if term:
            out.append((term, m.start(), m.end()))
    for m in _CENTILE.finditer(text) if centile else ():
        low, high = _MEASURE[m.group(1).lower()]
        below = m.group(2).lower() in ("below", "under", "less than", "<")
        v = float(m.group(3))
        term = low if below and v <= 3 else high if not below and v >= 97 else None
        if term:
            out.append((term, m.start(), m.end()))
    for m in _IQ.finditer(text) if ("iq" in lower or "quotient" in lower) else ():
        term = _iq_term(float(m.group(1)))
        if term:
            out.append((term, m.start(), m.end()))
    for (pattern, test), words in zip(_LAB_RES, _LAB_WORDS, strict=True):
        if not any(w in lower for w in words):
            continue
        for m in pattern.finditer(text):
            try:
                term = test(_value(m.group(1)))
            except ValueError:
                continue
            if term:
                out.append((term, m.start(), m.end()))
    return out
