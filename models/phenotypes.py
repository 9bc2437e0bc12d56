"""Phenotype concept recognition: clinical free text -> HPO terms, each present, excluded, in a relative,
or uncertain, with character spans. Pure Python over a compiled lexicon (no ontology library, no torch).

How a text is read
1. Tokens are normalised the same way the lexicon was (:func:`normalise_token`): case, US spelling,
   plurals, adjective/noun forms ("hypoplastic" = "hypoplasia", "sclerotic" = "sclerosis"),
   hyphens; filler words ("of", "the", ...) are dropped from keys, and a key is the *sorted*
   tokens, so word order inside a span does not matter ("hypoplasia of the corpus callosum" =
   "corpus callosum hypoplasia").
2. Longest match first inside a chunk (punctuation, "and", "or", "with" and the like end a chunk).
3. Each mention gets a status from the scope it falls in, NegEx style: ``excluded`` after "no",
   "without", "denies", "negative for", "absence of", ... or before "was normal", "were absent",
   "was not observed"; ``family`` in a clause about a relative; ``uncertain`` in a clause that
   suspects or rules out ("r/o", "differential diagnosis", "evaluate for"). A scope ends at a
   sentence end, ";", "|" or a turn word ("but", "however", "although", "except" ...).
Only ``present`` and ``excluded`` terms describe the patient; the other two are kept for
explanations but never ranked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from models.phenotype_rules import measurement_findings

PRESENT, EXCLUDED, FAMILY, UNCERTAIN = "present", "excluded", "family", "uncertain"

STOPWORDS = frozenset(
    ["of", "the", "a", "an", "in", "on", "at", "to", "for", "by", "from", "is", "are", "was", "were", "be", "been", "being", "his", "her", "their", "its", "this", "that", "these", "those", "has", "have", "had", "there", "also", "noted", "found", "showed", "shows", "revealed", "reveals", "some"]
)
# words that end a matching chunk (a term never spans them)
CHUNK_BREAKS = frozenset(["with", "nor", "but", "plus", "including", "include", "includes", "included", "as", "well"])
_WORD = re.compile(r"(?i:\br/o\b)|[A-Za-z0-9]+(?:'[A-Za-z]+)?|[.;:!?|()\[\],/]")
_SENTENCE_END = frozenset(".;:!?|")
TURN_WORDS = frozenset(["but", "however", "although", "though", "except", "whereas", "while", "yet", "apart", "aside", "besides"])

_SPELLING = [(re.compile(p), r) for p, r in (
    (r"^oes", "es"), (r"^oe", "e"), (r"ae", "e"), (r"([a-z]{3})our$", r"\1or"), (r"isation$", "ization"),
    (r"ise$", "ize"), (r"yse$", "yze"), (r"^centre$", "center"), (r"([a-z]{3})tre$", r"\1ter"),
)]
_FORMS = [(re.compile(p), r) for p, r in (
    (r"plastic$", "plasia"), (r"trophic$", "trophy"), (r"otic$", "osis"), (r"ities$", "ity"),
    (r"bile$", "bility"), (r"iness$", "y"), (r"ies$", "y"), (r"([^s])sses$", r"\1ss"), (r"(ch|sh|x|z)es$", r"\1"), (r"([^siu])s$", r"\1"),
)]
_ENDINGS = ("ia", "ic", "y", "al")
_CANON = {
    "abnormality": "abnormal", "abnormalities": "abnormal", "anomaly": "abnormal", "anomalies": "abnormal",
    "anomalous": "abnormal", "obese": "obesity", "enlarged": "enlargement", "dilated": "dilatation",
    "dilation": "dilatation", "feet": "foot", "teeth": "tooth", "children": "child", "men": "man",
    "women": "woman", "fingernail": "nail", "toenail": "nail", "seizure": "seizure", "fit": "seizure",
    "convulsion": "seizure", "convulsions": "seizure", "palsy": "palsy", "increased": "increase",
    "decreased": "decrease", "reduced": "decrease", "reduction": "decrease",
    "lowset": "decrease set", "malformed": "malformation", "thickened": "thick", "thickening": "thick",
    "delayed": "delay", "impaired": "impairment",
    # laboratory and size wording: "serum calcium was elevated" = "increased calcium", "large tongue" =
    # "enlarged tongue", "short PR interval" = "shortened PR interval" (the lexicon is keyed the same way)
    "elevated": "increase", "elevation": "increase", "raised": "increase", "rising": "increase",
    "low": "decrease", "diminished": "decrease", "large": "enlargement", "big": "enlargement",
    "shortened": "short", "disturbed": "disturbance", "hyperlax": "laxity", "lax": "laxity",
}


@lru_cache(maxsize=1 << 16)
def normalise_token(token: str) -> str:
    t = token.lower()
    if t.endswith("'s"):  # "father's", "Gowers's"
        t = t[:-2]
    if t in _CANON:
        return _CANON[t]
    if len(t) <= 3 or t.isdigit():
        return t
    for pattern, repl in _SPELLING:
        t = pattern.sub(repl, t)
    for pattern, repl in _FORMS:
        new = pattern.sub(repl, t)
        if new != t:
            t = new
            break
    t = _CANON.get(t, t)
    for _ in range(2):  # "stereotypical" -> "stereotypic" -> "stereotyp" = "stereotypic"
        for end in _ENDINGS:
            if t.endswith(end) and len(t) - len(end) >= 4:
                t = t[: -len(end)]
                break
        else:
            break
    return t


# grading and distribution words that may sit inside a finding ("severe bilateral sensorineural hearing loss")
MODIFIERS = frozenset(normalise_token(w) for w in (
    "mild", "mildly", "moderate", "moderately", "severe", "severely", "profound", "marked", "markedly", "significant",
    "bilateral", "bilaterally", "unilateral", "left", "right", "progressive", "slight", "slightly", "generalized",
    "diffuse", "prominent", "striking", "obvious", "relative", "congenital", "persistent", "recurrent", "multiple",
    "symmetric", "symmetrical", "asymmetric", "very", "extremely",
    "serum", "plasma", "circulating", "level", "levels", "concentration", "concentrations",
))


def tokens(text: str) -> list[tuple[str, int, int]]:
    """``(normalised token or punctuation, start, end)``; hyphens split words."""
    out = []
    for m in _WORD.finditer(text):
        raw = m.group(0)
        norm = normalise_token(raw) if raw[0].isalnum() else raw
        if " " in norm:  # a canonical form of two words ("lowset" -> "low set")
            for part in norm.split():
                out.append((part, m.start(), m.end()))
        else:
            out.append((norm, m.start(), m.end()))
    return out


def lexicon_key(phrase: str) -> str:
    """The lookup key of a phrase: its sorted content tokens (the lexicon builder uses this too)."""
    toks = [t for t, _, _ in tokens(phrase) if t[0].isalnum() and t not in STOPWORDS]
    return " ".join(sorted(toks))


# --------------------------------------------------------------------------- scopes

def _phrases(*items: str) -> list[tuple[str, ...]]:
    return [tuple(normalise_token(w) for w in item.split()) for item in items]


NEGATION_BEFORE = _phrases(
    "no", "not", "without", "denies", "denied", "deny", "negative for", "absence of", "free of", "never", "nor",
    "neither", "lack of", "lacks", "lacked", "lacking", "no evidence of", "no sign of", "no signs of",
    "did not have", "does not have", "did not show", "did not reveal", "did not exhibit", "ruled out",
    "rules out", "excluded", "none",
)
NEGATION_AFTER = _phrases(
    "was normal", "were normal", "is normal", "are normal", "was absent", "were absent", "is absent",
    "are absent", "was not observed", "were not observed", "was not seen", "were not seen", "was not present",
    "were not present", "was not detected", "were not detected", "not observed", "not seen", "not present",
    "not detected", "was excluded", "were excluded", "was ruled out", "were ruled out", "was unremarkable",
    "were unremarkable", "not found", "was not noted", "were not noted", "not noted",
)
PSEUDO_NEGATION = _phrases("no further", "not only", "no change", "no longer", "not certain", "no significant change")
FAMILY_WORDS = frozenset(normalise_token(w) for w in (
    "mother", "father", "brother", "brothers", "sister", "sisters", "sibling", "siblings", "sib", "sibs",
    "maternal", "paternal", "cousin", "cousins", "uncle", "aunt", "grandmother", "grandfather", "grandparent",
    "parents", "relative", "relatives", "niece", "nephew", "twin", "mom", "dad", "familial",
))
FAMILY_PHRASES = _phrases("family history", "fhx", "fh")
UNCERTAIN_PHRASES = _phrases(
    "rule out", "r/o", "to exclude", "suspected", "suspect", "suspicion", "suspicious for", "possible",
    "possibly", "probable", "concern for", "concerning for", "evaluate for", "evaluation for", "assess for",
    "assessment for", "screen for", "screening for", "differential", "ddx", "versus", "vs", "query", "risk of",
    "at risk", "cannot be excluded", "can not be excluded", "could not be excluded", "likely", "unlikely",
    "question of", "search for", "look for", "exclude",
)


def _by_first_word(phrases: list[tuple[str, ...]]) -> dict[str, list[tuple[str, ...]]]:
    index: dict[str, list[tuple[str, ...]]] = {}
    for p in sorted(phrases, key=len, reverse=True):
        index.setdefault(p[0], []).append(p)
    return index


def _match_at(toks: list[str], i: int, phrases: dict[str, list[tuple[str, ...]]]) -> int:
    """Length of the longest phrase starting at ``toks[i]`` (0 if none)."""
    for p in phrases.get(toks[i], ()):
        if tuple(toks[i : i + len(p)]) == p:
            return len(p)
    return 0


# The phrase lists indexed by their first word, for _match_at.
NEGATION_BEFORE_AT, NEGATION_AFTER_AT, PSEUDO_NEGATION_AT, FAMILY_PHRASES_AT, UNCERTAIN_PHRASES_AT = (
    _by_first_word(p) for p in (NEGATION_BEFORE, NEGATION_AFTER, PSEUDO_NEGATION, FAMILY_PHRASES, UNCERTAIN_PHRASES))


@dataclass(frozen=True)
class Mention:
    code: str
    label: str
    status: str
    start: int
    end: int
    term: int  # index into the term table

    def to_json(self) -> dict:
        return {"code": self.code, "label": self.label, "status": self.status, "span": [self.start, self.end]}


class PhenotypeRecognizer:
    """``PhenotypeRecognizer.load(folder)`` then ``recognise(text) -> [Mention]``."""

    def __init__(self, ids: list[str], labels: list[str], entries: dict[str, int], max_len: int,
                 phenotypic: list[bool] | None = None):
        self.ids, self.labels, self.entries, self.max_len = ids, labels, entries, max(1, int(max_len))
        self.vocabulary = frozenset(t for key in entries for t in key.split())
        self.phenotypic = phenotypic
        self.index = {h: i for i, h in enumerate(ids)}

    @classmethod
    def load(cls, folder: str | Path, phenotypic=None) -> PhenotypeRecognizer:
        folder = Path(folder)
        terms = json.loads((folder / "hpo_terms.json").read_text(encoding="utf-8"))
        lex = json.loads((folder / "lexicon.json").read_text(encoding="utf-8"))
        return cls(terms["ids"], terms["labels"], lex["entries"], lex["max_len"], phenotypic)

    # -- matching ----------------------------------------------------------------------------
    def _chunk_matches(self, chunk: list[tuple[str, int, int]]) -> list[tuple[int, int, int]]:
        """(term, first token, last token + 1) inside a chunk of content tokens, longest first."""
        out, i, n = [], 0, len(chunk)
        while i < n:
            if chunk[i][0] not in self.vocabulary:
                i += 1
                continue
            hit = None
            run = 1  # a key can only span words the lexicon (or the grading words) knows
            while i + run < n and run < self.max_len + 2 and (
                    chunk[i + run][0] in self.vocabulary or chunk[i + run][0] in MODIFIERS):
                run += 1
            for length in range(run, 0, -1):
                words = [w for w, _, _ in chunk[i : i + length]]
                if words[-1] not in self.vocabulary:
                    continue
                term = self.entries.get(" ".join(sorted(words))) if length <= self.max_len else None
                if term is None and length > 1:
                    # "severe progressive scoliosis", "bilateral hypoplastic kidneys": a term with its
                    # grading words left out, when the lexicon has no term that includes them
                    core = [w for w in words[1:-1] if w not in MODIFIERS]
                    if len(core) < length - 2:
                        term = self.entries.get(" ".join(sorted([words[0], *core, words[-1]])))
                    if term is None and words[0] in MODIFIERS and length > 1:
                        term = self.entries.get(" ".join(sorted(w for w in words if w not in MODIFIERS)))
                if term is not None:
                    hit = (term, i, i + length)
                    break
            if hit:
                out.append(hit)
                i = hit[2]
            else:
                i += 1
        return out + self._coordinated(chunk, out)

    def _key(self, words) -> int | None:
        return self.entries.get(" ".join(sorted(words)))

    def _coordinated(self, chunk: list[tuple[str, int, int]], found: list[tuple[int, int, int]]):
        """Terms that share words with a match: "short and broad thumbs" (the word before "and"/"or"
        takes the head after it), "small hands and feet" (the word after it takes the modifiers before),
        "long smooth philtrum" (stacked adjectives: each with the head)."""
        extra, taken = [], {k for _, a, b in found for k in range(a, b)}
        words = [w for w, _, _ in chunk]
        for _, a, b in found:
            if b - a < 2:
                continue
            if a >= 2 and words[a - 1] in ("and", "or") and (a - 2) not in taken:
                term = self._key([words[a - 2], *words[a + 1 : b]])
                if term is not None:
                    extra.append((term, a - 2, b))
            if b + 1 < len(words) and words[b] in ("and", "or") and (b + 1) not in taken:
                term = self._key([*words[a : b - 1], words[b + 1]])
                if term is not None:
                    extra.append((term, a, b + 2))
            for k in (a - 1, a - 2):  # "long curly eyelashes", "long smooth philtrum"
                if k < 0 or k in taken or words[k] in ("and", "or"):
                    break
                term = self._key([words[k], *words[a + 1 : b]])
                if term is not None:
                    extra.append((term, k, b))
        return extra

    def recognise(self, text: str) -> list[Mention]:
        toks = tokens(text)
        words = [t for t, _, _ in toks]
        status = [PRESENT] * len(toks)
        cues, after = self._apply_scopes(words, status)
        _query_marks(text, toks, status)
        mentions: list[Mention] = []
        chunks: list[tuple[list[tuple[str, int, int]], list[int]]] = []
        chunk: list[tuple[str, int, int]] = []
        chunk_pos: list[int] = []

        def add(term: int, first: int, last: int) -> None:
            span = status[first : last + 1]
            if any(k in cues for k in range(first, last + 1)):  # "reflexes were absent": the cue is in the term
                span = [PRESENT if first + i in after else st for i, st in enumerate(span)]
            if self.phenotypic is None or self.phenotypic[term]:
                mentions.append(Mention(self.ids[term], self.labels[term], _combine(span), toks[first][1],
                                        toks[last][2], term))

        def flush():
            if chunk:
                chunks.append((list(chunk), list(chunk_pos)))
            chunk.clear()
            chunk_pos.clear()

        for pos, (w, s, e) in enumerate(toks):
            if not w[0].isalnum() or w in CHUNK_BREAKS:
                flush()
            elif w not in STOPWORDS:
                chunk.append((w, s, e))
                chunk_pos.append(pos)
        flush()
        found = [self._chunk_matches(c) for c, _ in chunks]
        for (c, where), matches in zip(chunks, found, strict=True):
            for term, a, b in matches:
                add(term, where[a], where[b - 1])
        for i, (c, where) in enumerate(chunks):  # "soft, velvety, hyperextensible skin"
            if len(c) > 2 or found[i] or where[-1] + 1 >= len(words) or words[where[-1] + 1] != ",":
                continue
            j = i + 1
            while j < len(chunks) and not found[j] and len(chunks[j][0]) <= 2 and chunks[j][1][0] == chunks[j - 1][1][-1] + 2:
                j += 1
            if j >= len(chunks) or chunks[j][1][0] != chunks[j - 1][1][-1] + 2:
                continue
            heads = [(a, b) for _, a, b in found[j] if a == 0 and b >= 2]
            if heads:
                a, b = heads[0]
                shared = self._key([w for w, _, _ in c] + [w for w, _, _ in chunks[j][0][a + 1 : b]])
                if shared is not None:
                    add(shared, where[0], where[-1])
        for hid, start, end in measurement_findings(text):
            measured = self.index.get(hid)
            inside = [k for k, (_, s, e) in enumerate(toks) if s >= start and e <= end]
            if measured is not None and inside:
                add(measured, inside[0], inside[-1])
        return mentions

    # -- scopes ------------------------------------------------------------------------------
    @staticmethod
    def _apply_scopes(words: list[str], status: list[str]) -> tuple[set[int], set[int]]:
        """Sets ``status`` in place; returns (positions of "was absent"-style cues, positions they negate)."""
        n = len(words)
        cues: set[int] = set()
        after: set[int] = set()
        # clauses: between sentence ends / turn words
        bounds, start = [], 0
        for i, w in enumerate(words):
            if w in _SENTENCE_END or w in TURN_WORDS:
                bounds.append((start, i))
                start = i + 1
        bounds.append((start, n))
        for a, b in bounds:
            clause = words[a:b]
            family = any(w in FAMILY_WORDS for w in clause) or any(
                _match_at(clause, j, FAMILY_PHRASES_AT) for j in range(len(clause)))
            if family:
                for k in range(a, b):
                    status[k] = FAMILY
                continue
            j = 0
            while j < len(clause):
                if _match_at(clause, j, PSEUDO_NEGATION_AT):
                    j += 2
                    continue
                m = _match_at(clause, j, UNCERTAIN_PHRASES_AT)
                if m:
                    for k in range(a + j + m, b):
                        status[k] = UNCERTAIN
                    j += m
                    continue
                m = _match_at(clause, j, NEGATION_BEFORE_AT)
                if m:
                    for k in range(a + j + m, b):
                        if status[k] == PRESENT:
                            status[k] = EXCLUDED
                    j += m
                    continue
                m = _match_at(clause, j, NEGATION_AFTER_AT)
                if m:
                    for k in range(a, a + j):
                        if status[k] == PRESENT:
                            status[k] = EXCLUDED
                            after.add(k)
                    cues.update(range(a + j, a + j + m))
                    j += m
                    continue
                j += 1
        return cues, after


def _query_marks(text: str, toks: list[tuple[str, int, int]], status: list[str]) -> None:
    """An order's "? fracture" / "?PE": a question mark that opens a lower-case or attached phrase
    suspects it (up to the next sentence end); one that ends a question does not."""
    for i, (w, _, end) in enumerate(toks):
        if w != "?" or i + 1 >= len(toks):
            continue
        follow = text[end : toks[i + 1][1] + 1]
        if follow.strip() and (follow[-1].islower() or not follow[:-1]):
            for k in range(i + 1, len(toks)):
                if toks[k][0] in _SENTENCE_END or toks[k][0] == ",":
                    break
                status[k] = UNCERTAIN


def _combine(statuses: list[str]) -> str:
    for s in (FAMILY, UNCERTAIN, EXCLUDED):
        if s in statuses:
            return s
    return PRESENT


def patient_terms(mentions: list[Mention]) -> tuple[list[int], list[int]]:
    """(present, excluded) term indices, distinct, in text order; a term both stated and denied is present."""
    present, excluded = [], []
    for m in mentions:
        if m.status == PRESENT and m.term not in present:
            present.append(m.term)
    for m in mentions:
        if m.status == EXCLUDED and m.term not in excluded and m.term not in present:
            excluded.append(m.term)
    return present, excluded
