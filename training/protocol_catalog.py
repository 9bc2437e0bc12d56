"""Training data for a hospital's own protocol catalog (``--catalog my_protocols.csv``).

Each hospital protocol is matched to the default protocol that performs the same exam (same
modality; then region, contrast and shared display words), and the default generator's orders for
that protocol are relabelled with the hospital's code. Hospital protocols with no counterpart
learn from their example indications (rendered as short reasons and notes with the exam named
after the protocol); default protocols with no hospital counterpart are left out. The labels
carry the hospital's system and codes, so the worker writes those back.
"""

from __future__ import annotations

import random
import re

from schemas.catalog import PROTOCOLS, Protocol, ProtocolCatalog, load_protocol_catalog
from schemas.labels import Label
from training.datasets import protocol
from training.datasets.common import Dataset, LabelledOrder, make_rng, service_request
from training.datasets.noise import surface

OVERSAMPLE = 1.6  # default examples drawn per wanted example (some have no hospital counterpart)
MIN_SHARE = 0.01  # every hospital protocol gets at least this share of n (from its examples)


def _words(p: Protocol) -> set[str]:
    return set(re.findall(r"[a-z]{3,}", p.display.lower()))


def _score(hospital: Protocol, default: Protocol) -> float:
    if hospital.modality != default.modality:
        return -1.0
    score = 3.0 if hospital.body_region == default.body_region else 0.0
    score += 1.0 if hospital.contrast == default.contrast else 0.0
    return score + 0.5 * len(_words(hospital) & _words(default))


def counterparts(catalog: ProtocolCatalog) -> dict[str, str]:
    """Default protocol code -> the hospital code whose orders it provides (best match only; a
    default protocol whose best match does not share the region is left out)."""
    out: dict[str, str] = {}
    for d in PROTOCOLS:
        scored = [(_score(h, d), i, h) for i, h in enumerate(catalog.protocols)]
        best = max(scored, key=lambda x: (x[0], -x[1]))
        if best[0] >= 3.0:
            out[d.code] = best[2].code
    return out


def catalog_labels(catalog: ProtocolCatalog) -> list[Label]:
    return [Label(catalog.system, p.code, p.display) for p in catalog.protocols]


def generate_for_catalog(catalog: ProtocolCatalog, n: int, *, seed: int = 0, split: str = "train") -> Dataset:
    mapping = counterparts(catalog)
    base = protocol.generate(int(n * OVERSAMPLE) + len(PROTOCOLS), seed=seed, split=split)  # type: ignore[arg-type]
    items = [LabelledOrder(it.service_request, mapping[it.label], it.group) for it in base.items if it.label in mapping]
    rng = make_rng("protocol-catalog", seed, split)
    counts = {p.code: 0 for p in catalog.protocols}
    for it in items:
        counts[it.label] += 1
    floor = max(2, int(MIN_SHARE * n))
    extra = []
    for p in catalog.protocols:
        for _ in range(max(0, floor - counts[p.code])):
            extra.append(_from_examples(p, catalog.examples.get(p.code, ()), rng, split))
    rng.shuffle(items)
    items = items[: max(0, n - len(extra))] + extra
    rng.shuffle(items)
    return Dataset(items, catalog_labels(catalog))


def _from_examples(p: Protocol, examples: tuple[str, ...], rng: random.Random, split: str) -> LabelledOrder:
    # held-out split: the second half of the examples (when there are two or more)
    pool = "test" if split == "test" else "train"
    chosen = protocol.split_pool(examples, pool, 2) if examples else ()
    reason = rng.choice(chosen) if chosen else p.display
    reason = surface(reason, rng, abbrev_p=0.2, typo_rate=0.01)
    in_note = rng.random() < 0.5
    sr = service_request(rng, code_text=p.display if rng.random() < 0.7 else f"{p.modality} {p.body_region}",
                         reasons=[] if in_note else [reason], notes=[reason] if in_note else [], imaging=True)
    return LabelledOrder(sr, p.code, f"{pool}:catalog-example")


def catalog_data(path) -> dict:
    """What the pipeline needs for a hospital catalog: masks over its labels and the manifest entry."""
    catalog = load_protocol_catalog(path)
    return {
        "catalog_kw": {"catalog": catalog.protocols, "system": catalog.system},
        "manifest_extra": {"protocol_catalog": catalog.attributes(), "protocol_catalog_system": catalog.system},
    }


def catalog_generator(path):
    """``generate(n, seed=, split=)`` over the hospital catalog at ``path``."""
    catalog = load_protocol_catalog(path)

    def generate(n: int, *, seed: int = 0, split: str = "train") -> Dataset:
        return generate_for_catalog(catalog, n, seed=seed, split=split)

    return generate
