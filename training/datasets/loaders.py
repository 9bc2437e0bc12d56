"""User-labelled data: JSONL, CSV and FHIR NDJSON files -> ``Dataset``.

Formats (by content, one example per line/row):

- **JSONL** (``.jsonl``/``.ndjson``/``.json``): ``{"text": "...", "label": "..."}``, optional ``id``
  and ``group``. A line that has a ``resourceType`` is read as FHIR (below).
- **CSV** (``.csv``; ``.tsv`` tab-separated): a header with ``text`` and ``label`` columns,
  optional ``id`` and ``group``.
- **FHIR NDJSON**: one ``ServiceRequest`` per line (a ``Bundle`` line contributes each
  ServiceRequest entry). The label is the first of:
  1. an extension ``LABEL_EXTENSION_URL`` (``valueCoding`` or ``valueCodeableConcept``);
  2. an ``orderDetail`` coding in the task's system (the protocol CodeSystem
     ``schemas.catalog.PROTOCOL_SYSTEM``; OMIM/ORPHA/DECIPHER for diagnosis);
  3. for the protocol task, a ``code`` coding in ``PROTOCOL_SYSTEM``.
  The coding used as the label is removed from the copy the model reads (the answer must not
  be in the input); the rest of the order is kept as is.

Labels: protocol — a catalog code (``CT-HEAD-WO``) or display name (any case); diagnosis —
``OMIM:123456`` / ``ORPHA:558`` / ``DECIPHER:1`` (or ``system|code``). Text rows become
ServiceRequests with the text as a note (``schemas.text.service_request_from_text(...,
field="note")``) so that they go through ``build_model_input`` like everything else.

Label space: protocol — all catalog protocols in catalog order (same ids as the generated data);
diagnosis — the diseases present in the file, in ``disease_panel()`` order first, then others
sorted; pass ``labels=`` to force a label space (e.g. the generated panel), in which case an
unknown label is an error.

Every error names the file and the line (``DatasetFormatError``, a ``ValueError``).
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Iterator, Sequence

from schemas.catalog import (
    DECIPHER_SYSTEM,
    OMIM_SYSTEM,
    ORPHA_SYSTEM,
    PROTOCOL_SYSTEM,
    disease_coding,
    disease_database_id,
    protocol_by_code,
    protocol_by_display,
)
from schemas.jsonlines import JsonLinesError, iter_json_lines
from schemas.labels import Label
from schemas.tasks import TASKS, Task
from schemas.text import service_request_from_text

from .common import Dataset, LabelledOrder, label_key, stratified_split  # noqa: F401  (re-exported)

LABEL_EXTENSION_URL = "https://ehr-worker.dev/fhir/StructureDefinition/training-label"
DISEASE_SYSTEMS = (OMIM_SYSTEM, ORPHA_SYSTEM, DECIPHER_SYSTEM)

__all__ = ["DatasetFormatError", "LABEL_EXTENSION_URL", "load_labelled_file", "stratified_split", "normalise_label"]


class DatasetFormatError(ValueError):
    """A labelled file that cannot be read; the message names the file and line."""

    def __init__(self, path: str | Path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


# ------------------------------------------------------------------------------------------ labels


def normalise_label(value: str, task: Task) -> str:
    """A label as written by a user -> the item-label string (protocol code / ``OMIM:123``)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("empty label")
    v = value.strip()
    if task == "protocol":
        if "|" in v:
            system, _, code = v.partition("|")
            if system != PROTOCOL_SYSTEM:
                raise ValueError(f"label system {system!r} is not the protocol CodeSystem {PROTOCOL_SYSTEM}")
            v = code
        try:
            return protocol_by_code(v).code
        except KeyError:
            pass
        try:
            return protocol_by_display(v).code
        except KeyError:
            raise ValueError(f"unknown protocol {value!r} (use a catalog code such as CT-HEAD-WO or a display name)") from None
    if task == "diagnosis":
        if "|" in v:
            system, _, code = v.partition("|")
            try:
                return disease_database_id(system, code.strip())
            except ValueError:
                raise ValueError(f"label system {system!r} is not OMIM, ORPHA or DECIPHER") from None
        try:
            system, code = disease_coding(v)
        except ValueError:
            raise ValueError(f"not a disease id {value!r} (expected e.g. OMIM:203400 or ORPHA:558)") from None
        return disease_database_id(system, code)
    raise ValueError(f"unknown task {task!r} (protocol or diagnosis)")


