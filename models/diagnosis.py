"""The served rare-disease diagnosis model: text -> HPO terms -> every annotated disease ranked ->
calibrated probabilities, or abstention when the text describes no rare-disease phenotype.

numpy only (no torch, no ontology library). A version folder (``kind: hpo-ranker`` in the manifest)
holds what :mod:`training.phenotype` compiled from one HPO release:

    hpo_terms.json   term ids, labels, alt/obsolete ids -> primary
    hpo_graph.npz    IC, is_a ancestor closure, disease x term closure (CSR + CSC) with frequencies,
                     direct annotations, excluded (NOT) annotations, sex, annotation counts
    diseases.json    one row per disease (OMIM first, ORPHA-only after; ORPHA twin of an OMIM disease
                     as its second coding)
    lexicon.json     concept-recognition lexicon (:mod:`models.phenotypes`)
    ranker.json      fitted weights of the score, temperature, specificity gate

Score of a disease d for present terms Q and excluded terms E (features fitted by conditional
logistic regression on generated cases, see ``training.phenotype.fit``):

- explained IC: sum of IC(q) over q that d is annotated with (q or a descendant of q);
- frequency: sum of log f(d, q) over those q (a rare feature explains less than an obligate one);
- partial credit: sum over the other q of the IC of the most informative common ancestor (Resnik);
- Resnik mean: the IC-weighted semantic similarity averaged over Q (the field's plain core);
- excluded: sum over e in E annotated in d of log(1 - 0.9 f(d, e)) (an absent frequent feature);
- contradiction: count of q that d explicitly excludes (NOT annotations);
- annotation count (log; once, and once per named feature), a sex mismatch flag, a "too young" flag (the
  patient's stated age is below half the disease's earliest annotated onset), an ORPHA-only flag, and two
  inheritance flags: consanguineous parents but a disease not annotated autosomal recessive; an affected
  parent but a disease annotated only autosomal recessive (a prior: OMIM diseases are what
  most case descriptions are about; ORPHA-only entries are often subtypes or groups);
- missing hallmarks: the share of the disease's specific features annotated in >= 80 % of patients that
  the description does not name (a sparsely annotated disease whose defining feature is not mentioned
  should not win on its few matches); missing name terms: the same for the findings the disease's name
  states ("... with situs inversus"); named features x log(1 + the sum of the disease's annotated
  frequencies) (beside the same with the annotation count: a disease with many rare annotations is not
  penalised as one with many frequent ones).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.phenotypes import EXCLUDED, PRESENT, Mention, PhenotypeRecognizer, patient_terms
from models.registry import Manifest, verify_version_dir
from schemas.catalog import disease_coding

if TYPE_CHECKING:
    from schemas.labels import ModelOutput

KIND = "hpo-ranker"
MIN_SHARED_IC = 1.0
HALLMARK_FREQ, HALLMARK_IC = 0.8, 2.0
SIM_CACHE_TERMS = 1024  # x 12 kB (one byte per disease)
TOP_FOUND = 10  # diseases ranked per text: the gate's top-10 mass and a differential of up to 10
FILES = ("hpo_terms.json", "hpo_graph.npz", "diseases.json", "lexicon.json", "ranker.json")
FEATURES = ("explained_ic", "log_frequency", "partial_ic", "resnik_mean", "excluded", "contradiction",
            "log_annotations", "sex_mismatch", "orpha_only", "terms_x_log_annotations", "too_young",
            "consanguinity_not_recessive", "affected_parent_recessive_only", "missing_hallmarks", "missing_name_terms",
            "terms_x_log_frequency_mass")
GATE_FEATURES = ("n_present", "n_specific", "sum_ic_specific", "max_ic", "top1_probability", "top10_probability",
                 "ordinary_share", "neoplasm_share")
NEOPLASM = "HP:0002664"
# Subtrees whose findings fill ordinary orders (cancer staging, pain): never evidence of a rare disease
# for the gate, however rarely the annotations use them. They still count for ranking.
ORDINARY_SUBTREES = (NEOPLASM, "HP:0012531")  # Neoplasm, Pain
_AGE = re.compile(r"\b(\d{1,3})[- ](year|yr|month|mo|week|wk|day)s?[- ]old\b|\baged? (\d{1,3})\b|"
                  r"\b(newborn|neonate|neonatal period|infant)\b", re.IGNORECASE)
_CONSANGUINITY = re.compile(r"\b(?<!non-)(?<!non)(?<!not )(consanguin\w*|first cousins|related parents)", re.IGNORECASE)
_AFFECTED_PARENT = re.compile(r"\b(father|mother|parent)\b[^.;]*\b(similar|same|affected|also)\b|"
                              r"\b(similar|same|affected)\b[^.;]*\b(father|mother)\b", re.IGNORECASE)
_MALE = re.compile(r"\b(boy|male|man|he|his|him|son|brother|gentleman|mr)\b", re.IGNORECASE)
_FEMALE = re.compile(r"\b(girl|female|woman|she|her|hers|daughter|sister|lady|mrs|ms)\b", re.IGNORECASE)


def text_sex(text: str) -> int:
    """1 male, 2 female, 0 unknown/mixed: from the words a case report uses for the patient."""
    m, f = len(_MALE.findall(text)), len(_FEMALE.findall(text))
    if m > 2 * f and m:
        return 1
    if f > 2 * m and f:
        return 2
    return 0


def text_inheritance(text: str) -> tuple[bool, bool]:
    """(consanguineous parents, an affected parent) as a case description states them."""
    return bool(_CONSANGUINITY.search(text)), bool(_AFFECTED_PARENT.search(text))


def text_age(text: str) -> float | None:
    """The patient's age in years from the first "N-year-old" / "aged N" / "newborn"; None if not stated."""
    m = _AGE.search(text)
    if m is None:
        return None
    if m.group(4):
        return 0.0 if m.group(4).lower() != "infant" else 0.5
    if m.group(3):
        return float(m.group(3))
    n, unit = float(m.group(1)), m.group(2).lower()
    return n if unit in ("year", "yr") else n / 12 if unit in ("month", "mo") else n / 52 if unit in ("week", "wk") else n / 365


