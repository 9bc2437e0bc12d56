"""Generated rare-disease notes from the HPO annotations: panel, frequencies, negations, splits."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from schemas.catalog import OMIM_SYSTEM
from schemas.events import validate_service_request
from training.datasets import diagnosis as dx
from training.datasets import hpo


@pytest.fixture(scope="module")
def train():
    return dx.generate(4, seed=0, split="train", max_diseases=80)


@pytest.fixture(scope="module")
def test_split():
    return dx.generate(2, seed=0, split="test", max_diseases=80)


def test_panel_is_large_ordered_and_deterministic():
    panel = dx.disease_panel()
    assert len(panel) >= 4000  # all OMIM diseases with >= 8 phenotype annotations (4808 in the 2023-01-27 release)
    assert all(lab.system == OMIM_SYSTEM and lab.code.isdigit() and lab.display for lab in panel)
    assert len({lab.code for lab in panel}) == len(panel)
    diseases = dx.panel_diseases()
    counts = [d.n_features for d in diseases]
    assert counts == sorted(counts, reverse=True) and min(counts) >= dx.MIN_FEATURES
    assert dx.disease_panel(500) == panel[:500]
    assert dx.disease_panel() == panel


def test_near_duplicate_diseases_are_dropped():
    ids = {d.database_id for d in dx.panel_diseases()}
    # identical annotation sets in the 2023-01-27 release: only the first in panel order is kept
    assert not {"OMIM:612924", "OMIM:612926"} <= ids
    assert not {"OMIM:233700", "OMIM:233710"} <= ids


def test_every_disease_has_notes_and_label_ids_match(train, test_split):
    assert len(train) == 80 * 4 and len(test_split) == 80 * 2
    assert set(train.label_counts().values()) == {4}
    assert train.labels == test_split.labels == dx.disease_panel(80)
    ids = train.label_ids()
    keys = train.label_keys()
    assert all(keys[i] == item.label for i, item in zip(ids, train.items))
    assert all(re.fullmatch(r"OMIM:\d+", item.label) for item in train.items)


def test_orders_are_valid_service_requests(train):
    for item in train.items[:100]:
        sr = item.service_request
        validate_service_request(sr)
        assert sr["status"] == "active" and sr["intent"] == "order" and sr.get("note")
        assert sr["category"][0]["coding"][0]["code"] in ("363679005", "108252007")


def test_notes_have_negations_noise_family_history_and_variety(train):
    texts = train.texts()
    joined = "\n".join(texts).lower()
    assert re.search(r"\b(no|denies|without|negative for)\b", joined)
    noise_phrases = [phrase for _, phrase, _ in dx.NOISE_FINDINGS]
    assert sum(any(p in t.lower() for p in noise_phrases) for t in texts) > len(texts) * 0.2
    assert any(any(p in joined for p in dx.FAMILY["train"][m]) for m in ("AR", "AD"))
    lens = [len(t) for t in texts]
    assert min(lens) < 200 and max(lens) > 400
    assert "we describe" in joined and "pt w/" in joined and "referred for" in joined
    cats = Counter(i.service_request["category"][0]["text"] for i in train.items)
    assert cats["Imaging"] > 0 and cats["Laboratory"] > 0


def test_test_split_uses_other_templates_and_synonyms(train, test_split):
    assert not set(train.groups()) & set(test_split.groups())
    val = dx.generate(1, seed=0, split="val", max_diseases=40)
    assert set(val.groups()) <= {f"train:{t[0]}" for t in dx.TEMPLATES["train"]}
    # a term with several synonyms: train and test name it differently
    tr, te = dx.term_names("HP:0001263", "train"), dx.term_names("HP:0001263", "test")
    assert tr and te and not set(tr) & set(te)
    assert tr[0] == "global developmental delay"  # the HPO label, lay-cased
    assert "we describe" not in "\n".join(test_split.texts()).lower()


def test_frequencies_are_respected():
    # a disease with both very frequent (0.9) and occasional (0.17) features
    d = next(
        d for d in dx.panel_diseases(300)
        if sum(f == 0.9 for _, f in d.features) >= 5 and sum(f == 0.17 for _, f in d.features) >= 5
    )
    rng = random.Random(0)
    seen: Counter = Counter()
    n = 300
    for _ in range(n):
        case = dx.sample_case(d.database_id, rng, "train", k_range=(60, 60))  # no cap: pure frequency sampling
        seen.update(case.feature_ids)
    freq = dict(d.features)
    very = [seen[h] / n for h, f in freq.items() if f == 0.9]
    occ = [seen[h] / n for h, f in freq.items() if f == 0.17]
    assert 0.75 < sum(very) / len(very) <= 1.0
    assert 0.05 < sum(occ) / len(occ) < 0.35


def test_excluded_features_become_negations():
    d = next(d for d in dx.panel_diseases() if len(d.excluded) >= 2)
    rng = random.Random(1)
    names = {n for h in d.excluded for n in dx.term_names(h, "train")}
    negs = [neg for _ in range(60) for neg in dx.sample_case(d.database_id, rng, "train").negatives]
    assert any(any(n in neg for n in names) for neg in negs)


def test_sex_specific_features_match_the_patient():
    rng = random.Random(5)
    for d in dx.panel_diseases(400):
        prep = dx._prepared(d.database_id)
        if not prep.sex_of_feature:
            continue
        case = dx.sample_case(d.database_id, rng, "train")
        for h in case.feature_ids:
            assert prep.sex_of_feature.get(h, case.sex) == case.sex


def test_frequency_parsing():
    assert hpo.parse_frequency("HP:0040280") == 1.0
    assert hpo.parse_frequency("HP:0040281") == 0.9
    assert hpo.parse_frequency("HP:0040283") == 0.17
    assert hpo.parse_frequency("3/4") == 0.75
    assert hpo.parse_frequency("25%") == 0.25
    assert hpo.parse_frequency("") == hpo.MISSING_FREQUENCY
    assert hpo.parse_frequency("1/0") == hpo.MISSING_FREQUENCY
    assert hpo.parse_frequency("garbage") == hpo.MISSING_FREQUENCY


def test_lay_phrasing():
    assert dx.lay("Abnormality of the kidney") == "abnormal kidney"
    assert dx.lay("Global developmental delay") == "global developmental delay"
    assert dx.lay("Elevated circulating IgE level") == "elevated circulating IgE level"


def test_determinism():
    a = dx.generate(2, seed=7, split="test", max_diseases=30)
    b = dx.generate(2, seed=7, split="test", max_diseases=30)
    c = dx.generate(2, seed=8, split="test", max_diseases=30)
    assert a.sha256() == b.sha256() != c.sha256()


def test_background_phenotypes_for_the_protocol_generator():
    terms = dx.background_phenotypes(random.Random(0), "train", k=4)
    assert 1 <= len(terms) <= 4 and all(isinstance(t, str) and t for t in terms)
