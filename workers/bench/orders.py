"""The orders the bench sends: the bundled demo fixtures (or generated ones), each copy with a fresh
id so that every write-back creates resources."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from importlib import resources

from schemas.jsonlines import read_json_lines

FIXTURES = resources.files("workers") / "fixtures"


def fixture_orders() -> list[dict]:
    """The bundled demo orders (ServiceRequests), in file order."""
    orders: list[dict] = []
    for f in sorted((FIXTURES / "orders").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".ndjson"):
            orders += read_json_lines(str(f))
    return orders


def generated_orders(n: int, seed: int = 0) -> list[dict]:
    from training.datasets.protocol import generate

    return [item.service_request for item in generate(max(n, 1), seed=seed, split="test")]


def make_orders(base: Sequence[dict], n: int, tag: str) -> list[dict]:
    """``n`` copies of ``base`` cycled, each with a fresh id (``bench-{tag}-{i}``) and no ``meta``, so
    each one has its own idempotency key and its write-back creates resources."""
    out = []
    for i in range(n):
        sr = copy.deepcopy(base[i % len(base)])
        sr["id"] = f"b-{tag}-{i:05d}"
        sr.pop("meta", None)
        out.append(sr)
    return out


def new_tag() -> str:
    """A fresh suffix for ids and topics, so that runs never collide."""
    return uuid.uuid4().hex[:10]
