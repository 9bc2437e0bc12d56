"""The events of a chaos row: good orders of every kind interleaved with bad ones, and what each
should become (the expectation :func:`workers.chaos.verify` checks from the FHIR server and topics)."""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

IMAGING_REASONS = ["headache after a fall on warfarin", "RUQ pain after fatty meals", "persistent cough, weight loss",
                   "low back pain with leg weakness", "suspected appendicitis, RLQ pain"]  # fmt: skip


@dataclass
class Expected:
    kind: str  # imaging | lab | completed | invalid | poison | oversized | bundle | v1 | v2 | revoked
    orders: list[str] = field(default_factory=list)  # order ids (imaging or lab) the event carries
    imaging: list[str] = field(default_factory=list)


def _order(order_id: str, *, imaging: bool, rng: random.Random, status: str = "active") -> dict[str, Any]:
    sr: dict[str, Any] = {"resourceType": "ServiceRequest", "id": order_id, "status": status, "intent": "order",
                          "subject": {"reference": f"Patient/chaos-{rng.randrange(50)}"}}  # fmt: skip
    if imaging:
        sr["category"] = [
            {"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}
        ]
        sr["code"] = {"text": rng.choice(["CT head", "MRI lumbar spine", "US abdomen", "Chest X-ray"])}
        sr["reasonCode"] = [{"text": rng.choice(IMAGING_REASONS)}]
    else:
        sr["code"] = {"text": rng.choice(["Complete blood count", "Basic metabolic panel", "HbA1c"])}
    return sr


def make_events(tag: str, n: int, *, seed: int = 0, bundles: int = 0, bundle_size: int = 2000,
                oversized: int = 0, versions: int = 0) -> tuple[list[tuple[str, bytes, Expected]], set[str]]:  # fmt: skip
    """``n`` single events (55 % imaging, 27 % lab, 5 % completed, 11 % invalid, 2 % poison),
    plus ``bundles`` Bundles of ``bundle_size`` orders (5 % of their ids repeated),
    ``oversized`` events over 1 MiB, and ``versions`` imaging orders sent twice in a row (same key,
    so one partition and usually one batch): version 1 then version 2 with another reason
    (``v2``: one open Task, on version 2), or, for every third, version 1 then a revoked version 2
    (``revoked``: no open Task), interleaved. Returns (key, value, expectation) triples and the ids
    the FHIR proxy must poison."""
    rng = random.Random(seed)
    events: list[tuple[str, bytes, Expected]] = []
    poisoned: set[str] = set()
    for i in range(n):
        oid = f"{tag}-{i}"
        roll = rng.random()
        if roll < 0.55:
            events.append((oid, _raw(_order(oid, imaging=True, rng=rng)), Expected("imaging", [oid], [oid])))
        elif roll < 0.82:
            events.append((oid, _raw(_order(oid, imaging=False, rng=rng)), Expected("lab", [oid])))
        elif roll < 0.87:
            done = _order(oid, imaging=True, rng=rng, status="completed")
            events.append((oid, _raw(done), Expected("completed", [oid])))
        elif roll < 0.98:
            bad = _order(oid, imaging=True, rng=rng)
            del bad["subject"]
            value = _raw(bad) if i % 2 else _raw(bad)[:40]  # no subject, or not even JSON
            events.append((oid, value, Expected("invalid")))
        else:
            poisoned.add(oid)
            notice = {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "urn:chaos", "type": "created",
                      "subject": f"ServiceRequest/{oid}"}  # fmt: skip
            events.append((oid, _raw(notice), Expected("poison")))
    for b in range(bundles):
        ids = [f"{tag}-b{b}-{j}" for j in range(bundle_size)]
        orders = [_order(oid, imaging=j % 10 == 0, rng=rng) for j, oid in enumerate(ids)]
        repeats = orders[: max(1, bundle_size // 20)]  # the same orders again, later in the Bundle
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": o} for o in orders + repeats],
        }
        imaging = [o["id"] for o in orders if "category" in o]
        events.insert(
            rng.randrange(len(events) + 1), (f"{tag}-b{b}", _raw(bundle), Expected("bundle", ids, imaging))
        )
    for o in range(oversized):
        oid = f"{tag}-big-{o}"
        doc = _order(oid, imaging=True, rng=rng)
        doc["note"] = [{"text": "x" * 1024} for _ in range(1100)]
        events.insert(rng.randrange(len(events) + 1), (oid, _raw(doc), Expected("oversized")))
    for v in range(versions):
        oid = f"{tag}-v{v}"
        first = _order(oid, imaging=True, rng=rng)
        first["meta"] = {"versionId": "1"}
        second = _order(oid, imaging=True, rng=rng, status="revoked" if v % 3 == 2 else "active")
        second["meta"] = {"versionId": "2"}
        second["reasonCode"] = [{"text": rng.choice([r for r in IMAGING_REASONS if r != first["reasonCode"][0]["text"]])}]
        at = rng.randrange(len(events) + 1)
        expected = Expected("revoked", [oid]) if v % 3 == 2 else Expected("v2", [oid], [oid])
        events[at:at] = [(oid, _raw(first), Expected("v1", [oid], [oid])), (oid, _raw(second), expected)]
    return events, poisoned


def _raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