def _coding_label(coding: dict, task: Task) -> str | None:
    system, code = coding.get("system"), coding.get("code")
    if not isinstance(code, str) or not code:
        return None
    if task == "protocol" and system == PROTOCOL_SYSTEM:
        return normalise_label(code, task)
    if task == "diagnosis" and system in DISEASE_SYSTEMS:
        return disease_database_id(system, code)
    return None


def _label_from_service_request(sr: dict, task: Task) -> tuple[str, dict]:
    """(label, copy of the order without the labelling coding); ValueError when none."""
    sr = copy.deepcopy(sr)
    # 1. extension
    exts = sr.get("extension")
    exts = exts if isinstance(exts, list) else []
    for i, ext in enumerate(exts):
        if isinstance(ext, dict) and ext.get("url") == LABEL_EXTENSION_URL:
            codings = []
            if isinstance(ext.get("valueCoding"), dict):
                codings = [ext["valueCoding"]]
            elif isinstance(ext.get("valueCodeableConcept"), dict):
                codings = [c for c in ext["valueCodeableConcept"].get("coding", []) if isinstance(c, dict)]
            for c in codings:
                lab = _coding_label(c, task)
                if lab:
                    del exts[i]
                    if not exts:
                        sr.pop("extension", None)
                    return lab, sr
            raise ValueError(f"extension {LABEL_EXTENSION_URL} has no coding in the {task} system")
    # 2. orderDetail, 3. code (protocol)
    places = [("orderDetail", True)] + ([("code", False)] if task == "protocol" else [])
    for key, is_list in places:
        concepts = sr.get(key) if is_list else [sr.get(key)]
        if not isinstance(concepts, list):
            continue
        for concept in concepts:
            if not isinstance(concept, dict):
                continue
            coded = concept.get("coding")
            coded = coded if isinstance(coded, list) else []
            for j, c in enumerate(coded):
                if not isinstance(c, dict):
                    continue
                lab = _coding_label(c, task)
                if lab:
                    del coded[j]
                    if not coded:
                        concept.pop("coding", None)
                    if is_list:
                        sr[key] = [x for x in sr[key] if not (isinstance(x, dict) and not x)]
                        if not sr[key]:
                            sr.pop(key)
                    elif not concept:
                        sr.pop(key)
                    return lab, sr
    where = "extension, orderDetail or code" if task == "protocol" else "extension or orderDetail"
    raise ValueError(f"ServiceRequest {sr.get('id')!r} has no {task} label coding in {where}")


# ------------------------------------------------------------------------------------------ readers


def _text_item(path: Path, line: int, text, label, task: Task, id_=None, group=None) -> LabelledOrder:
    if not isinstance(text, str) or not text.strip():
        raise DatasetFormatError(path, line, "'text' is missing or empty")
    if not isinstance(label, str) or not label.strip():
        raise DatasetFormatError(path, line, "'label' is missing or empty")
    try:
        lab = normalise_label(label, task)
    except ValueError as exc:
        raise DatasetFormatError(path, line, str(exc)) from None
    sr = service_request_from_text(str(id_) if id_ not in (None, "") else f"{path.stem}-{line}", text.strip(), field="note")
    return LabelledOrder(sr, lab, str(group) if group not in (None, "") else f"file:{path.name}")


