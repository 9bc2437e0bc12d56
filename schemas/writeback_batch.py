"""Several orders' write-back Bundles as one FHIR transaction (issue 13, micro-batched write-back).

Each order's Bundle (:func:`schemas.writeback.build_writeback_bundle`, plus any supersede
cancellations) is complete and valid on its own. :func:`combine_transactions` concatenates their
entries into one ``transaction`` Bundle; an entry several orders share (the ``Device`` of a model,
same ``fullUrl`` and same conditional create) is sent once and every order's references to its
``urn:uuid`` resolve to it. Each order stays all-or-nothing because the whole transaction is (a
refused batch is retried order by order by the caller), and idempotent because every entry keeps its
own ``ifNoneExist``.

:func:`split_response` gives each order its part of the ``transaction-response`` (responses come in
request order), and :func:`first_owner` says which order an entry is counted for (a shared Device
is "created" for one order only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CombinedTransaction", "combine_transactions", "split_response"]


@dataclass(frozen=True)
class CombinedTransaction:
    """The Bundle to post, and for order ``i`` the indexes of its entries in it (``positions[i]``);
    ``owner[j]`` is the order that entry ``j`` is counted for."""

    bundle: dict[str, Any]
    positions: list[list[int]]
    owner: list[int]


def _entry_identity(entry: dict[str, Any]) -> str | None:
    """Entries with a ``urn:uuid`` fullUrl are the same resource when the fullUrl is (it is derived
    from the idempotency key); other entries (a PUT of a Task) are never merged."""
    url = entry.get("fullUrl")
    request = entry.get("request") or {}
    if isinstance(url, str) and url.startswith("urn:uuid:") and request.get("method") == "POST":
        return url
    return None


def combine_transactions(bundles: Sequence[dict[str, Any]]) -> CombinedTransaction:
    """One transaction Bundle with every entry of ``bundles`` (each a non-empty transaction), shared
    conditional creates once, in order: order 0's entries, then order 1's new ones, ..."""
    entries: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    positions: list[list[int]] = []
    owner: list[int] = []
    for i, bundle in enumerate(bundles):
        if bundle.get("type") != "transaction" or not bundle.get("entry"):
            raise ValueError("combine_transactions needs non-empty transaction Bundles")
        mine: list[int] = []
        for entry in bundle["entry"]:
            identity = _entry_identity(entry)
            if identity is not None and identity in seen:
                mine.append(seen[identity])
                continue
            if identity is not None:
                seen[identity] = len(entries)
            mine.append(len(entries))
            entries.append(entry)
            owner.append(i)
        positions.append(mine)
    keys = [str((b.get("identifier") or {}).get("value") or "") for b in bundles]
    combined: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    if bundles and isinstance(bundles[0].get("meta"), dict):
        combined["meta"] = bundles[0]["meta"]
    if bundles and isinstance(bundles[0].get("identifier"), dict):
        digest = hashlib.sha256("\x1f".join(keys).encode("utf-8")).hexdigest()[:32]
        combined["identifier"] = {"system": bundles[0]["identifier"].get("system"), "value": digest}
    return CombinedTransaction(combined, positions, owner)


def split_response(combined: CombinedTransaction, response: dict[str, Any]) -> list[dict[str, Any]]:
    """Order ``i``'s ``transaction-response``: its entries' responses, in its own entry order. An
    entry shared with an earlier order is reported as the resource that order created or found
    (``200 OK``: it existed by the time this order's part ran)."""
    answers = response.get("entry") or []
    if len(answers) != len(combined.owner):
        raise ValueError(f"the transaction-response has {len(answers)} entries for {len(combined.owner)} sent")
    parts = []
    for i, indexes in enumerate(combined.positions):
        entries = []
        for j in indexes:
            entry = answers[j]
            if combined.owner[j] != i:
                resp = dict(entry.get("response") or {})
                resp["status"] = "200 OK"
                entry = {**entry, "response": resp}
            entries.append(entry)
        parts.append({"resourceType": "Bundle", "type": "transaction-response", "entry": entries})
    return parts