class Ranker:
    """Feature computation over all diseases for one patient's terms (shared by training and serving)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        a = arrays
        self.ic = a["ic"].astype(np.float32)
        self.phenotypic = a["phenotypic"].astype(bool)
        self.anc_indptr, self.anc_indices = a["anc_indptr"], a["anc_indices"]
        self.col_indptr, self.col_rows, self.col_freq = a["col_indptr"], a["col_rows"], a["col_freq"]
        self.dz_indptr, self.dz_indices, self.dz_freq = a["dz_indptr"], a["dz_indices"], a["dz_freq"]
        self.n_annotations = a["n_annotations"]
        self.sex = a["sex"]
        self.n_diseases = len(self.n_annotations)
        self._sim_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # term -> (ancestor per disease, ICs)
        self.log_annotations = np.log1p(self.n_annotations).astype(np.float32)
        # the expected number of a patient's features among the annotations (sum of frequencies): when an
        # author names the frequent ones, a named feature is one draw among that many, not among all
        mass = np.add.reduceat(a["an_freq"].astype(np.float64), a["an_indptr"][:-1]) if len(a["an_freq"]) else 0.0
        self.log_mass = np.log1p(np.where(np.diff(a["an_indptr"]) > 0, mass, 0.0)).astype(np.float32)
        self.orpha_only = a["orpha_only"].astype(np.float32)
        self.onset_years = a["onset_years"].astype(np.float32)  # NaN: unknown (never "too young")
        inh = a["inheritance"].astype(np.int16)
        self.not_recessive = ((inh != 0) & ((inh & 2) == 0)).astype(np.float32)
        self.recessive_only = (inh == 2).astype(np.float32)
        # hallmarks: a disease's specific features annotated in >= 80 % of patients (term -> diseases); a
        # description that names none of them is less likely that disease, however few its annotations
        an_rows = np.repeat(np.arange(self.n_diseases, dtype=np.int32), np.diff(a["an_indptr"]))
        keep = (a["an_freq"] >= HALLMARK_FREQ) & (self.ic[a["an_indices"]] >= HALLMARK_IC)
        h_terms, h_rows = a["an_indices"][keep], an_rows[keep]
        order = np.argsort(h_terms, kind="stable")
        self.hm_terms, self.hm_rows = h_terms[order], h_rows[order]
        self.hm_start = np.searchsorted(self.hm_terms, np.arange(len(self.ic) + 1))
        self.hm_total = np.bincount(h_rows, minlength=self.n_diseases).astype(np.float32)
        self.has_hm = np.diff(self.hm_start) > 0
        self.set_name_terms([[] for _ in range(self.n_diseases)])
        # excluded annotations as term -> diseases (CSC), for "the disease says NOT q"
        ex_indptr, ex_indices = a["ex_indptr"], a["ex_indices"]
        rows = np.repeat(np.arange(self.n_diseases, dtype=np.int32), np.diff(ex_indptr))
        order = np.argsort(ex_indices, kind="stable")
        self.ex_terms = ex_indices[order]
        self.ex_rows = rows[order]
        self.ex_start = np.searchsorted(self.ex_terms, np.arange(len(self.ic) + 1))
        self.has_ex = np.diff(self.ex_start) > 0

    def set_name_terms(self, per_disease: Sequence[Sequence[int]]) -> None:
        """The findings a disease is named after ("... with situs inversus", "Microcephaly-..."): a
        description of that disease names them; one that does not is less likely that disease."""
        rows = np.array([d for d, terms in enumerate(per_disease) for _ in terms], dtype=np.int32)
        terms = np.array([t for ts in per_disease for t in ts], dtype=np.int64)
        order = np.argsort(terms, kind="stable")
        self.nt_terms, self.nt_rows = terms[order], rows[order]
        self.nt_start = np.searchsorted(self.nt_terms, np.arange(len(self.ic) + 1))
        self.nt_total = np.bincount(rows, minlength=self.n_diseases).astype(np.float32)
        self.has_nt = np.diff(self.nt_start) > 0
        self._serving_key: bytes | None = None  # name terms are in score()'s cached constants

    def ancestors(self, t: int) -> np.ndarray:
        return self.anc_indices[self.anc_indptr[t] : self.anc_indptr[t + 1]]

    def most_specific(self, terms: Sequence[int]) -> list[int]:
        """Drop terms that are ancestors of another listed term ("seizure" next to "focal seizure")."""
        terms = [t for t in dict.fromkeys(terms) if self.phenotypic[t]]
        covered: set[int] = set()
        for t in terms:
            covered.update(x for x in self.ancestors(t).tolist() if x != t)
        return [t for t in terms if t not in covered]

    def similarity(self, q: int) -> np.ndarray:
        """Resnik similarity of q to every disease: the IC of the most informative ancestor of q that
        the disease is annotated with (q itself when the disease has q or a descendant: a hit).
        Ancestors below ``MIN_SHARED_IC`` (annotated in over a third of all diseases) count as nothing:
        they say little and their columns are most of the cost.

        Recent terms are cached as one byte per disease (which ancestor) and the ancestors' ICs:
        exact, a quarter of a float32 array, and decoding it costs a fifth of the scatter it saves."""
        cached = self._sim_cache.get(q)
        if cached is None:
            anc = self.ancestors(q)
            anc = anc[self.ic[anc] >= MIN_SHARED_IC]
            anc = anc[np.argsort(self.ic[anc], kind="stable")][-255:]  # the 255 most informative (never more in HPO)
            which = np.zeros(self.n_diseases, dtype=np.uint8)
            for level, a in enumerate(anc, start=1):  # most informative last: the maximum wins
                which[self.col_rows[self.col_indptr[a] : self.col_indptr[a + 1]]] = level
            cached = which, np.concatenate([[0.0], self.ic[anc]]).astype(np.float32)
            if len(self._sim_cache) >= SIM_CACHE_TERMS:
                self._sim_cache.pop(next(iter(self._sim_cache)))
            self._sim_cache[q] = cached
        which, levels = cached
        return np.take(levels, which)

    def columns(self, present: Sequence[int], excluded: Sequence[int] = (), sex: int = 0, age: float | None = None,
                family: tuple[bool, bool] = (False, False)):
        """The FEATURES columns over all diseases (None: all zero), the per-term similarity arrays (for
        explanations), and the present and excluded terms used."""
        present = self.most_specific(present)
        excluded = [e for e in dict.fromkeys(excluded) if self.phenotypic[e] and e not in present]
        n = self.n_diseases
        sim_sum = np.zeros(n, dtype=np.float32)
        explained = np.zeros(n, dtype=np.float32)
        log_freq = np.zeros(n, dtype=np.float32)
        contradiction = np.zeros(n, dtype=np.float32)
        per_term = []
        for q in present:
            sim = self.similarity(q)
            per_term.append((q, sim))
            sim_sum += sim
            lo, hi = self.col_indptr[q], self.col_indptr[q + 1]
            rows = self.col_rows[lo:hi]
            explained[rows] += self.ic[q]  # a hit: sim == IC(q) there
            log_freq[rows] += np.log(np.maximum(self.col_freq[lo:hi], 0.01))
            anc = self.ancestors(q)
            for a in anc[self.has_ex[anc]]:
                contradiction[self.ex_rows[self.ex_start[a] : self.ex_start[a + 1]]] += 1.0
        # hallmarks and name terms the description names (or names more specifically)
        up = np.unique(np.concatenate([self.ancestors(q) for q in present])) if present else np.zeros(0, np.int64)
        named = np.zeros(n, dtype=np.float32)
        for a in up[self.has_hm[up]]:
            named[self.hm_rows[self.hm_start[a] : self.hm_start[a + 1]]] += 1.0
        named_nt = np.zeros(n, dtype=np.float32)
        for a in up[self.has_nt[up]]:
            named_nt[self.nt_rows[self.nt_start[a] : self.nt_start[a + 1]]] += 1.0
        absent = None
        if excluded:
            absent = np.zeros(n, dtype=np.float32)
            for e in excluded:
                lo, hi = self.col_indptr[e], self.col_indptr[e + 1]
                absent[self.col_rows[lo:hi]] += np.log1p(-0.9 * self.col_freq[lo:hi])
        cols = [
            explained, log_freq, sim_sum - explained, sim_sum / max(1, len(present)), absent,
            contradiction if contradiction.any() else None, self.log_annotations,
            ((self.sex != 0) & (self.sex != sex)).astype(np.float32) if sex else None, self.orpha_only,
            # a generative view: each named feature is one draw among the disease's annotations
            len(present) * self.log_annotations,
            (age < 0.5 * self.onset_years).astype(np.float32) if age is not None else None,
            self.not_recessive if family[0] else None, self.recessive_only if family[1] else None,
            (self.hm_total - named) / np.maximum(self.hm_total, 1.0),
            (self.nt_total - named_nt) / np.maximum(self.nt_total, 1.0),
            len(present) * self.log_mass,
        ]
        return cols, per_term, present, excluded

    def features(self, present: Sequence[int], excluded: Sequence[int] = (), sex: int = 0, age: float | None = None,
                 family: tuple[bool, bool] = (False, False)):
        """``[n_diseases, len(FEATURES)]`` and the per-term similarity arrays (for explanations)."""
        cols, per_term, present, excluded = self.columns(present, excluded, sex, age, family)
        zero = np.zeros(self.n_diseases, np.float32)
        return np.stack([zero if c is None else c for c in cols], axis=1), per_term, present, excluded

    def score(self, weights: np.ndarray, present: Sequence[int], excluded: Sequence[int] = (), sex: int = 0,
              age: float | None = None, family: tuple[bool, bool] = (False, False)):
        """``features(...) @ weights`` without the matrix (what serving needs): the part that does not
        depend on the patient is summed once per weight vector (:meth:`_serving_terms`), the Resnik
        similarities once, and every sparse column (hits, contradictions, hallmarks and name terms
        named, excluded terms) in one ``bincount`` over the annotations they touch."""
        w = np.asarray(weights, dtype=np.float32)
        const, per_present, hit_freq, absent_freq, hm_drop, nt_drop = self._serving_terms(w)
        present = self.most_specific(present)
        excluded = [e for e in dict.fromkeys(excluded) if self.phenotypic[e] and e not in present]
        n = self.n_diseases
        per_term = [(q, self.similarity(q)) for q in present]
        sim_sum = np.sum([sim for _, sim in per_term], axis=0, dtype=np.float32) if per_term else np.zeros(n, np.float32)
        s = const + np.float32(len(present)) * per_present + (w[2] + w[3] / max(1, len(present))) * sim_sum
        q = np.asarray(present, dtype=np.int64)
        ancestors = self.anc_indices[_ranges(self.anc_indptr[q], self.anc_indptr[q + 1])]  # per term, repeats kept
        up = np.unique(ancestors)
        hits = _ranges(self.col_indptr[q], self.col_indptr[q + 1])
        ex_by = ancestors[self.has_ex[ancestors]]  # "the disease says NOT a", once per term under a
        contradicted = _ranges(self.ex_start[ex_by], self.ex_start[ex_by + 1]) if w[5] else hits[:0]
        hm = _ranges(self.hm_start[up[self.has_hm[up]]], self.hm_start[up[self.has_hm[up]] + 1])
        nt = _ranges(self.nt_start[up[self.has_nt[up]]], self.nt_start[up[self.has_nt[up]] + 1])
        x = np.asarray(excluded, dtype=np.int64)
        absent = _ranges(self.col_indptr[x], self.col_indptr[x + 1])
        # explained_ic and partial_ic both see a hit: sim == IC(q) there
        hit_ic = np.repeat((w[0] - w[2]) * self.ic[q], self.col_indptr[q + 1] - self.col_indptr[q])
        rows = np.concatenate([self.col_rows[hits], self.ex_rows[contradicted], self.hm_rows[hm], self.nt_rows[nt],
                               self.col_rows[absent]])  # fmt: skip
        values = np.concatenate([hit_ic + hit_freq[hits], np.full(len(contradicted), w[5], np.float32), -hm_drop[hm],
                                 -nt_drop[nt], absent_freq[absent]])  # fmt: skip
        s += np.bincount(rows, weights=values, minlength=n).astype(np.float32)
        if sex and w[7]:
            s += w[7] * ((self.sex != 0) & (self.sex != sex)).astype(np.float32)
        if age is not None and w[10]:
            s += w[10] * (age < 0.5 * self.onset_years).astype(np.float32)
        if family[0] and w[11]:
            s += w[11] * self.not_recessive
        if family[1] and w[12]:
            s += w[12] * self.recessive_only
        return s, per_term, present, excluded

    def _serving_terms(self, w: np.ndarray) -> tuple[np.ndarray, ...]:
        """For :meth:`score`, per weight vector (cached): the constant score, the score per present
        term, and the weighted per-annotation contributions of a hit, an excluded term and a named
        hallmark or name term. Equal to :meth:`columns` weighted, up to float32 rounding."""
        key = w.tobytes()
        if self._serving_key != key:
            hm, nt = np.maximum(self.hm_total, 1.0), np.maximum(self.nt_total, 1.0)
            const = w[6] * self.log_annotations + w[8] * self.orpha_only + w[13] * self.hm_total / hm
            const += w[14] * self.nt_total / nt
            per_present = w[9] * self.log_annotations + w[15] * self.log_mass
            hit_freq = (w[1] * np.log(np.maximum(self.col_freq, 0.01))).astype(np.float32)
            absent_freq = (w[4] * np.log1p(-0.9 * self.col_freq)).astype(np.float32)
            hm_drop, nt_drop = (w[13] / hm)[self.hm_rows], (w[14] / nt)[self.nt_rows]
            self._serving = tuple(np.asarray(x, dtype=np.float32) for x in
                                  (const, per_present, hit_freq, absent_freq, hm_drop, nt_drop))  # fmt: skip
            self._serving_key = key
        return self._serving


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, b) for a, b in zip(starts, ends)])`` without the Python loop."""
    lengths = np.asarray(ends, dtype=np.int64) - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)