def _fhir_items(path: Path, line: int, obj: dict, task: Task, group) -> Iterator[LabelledOrder]:
    rtype = obj.get("resourceType")
    if rtype == "Bundle":
        entries = obj.get("entry")
        srs = [e["resource"] for e in (entries if isinstance(entries, list) else [])
               if isinstance(e, dict) and isinstance(e.get("resource"), dict)
               and e["resource"].get("resourceType") == "ServiceRequest"]
        if not srs:
            raise DatasetFormatError(path, line, "Bundle holds no ServiceRequest")
    elif rtype == "ServiceRequest":
        srs = [obj]
    else:
        raise DatasetFormatError(path, line, f"resourceType {rtype!r} is not a ServiceRequest or Bundle")
    for sr in srs:
        try:
            lab, clean = _label_from_service_request(sr, task)
        except ValueError as exc:
            raise DatasetFormatError(path, line, str(exc)) from None
        yield LabelledOrder(clean, lab, str(group) if group not in (None, "") else f"file:{path.name}")


def _read_json_lines(path: Path, task: Task) -> Iterator[LabelledOrder]:
    try:
        for n, obj in iter_json_lines(path):
            if "resourceType" in obj:
                yield from _fhir_items(path, n, obj, task, None)
            else:
                missing = [k for k in ("text", "label") if k not in obj]
                if missing:
                    raise DatasetFormatError(path, n, f"missing key(s) {', '.join(missing)} (expected 'text' and 'label')")
                yield _text_item(path, n, obj["text"], obj["label"], task, obj.get("id"), obj.get("group"))
    except JsonLinesError as exc:
        raise DatasetFormatError(path, exc.line, exc.problem) from None


def _read_csv(path: Path, task: Task, delimiter: str) -> Iterator[LabelledOrder]:
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "text" not in cols or "label" not in cols:
            raise DatasetFormatError(path, 1, f"header must have 'text' and 'label' columns, found {cols or 'none'}")
        reader.fieldnames = cols
        try:
            for row in reader:
                line = reader.line_num
                if None in row:
                    raise DatasetFormatError(path, line, f"row has {len(cols) + len(row[None])} fields, header has {len(cols)}")
                if not any((v or "").strip() for v in row.values()):
                    continue
                yield _text_item(path, line, row.get("text"), row.get("label"), task, row.get("id"), row.get("group"))
        except csv.Error as exc:
            raise DatasetFormatError(path, reader.line_num, f"CSV error: {exc}") from None


def _label_space(items: list[LabelledOrder], task: Task, labels: Sequence[Label] | None, path: Path) -> list[Label]:
    if labels is not None:
        space = list(labels)
        known = {label_key(lab) for lab in space}
        for n, it in enumerate(items):
            if it.label not in known:
                raise DatasetFormatError(path, None, f"label {it.label!r} (example {n + 1}) is not in the given label space")
        return space
    if task == "protocol":
        from .protocol import protocol_labels

        return protocol_labels()
    from .diagnosis import disease_panel
    from .hpo import load_diseases

    present = {it.label for it in items}
    panel = [lab for lab in disease_panel() if label_key(lab) in present]
    in_panel = {label_key(lab) for lab in panel}
    names = load_diseases()
    extra = []
    for key in sorted(present - in_panel):
        system, code = disease_coding(key)
        extra.append(Label(system, code, names[key].name if key in names else key))
    return panel + extra


def load_labelled_file(path: str | Path, *, task: Task, labels: Sequence[Label] | None = None) -> Dataset:
    """Read one labelled file (JSONL / CSV / TSV / FHIR NDJSON); see the module docstring."""
    if task not in TASKS:
        raise ValueError(f"task must be {' or '.join(map(repr, TASKS))}, got {task!r}")
    p = Path(path)
    if not p.is_file():
        raise DatasetFormatError(p, None, "no such file")
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix.lower() == ".gz" else p.suffix.lower()
    if suffix.endswith(".gz"):
        raise DatasetFormatError(p, None, "compressed files are not supported; decompress first")
    if suffix in (".csv", ".tsv"):
        items = list(_read_csv(p, task, "\t" if suffix == ".tsv" else ","))
    elif suffix in (".jsonl", ".ndjson", ".json", ".txt", ""):
        items = list(_read_json_lines(p, task))
    else:
        raise DatasetFormatError(p, None, f"unknown file type {suffix!r} (use .jsonl, .ndjson, .csv or .tsv)")
    if not items:
        raise DatasetFormatError(p, None, "no labelled examples in file")
    return Dataset(items, _label_space(items, task, labels, p))
