"""Generated rare-disease case descriptions (prose, as case reports read) and ordinary orders.

A case of disease d: a patient is sampled feature by feature with the annotated frequencies; 3-20
features are named (fewer when the disease has fewer annotations), 30 % of them by a less specific
ancestor term, 20 % by a more specific child or a sibling term (real descriptions rarely use the
curators' granularity); a disease with fewer than 3 annotations gets children or siblings of them up to 3
findings; the findings its name states are named in 75 % of cases; 0-3 findings unrelated to the disease
are added; 0-3 absent features are stated as negations (the disease's NOT annotations first, else features the disease lacks); a
relative's findings may be mentioned (they must not count). Every feature is named by its HPO label,
a synonym from ``phrasings`` (for evaluation: synonyms the lexicon never saw) or a paraphrase of the
label ("hypoplastic corpus callosum", "abnormal liver"), inside sentences of several case-report
styles. The disease's annotation list is never copied: it is sampled, generalised, shuffled, diluted.

Ordinary orders (the specificity gate's negatives): the protocol generator's imaging indications and
ordinary clinical notes (Synthea, vendored in ``training/data/ordinary/``).
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.datasets.common import Split

ORDINARY_NOTES = Path(__file__).resolve().parent.parent / "data" / "ordinary" / "synthea_notes.jsonl.gz"


@dataclass
class GeneratedCase:
    disease: int
    text: str
    present: list[int]  # terms the text names as present (gold for concept recognition)
    excluded: list[int]
    noise: list[int]


def _paraphrase(label: str, rng: random.Random) -> str:
    s = label.strip()
    m = re.match(r"(?i)^abnormality of (?:the )?(.+)$", s)
    if m:
        return f"abnormal {m.group(1)}" if rng.random() < 0.5 else f"{m.group(1)} abnormalities"
    m = re.match(r"(?i)^(hypoplasia|aplasia|dysplasia|atrophy|agenesis|hypertrophy) of (?:the )?(.+)$", s)
    if m:
        adj = {"hypoplasia": "hypoplastic", "aplasia": "aplastic", "dysplasia": "dysplastic", "atrophy": "atrophic",
               "agenesis": "absent", "hypertrophy": "hypertrophic"}[m.group(1).lower()]
        return f"{adj} {m.group(2)}" if rng.random() < 0.6 else f"{m.group(2)} {m.group(1).lower()}"
    m = re.match(r"(?i)^(.+) of (?:the )?(.+)$", s)
    if m and rng.random() < 0.4 and len(m.group(2).split()) <= 2:
        return f"{m.group(2)} {m.group(1).lower()}"
    return s


def _lower(s: str) -> str:
    return " ".join(w if sum(c.isupper() for c in w) >= 2 else w.lower() for w in s.split())


def _join(items: list[str], rng: random.Random) -> str:
    if len(items) == 1:
        return items[0]
    conj = rng.choice((" and ", " and ", ", and ", " as well as "))
    return ", ".join(items[:-1]) + conj + items[-1]


AGES = ("newborn", "{m}-month-old", "{y}-year-old", "{y}-year-old", "{y}-year-old", "{a}-year-old")
MALE, FEMALE = ("boy", "male infant", "man", "male patient"), ("girl", "female infant", "woman", "female patient")
OPENERS = ("We report {a} {who} with {f}.", "A {who} was referred for {f}.", "{A} {who} presented with {f}.",
           "This {who} came to attention because of {f}.", "We describe {a} {who} who had {f}.",
           "The proband, {a} {who}, was evaluated for {f}.", "Case: {a} {who} with {f}.")
MIDDLES = ("Examination showed {f}.", "On examination {he} had {f}.", "Further findings included {f}.",
           "MRI of the brain revealed {f}.", "Imaging showed {f}.", "{He} also had {f}.", "Later, {f} developed.",
           "Clinical features comprised {f}.", "Physical examination was notable for {f}.",
           "Investigations demonstrated {f}.", "In addition, {f} were noted.", "{He} was found to have {f}.")
NEGATIONS = ("There was no {f}.", "No {f} was observed.", "{He} did not have {f}.", "{F} was absent.",
             "There was no evidence of {f}.", "{F} was not observed.", "Without {f}.", "{He} denies {f}.",
             "Negative for {f}.")
FAMILY = ("{His} {rel} had {f}.", "Family history was notable for {f} in {his} {rel}.",
          "{His} {rel} was diagnosed with {f}.")
RELATIVES = ("mother", "father", "brother", "sister", "maternal uncle", "paternal grandmother", "cousin")
ENDINGS = ("Parents are non-consanguineous.", "Genetic testing is pending.",
           "Family history was unremarkable.", "", "", "Exome sequencing was requested.")


class CaseGenerator:
    """Samples cases from compiled knowledge (``compile_knowledge`` output) and a phrasing table."""

    def __init__(self, knowledge: dict, phrasings: dict[int, list[str]], seed: int = 0,
                 name_terms: list[list[int]] | None = None):
        self.k = knowledge
        self.onto = knowledge["ontology"]
        self.records = knowledge["records"]
        self.arrays = knowledge["arrays"]
        self.ic = self.arrays["ic"]
        self.phenotypic = self.arrays["phenotypic"]
        self.phrasings = phrasings
        self.name_terms = name_terms or []
        self.rng = random.Random(seed)
        # term pool for unrelated findings and negations: annotated terms, by how often diseases have them
        an = self.arrays["an_indices"]
        counts = np.bincount(an, minlength=len(self.ic))
        self.common = [int(t) for t in np.argsort(-counts)[:1500] if counts[t] > 0]
        self.children: dict[int, list[int]] = {}
        for child, parents in enumerate(self.onto.parents):
            for p in parents:
                self.children.setdefault(p, []).append(child)

    def name(self, t: int) -> str:
        r = self.rng
        options = self.phrasings.get(t) or []
        x = r.random()
        if options and x < 0.45:
            return _lower(r.choice(options))
        if x < 0.75:
            return _lower(_paraphrase(self.onto.labels[t], r))
        return _lower(self.onto.labels[t])

    def _generalise(self, t: int) -> int:
        parents = [p for p in self.onto.parents[t] if self.phenotypic[p] and self.ic[p] >= 2.0]
        if not parents:
            return t
        p = self.rng.choice(parents)
        if self.rng.random() < 0.3:
            grand = [g for g in self.onto.parents[p] if self.phenotypic[g] and self.ic[g] >= 2.0]
            p = self.rng.choice(grand) if grand else p
        return p

    def _shift(self, t: int) -> int:
        """A real description is often more specific than the annotation (a child term) or names a
        neighbouring finding (a sibling): the curators annotated from other patients."""
        if self.rng.random() < 0.6:
            kids = [c for c in self.children.get(t, []) if self.phenotypic[c]]
            if kids:
                return self.rng.choice(kids)
        parents = [p for p in self.onto.parents[t] if self.phenotypic[p]]
        sibs = [c for p in parents for c in self.children.get(p, []) if c != t]
        return self.rng.choice(sibs) if sibs else t

    def sample(self, d: int) -> GeneratedCase:
        r = self.rng
        rec = self.records[d]
        feats = list(rec.features.items())
        present = [t for t, f in feats if r.random() < max(f, 0.05)]
        k = min(len(feats), r.choice((3, 4, 5, 6, 7, 8, 8, 9, 10, 12, 14, 16, 20)))
        if len(present) < min(3, len(feats)):
            rest = sorted((x for x in feats if x[0] not in present), key=lambda x: (-x[1], r.random()))
            present += [t for t, _ in rest[: min(3, len(feats)) - len(present)]]
        # which of the patient's features the author names: the characteristic (frequent) ones more often
        freq = dict(feats)
        present.sort(key=lambda t: -(r.random() ** (1.0 / (freq[t] + 0.3))))
        # a report of "X with situs inversus" usually names situs inversus (the name's findings come first)
        named_after = [t for t in (self.name_terms[d] if d < len(self.name_terms) else ()) if r.random() < 0.75]
        present = list(dict.fromkeys(named_after + present))[: max(k, len(named_after))]
        named = []
        for t in present:
            x = r.random()
            named.append(self._generalise(t) if x < 0.3 else self._shift(t) if x < 0.5 else t)
        named = list(dict.fromkeys(named))
        # a patient of a sparsely annotated disease still has 3 findings or more: the curators' few terms,
        # and findings next to them (a more specific child, a sibling) as other reports of it describe
        for _ in range(12):
            if len(named) >= 3 or not present:
                break
            t = self._shift(r.choice(present))
            if self.phenotypic[t] and t not in named:
                named.append(t)
        noise = [t for t in r.sample(self.common, r.choice((0, 0, 1, 1, 2, 3))) if t not in rec.features]
        annotated = set(rec.features)
        neg_pool = [t for t in rec.excluded] if rec.excluded and r.random() < 0.6 else []
        neg_pool += [t for t in r.sample(self.common, 8) if t not in annotated and t not in named]
        negs = list(dict.fromkeys(neg_pool))[: r.choice((0, 1, 1, 2, 3))]
        fam = [t for t in r.sample(self.common, 1)] if r.random() < 0.25 else []
        text = self.render(named + noise, negs, fam, rec)
        return GeneratedCase(d, text, named + noise, negs, noise)

    def _family_line(self, rec, his: str) -> str:
        """A closing line whose family story follows the disease's inheritance, as real reports do:
        consanguinity mostly for recessive diseases, an affected parent mostly for dominant ones."""
        from training.phenotype.compile import AUTOSOMAL_DOMINANT, AUTOSOMAL_RECESSIVE

        r = self.rng
        recessive, dominant = AUTOSOMAL_RECESSIVE in rec.inheritance, AUTOSOMAL_DOMINANT in rec.inheritance
        x = r.random()
        if x < (0.35 if recessive else 0.04):
            return r.choice(("The parents are first cousins.", "The parents are consanguineous."))
        if x < (0.7 if dominant and not recessive else 0.06):
            parent = r.choice(("father", "mother"))
            return r.choice((f"{his.capitalize()} {parent} has similar features.",
                             f"{his.capitalize()} {parent} was similarly affected."))
        return r.choice(ENDINGS)

    def _age(self, rec) -> str:
        """An age at report no younger than the disease's earliest annotated onset."""
        from training.phenotype.compile import earliest_onset

        r = self.rng
        onset = earliest_onset(rec, self.onto)
        if math.isnan(onset) or onset < 0.08:  # not annotated, or from birth
            return r.choice(AGES).format(m=r.randint(2, 11), y=r.randint(1, 15), a=r.randint(16, 60))
        if onset < 1:
            return r.choice(AGES[1:]).format(m=r.randint(2, 11), y=r.randint(1, 15), a=r.randint(16, 60))
        if onset < 16:
            lo = int(onset)
            return f"{r.randint(lo, 17)}-year-old" if r.random() < 0.7 else f"{r.randint(18, 60)}-year-old"
        return f"{r.randint(int(onset), int(onset) + 30)}-year-old"

    def render(self, present: list[int], negs: list[int], fam: list[int], rec) -> str:
        r = self.rng
        male = (rec.sexes == {"male"}) or (rec.sexes != {"female"} and r.random() < 0.5)
        who = r.choice(MALE if male else FEMALE)
        he, his = ("he", "his") if male else ("she", "her")
        age = self._age(rec)
        names = [self.name(t) for t in present]
        r.shuffle(names)
        first, rest = names[: r.randint(1, min(4, len(names)))], names
        rest = names[len(first):]
        article = "an" if age[0] in "aeiou8" else "a"
        sents = [r.choice(OPENERS).format(a=article, A=article.capitalize(), who=f"{age} {who}", f=_join(first, r))]
        while rest:
            n = r.randint(1, 4)
            chunk, rest = rest[:n], rest[n:]
            s = r.choice(MIDDLES).format(f=_join(chunk, r), he=he, He=he.capitalize())
            sents.append(s[0].upper() + s[1:])
        for t in negs:
            s = r.choice(NEGATIONS).format(f=self.name(t), F=self.name(t).capitalize(), He=he.capitalize())
            sents.insert(r.randint(1, len(sents)), s)
        for t in fam:
            sents.append(r.choice(FAMILY).format(His=his.capitalize(), his=his, rel=r.choice(RELATIVES),
                                                 f=self.name(t)))
        sents.append(self._family_line(rec, his))
        return " ".join(s for s in sents if s)


_SYNDROMIC_LEADS = re.compile(r"(?i)known genetic syndrome with|pmh notable for|background:|longstanding|"
                              r"relevant background of|also has")


def ordinary_texts(n: int, seed: int = 0, split: Split = "test") -> list[str]:
    """Ordinary imaging indications (protocol generator) and clinical notes: the gate's negatives."""
    from schemas.text import clinical_text
    from training.datasets import protocol

    ds = protocol.generate(n, seed=seed, split=split)
    # the protocol generator gives some orders a rare-disease background (a distractor for the protocol
    # model): those patients do have a rare-disease phenotype, so they are not negatives here
    texts = [t for t in (clinical_text(it.service_request) for it in ds.items if "workup" not in (it.group or ""))
             if not _SYNDROMIC_LEADS.search(t)]
    notes = []
    if ORDINARY_NOTES.is_file():
        with gzip.open(ORDINARY_NOTES, "rt", encoding="utf-8") as fh:
            notes = [json.loads(line)["text"] for line in fh]
        rng = random.Random(seed)
        rng.shuffle(notes)
        half = len(notes) // 2
        notes = notes[:half] if split == "train" else notes[half:]
    return [t for t in texts if t] + notes[: max(0, n // 4)]