def name_terms(recognizer: PhenotypeRecognizer, ranker: Ranker, display: str) -> list[int]:
    """Specific findings a disease's name states ("Marfanoid habitus with situs inversus" -> Situs inversus
    totalis...), IC >= 2 (not "Abnormality of ...")."""
    found = patient_terms(recognizer.recognise(display))[0]
    return [t for t in dict.fromkeys(found) if ranker.phenotypic[t] and ranker.ic[t] >= HALLMARK_IC]


def most_probable(p: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of p, largest first, without sorting all of p (11,654
    diseases: a full sort cost more than the rest of the gate)."""
    k = max(1, min(int(k), len(p)))
    top = np.argpartition(-p, k - 1)[:k]
    return top[np.argsort(-p[top], kind="stable")]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    p = np.exp(z)
    return p / p.sum()


@dataclass
class Analysis:
    """Everything about one text: mentions, the terms used, probabilities and gate inputs."""

    mentions: list[Mention]
    present: list[int]
    excluded: list[int]
    probabilities: np.ndarray | None
    per_term: list
    gate_features: np.ndarray
    accept: bool
    top: np.ndarray | None = None  # the TOP_FOUND most probable diseases, most probable first


class DiagnosisModel:
    """``DiagnosisModel.load(version_dir).predict(texts, top_k)`` -> one ModelOutput per text."""

    def __init__(self, manifest: Manifest | None, folder: Path):
        self.manifest, self.version_dir = manifest, folder
        arrays = dict(np.load(folder / "hpo_graph.npz"))
        self.ranker = Ranker(arrays)
        self.recognizer = PhenotypeRecognizer.load(folder, phenotypic=self.ranker.phenotypic)
        self.diseases = json.loads((folder / "diseases.json").read_text(encoding="utf-8"))
        self.name_terms = [name_terms(self.recognizer, self.ranker, row["display"]) for row in self.diseases]
        self.ranker.set_name_terms(self.name_terms)
        params = json.loads((folder / "ranker.json").read_text(encoding="utf-8"))
        weights = np.asarray(params["weights"], dtype=np.float32)  # features added later are appended: weight 0
        self.weights = np.concatenate([weights, np.zeros(max(0, len(FEATURES) - len(weights)), np.float32)])
        self.temperature = float(params["temperature"])
        self.gate = params["gate"]
        index = {h: i for i, h in enumerate(self.recognizer.ids)}
        owners = np.repeat(np.arange(len(self.ranker.ic)), np.diff(self.ranker.anc_indptr))
        subtree_roots = [index[h] for h in ORDINARY_SUBTREES if h in index]
        in_subtrees = owners[np.isin(self.ranker.anc_indices, subtree_roots)]
        self.ordinary_terms = frozenset(index[h] for h in params.get("ordinary_terms", []) if h in index) | frozenset(
            int(t) for t in in_subtrees)
        self.neoplasm = index.get(NEOPLASM, -1)
        self.max_chars = int(params.get("max_chars", 20000))

    @classmethod
    def load(cls, version_dir: str | Path, *, verify: bool = True, threads: int = 1) -> DiagnosisModel:
        version_dir = Path(version_dir)
        manifest = verify_version_dir(version_dir) if verify else Manifest.read(version_dir / "manifest.json")
        return cls(manifest, version_dir)

    # -- metadata (what the pipeline and write-back read; no manifest while training fits it) ----
    task = property(lambda self: self.manifest.task if self.manifest else "diagnosis")
    name = property(lambda self: self.manifest.name if self.manifest else "ehrw-diagnosis")
    version = property(lambda self: self.manifest.version if self.manifest else "unpublished")
    model_card_url = property(lambda self: self.manifest.model_card_url if self.manifest else None)
    threshold = property(lambda self: float(self.gate.get("threshold", 0.5)))

    def __repr__(self) -> str:
        return f"DiagnosisModel({self.name} {self.version}, {len(self.diseases)} diseases)"

    # -- inference -----------------------------------------------------------------------------
    def scores(self, present, excluded=(), sex: int = 0, age: float | None = None, family=(False, False)):
        return self.ranker.score(self.weights, present, excluded, sex, age, family)

    def gate_vector(self, present: list[int], proba: np.ndarray | None, top: np.ndarray | None = None) -> np.ndarray:
        """Inputs of the specificity gate (GATE_FEATURES). "Ordinary" terms are those that training saw
        in ordinary orders and notes (chest pain, fever, cancer...): weak evidence of a rare disease.
        ``top``: indices of the most probable diseases, most probable first (:func:`most_probable`)."""
        if not present:
            return np.array([0, 0, 0, 0, 0, 0, 1, 0], dtype=np.float64)
        ic = self.ranker.ic[present]
        specific = [t for t in present if t not in self.ordinary_terms]
        if proba is None:
            top = np.zeros(10)
        else:
            top = proba[most_probable(proba, 10) if top is None else top]
        neo = float(np.mean([self.neoplasm in self.ranker.ancestors(t) for t in present]))
        return np.array([len(present), len(specific), float(self.ranker.ic[specific].sum()) if specific else 0.0,
                         float(ic.max()), float(top[0]), float(top[:10].sum()), 1 - len(specific) / len(present),
                         neo], dtype=np.float64)

    def accept(self, g: np.ndarray) -> bool:
        if g[0] < self.gate.get("min_terms", 1) or g[1] < self.gate.get("min_specific", 0):
            return False
        z = float(np.dot(self.gate["weights"], (g - self.gate["mean"]) / self.gate["scale"]) + self.gate["bias"])
        return 1.0 / (1.0 + math.exp(-z)) >= self.gate["threshold"]

    def analyse(self, text: str) -> Analysis:
        text = text[: self.max_chars]
        mentions = self.recognizer.recognise(text)
        present, excluded = patient_terms(mentions)
        present = self.ranker.most_specific(present)
        if not present:
            g = self.gate_vector([], None)
            return Analysis(mentions, [], excluded, None, [], g, False)
        s, per_term, present, excluded = self.scores(present, excluded, text_sex(text), text_age(text),
                                                     text_inheritance(text))
        proba = softmax(s / self.temperature)
        top = most_probable(proba, TOP_FOUND)
        g = self.gate_vector(present, proba, top)
        return Analysis(mentions, present, excluded, proba, per_term, g, self.accept(g), top)

    def _prediction(self, d: int, p: float, a: Analysis):
        from schemas.labels import Prediction

        ids, labels = self.recognizer.ids, self.recognizer.labels
        support = [(ids[q], labels[q]) for q, sim in a.per_term
                   if sim[d] >= 0.6 * max(float(self.ranker.ic[q]), 1e-6)]
        against = []
        for e in a.excluded:
            lo, hi = self.ranker.col_indptr[e], self.ranker.col_indptr[e + 1]
            rows = self.ranker.col_rows[lo:hi]
            k = np.searchsorted(rows, d)
            if k < len(rows) and rows[k] == d and self.ranker.col_freq[lo + k] >= 0.25:
                against.append((ids[e], labels[e]))
        row = self.diseases[d]
        # the same codings the catalog (and the previous text classifier) wrote: system + bare code
        system, code = disease_coding(row["code"])
        extra = ((*disease_coding(row["orpha"]), row["display"]),) if row.get("orpha") else ()
        return Prediction(system, code, row["display"], min(1.0, max(0.0, round(float(p), 6))),
                          codings=extra, supporting=tuple(support), against=tuple(against))

    def output(self, a: Analysis, top_k: int = 5):
        from schemas.labels import ModelOutput

        phenotypes = [{"code": self.recognizer.ids[t], "label": self.recognizer.labels[t], "status": st}
                      for st, terms in ((PRESENT, a.present), (EXCLUDED, a.excluded)) for t in terms]
        preds = []  # listed on abstention too (like the protocol's alternatives); nothing is written then
        if a.probabilities is not None:
            k = max(1, min(int(top_k), len(a.probabilities)))
            top = a.top[:k] if a.top is not None and k <= len(a.top) else most_probable(a.probabilities, k)
            preds = [self._prediction(int(d), float(a.probabilities[d]), a) for d in top]
        return ModelOutput(task=self.task, model=self.name, model_version=self.version, abstained=not a.accept,
                           predictions=preds, threshold=self.threshold, model_card_url=self.model_card_url,
                           phenotypes=phenotypes)

    def predict(self, texts: Sequence[str], top_k: int = 5, batch_size: int = 32) -> list[ModelOutput]:
        """One :class:`schemas.labels.ModelOutput` per text; ``abstained`` when the text describes no
        rare-disease phenotype (the fitted specificity gate)."""
        return [self.output(self.analyse(t if isinstance(t, str) else str(t)), top_k) for t in texts]

    @staticmethod
    def input_text(service_request: dict, context: Sequence[dict] = ()) -> str:
        """What this model reads of an order: the full clinical text (schemas.text.phenotype_text)."""
        from schemas.text import phenotype_text

        return phenotype_text(service_request, context)


def load_diagnosis_model(version_dir: str | Path, *, threads: int = 1):
    """The registry's diagnosis model, whatever its kind: an ``hpo-ranker`` folder loads as
    :class:`DiagnosisModel`, an older text-classifier folder as :class:`models.runtime.TextClassifier`."""
    version_dir = Path(version_dir)
    manifest = Manifest.read(version_dir / "manifest.json")
    if getattr(manifest, "kind", None) == KIND:
        return DiagnosisModel.load(version_dir, threads=threads)
    from models.runtime import TextClassifier

    return TextClassifier.load(version_dir, threads=threads)
