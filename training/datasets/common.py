"""Shared types and helpers of the training datasets.

Every example is a FHIR R4 ``ServiceRequest`` dict; the model-input text is always made by
``schemas.text.build_model_input`` (the one preprocessing function shared with inference), so
generated data, user data and live orders go through the same code path.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable, Literal, Sequence

from schemas.catalog import DECIPHER_SYSTEM, OMIM_SYSTEM, ORPHA_SYSTEM
from schemas.labels import Label
from schemas.text import build_model_input

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")

SNOMED = "http://snomed.info/sct"
CATEGORY_IMAGING = {"coding": [{"system": SNOMED, "code": "363679005", "display": "Imaging"}], "text": "Imaging"}
CATEGORY_LABORATORY = {
    "coding": [{"system": SNOMED, "code": "108252007", "display": "Laboratory procedure"}],
    "text": "Laboratory",
}

_DISEASE_PREFIX = {OMIM_SYSTEM: "OMIM", ORPHA_SYSTEM: "ORPHA", DECIPHER_SYSTEM: "DECIPHER"}


@dataclass(frozen=True)
class LabelledOrder:
    service_request: dict  # a FHIR R4 ServiceRequest dict
    label: str  # protocol code (schemas.catalog) or "OMIM:123456" / "ORPHA:123"
    group: str  # template/phrasing family id (held-out splits: test groups never occur in train/val)


@dataclass(frozen=True)
class Dataset:
    items: list[LabelledOrder]
    labels: list[Label]  # the label space, fixed order (index = class id)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def texts(self) -> list[str]:
        """Model-input texts: ``build_model_input(item.service_request)`` for every item (cached)."""
        if "texts" not in self._cache:
            self._cache["texts"] = [build_model_input(i.service_request) for i in self.items]
        return list(self._cache["texts"])

    def label_keys(self) -> list[str]:
        """The label space as item-label strings (protocol code, ``OMIM:123456``), class-id order."""
        return [label_key(lab) for lab in self.labels]

    def label_ids(self) -> list[int]:
        index = {k: i for i, k in enumerate(self.label_keys())}
        out = []
        for n, item in enumerate(self.items):
            try:
                out.append(index[item.label])
            except KeyError:
                raise ValueError(f"item {n} has label {item.label!r}, which is not in the label space") from None
        return out

    def label_counts(self) -> Counter:
        return Counter(i.label for i in self.items)

    def groups(self) -> list[str]:
        return [i.group for i in self.items]

    def subset(self, indices: Iterable[int]) -> "Dataset":
        return Dataset([self.items[i] for i in indices], list(self.labels))

    def sha256(self) -> str:
        """Hash of the label space and every (model-input text, label) pair, for the model manifest."""
        h = hashlib.sha256()
        h.update(json.dumps([[lab.system, lab.code, lab.display] for lab in self.labels]).encode())
        for text, item in zip(self.texts(), self.items):
            h.update(b"\x1e")
            h.update(json.dumps([text, item.label], ensure_ascii=False).encode())
        return h.hexdigest()


def label_key(label: Label) -> str:
    """Item-label string of a ``Label``: ``OMIM:123456`` for disease systems, else the code."""
    prefix = _DISEASE_PREFIX.get(label.system)
    if prefix and not label.code.startswith(prefix + ":"):
        return f"{prefix}:{label.code}"
    return label.code


def concat(datasets: Sequence[Dataset]) -> Dataset:
    """Items of several datasets over one label space (all must share it)."""
    if not datasets:
        raise ValueError("concat needs at least one dataset")
    first = datasets[0].labels
    for d in datasets[1:]:
        if d.labels != first:
            raise ValueError("datasets have different label spaces")
    return Dataset([i for d in datasets for i in d.items], list(first))


def stratified_split(
    dataset: Dataset, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[Dataset, ...]:
    """Split per label in the given proportions (shuffled with ``seed``); returns one Dataset per fraction.

    Every label with at least as many items as there are parts gets at least one item into each
    part (the first part is filled first), so small classes are not lost from validation/test.
    """
    if not fractions or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be non-negative and sum to > 0, got {fractions!r}")
    total = float(sum(fractions))
    fr = [f / total for f in fractions]
    rng = random.Random(f"stratified_split:{seed}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(dataset.items):
        by_label[item.label].append(i)
    parts: list[list[int]] = [[] for _ in fr]
    for lab in sorted(by_label):
        idx = by_label[lab][:]
        rng.shuffle(idx)
        n = len(idx)
        counts = [int(n * f) for f in fr]
        # largest remainder, then make sure every non-zero part gets one item when possible
        rem = sorted(range(len(fr)), key=lambda k: (n * fr[k] - counts[k]), reverse=True)
        for k in rem[: n - sum(counts)]:
            counts[k] += 1
        if n >= sum(1 for f in fr if f > 0):
            for k, f in enumerate(fr):
                if f > 0 and counts[k] == 0:
                    donor = max(range(len(fr)), key=lambda j: counts[j])
                    counts[donor] -= 1
                    counts[k] += 1
        start = 0
        for k, c in enumerate(counts):
            parts[k].extend(idx[start : start + c])
            start += c
    return tuple(dataset.subset(sorted(p)) for p in parts)


# ---------------------------------------------------------------------------------------------
# ServiceRequest construction


def make_rng(task: str, seed: int, split: str) -> random.Random:
    """Deterministic RNG per (task, seed, split); string seeds are stable across processes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(f"ehrw-datasets:{task}:{seed}:{split}")


def random_id(rng: random.Random, prefix: str = "gen") -> str:
    return f"{prefix}-{rng.getrandbits(64):016x}"


_EPOCH = datetime(2024, 1, 1, 7, 0, tzinfo=timezone.utc)


def service_request(
    rng: random.Random,
    *,
    code_text: str | None,
    reasons: Sequence[str] = (),
    notes: Sequence[str] = (),
    imaging: bool = True,
    id_prefix: str = "gen",
    code_coding: dict | None = None,
    patient: str | None = None,
) -> dict:
    """A FHIR R4 ServiceRequest (status active, intent order) with seeded random id and subject."""
    sr: dict = {
        "resourceType": "ServiceRequest",
        "id": random_id(rng, id_prefix),
        "status": "active",
        "intent": "order",
        "category": [CATEGORY_IMAGING if imaging else CATEGORY_LABORATORY],
    }
    code: dict = {}
    if code_coding:
        code["coding"] = [code_coding]
    if code_text:
        code["text"] = code_text
    if code:
        sr["code"] = code
    sr["subject"] = {"reference": patient or f"Patient/{random_id(rng, 'gen')}"}
    authored = _EPOCH + timedelta(minutes=rng.randrange(0, 60 * 24 * 700))
    sr["authoredOn"] = authored.strftime("%Y-%m-%dT%H:%M:%SZ")
    reasons = [r for r in reasons if r and r.strip()]
    if reasons:
        sr["reasonCode"] = [{"text": r.strip()} for r in reasons]
    notes = [n for n in notes if n and n.strip()]
    if notes:
        sr["note"] = [{"text": n.strip()} for n in notes]
    return sr
