"""Phenotype concept recognition (models.phenotypes) on known sentences: terms, negation, family history,
suspicion scopes, spans; and the ``ehr-worker phenotypes`` command."""

from __future__ import annotations

import json

import pytest

from models.phenotypes import (
    EXCLUDED,
    FAMILY,
    PRESENT,
    UNCERTAIN,
    lexicon_key,
    normalise_token,
    patient_terms,
)


def statuses(recognizer, text: str) -> dict[str, str]:
    return {m.code: m.status for m in recognizer.recognise(text)}


def test_normalisation_joins_spellings_forms_and_word_order():
    assert normalise_token("Oedema") == normalise_token("edema")
    assert normalise_token("haemorrhage") == normalise_token("hemorrhage")
    assert normalise_token("hypoplastic") == normalise_token("hypoplasia")
    assert normalise_token("seizures") == normalise_token("seizure")
    assert lexicon_key("Hypoplasia of the corpus callosum") == lexicon_key("corpus callosum hypoplasia")
    assert lexicon_key("hypoplastic corpus callosum") == lexicon_key("Hypoplasia of the corpus callosum")


def test_case_report_terms_and_spans(dx_model):
    text = ("We report a 4-year-old boy with global developmental delay, hypotonia and seizures. "
            "Examination showed microcephaly, hypertelorism and low-set ears.")
    mentions = dx_model.recognizer.recognise(text)
    found = {m.code: m for m in mentions}
    for code in ("HP:0001263", "HP:0001252", "HP:0001250", "HP:0000252", "HP:0000316", "HP:0000369"):
        assert code in found and found[code].status == PRESENT
    m = found["HP:0000369"]
    assert text[m.start : m.end] == "low-set ears"
    assert found["HP:0001250"].label == "Seizure"


@pytest.mark.parametrize(
    "text, code, status",
    [
        ("There was no hepatosplenomegaly.", "HP:0001433", EXCLUDED),
        ("He denies seizures.", "HP:0001250", EXCLUDED),
        ("Negative for hearing loss.", "HP:0000365", EXCLUDED),
        ("No seizures, ataxia or hearing loss.", "HP:0001251", EXCLUDED),  # a list after "No"
        ("Absence of scoliosis was confirmed.", "HP:0002650", EXCLUDED),
        ("Hepatosplenomegaly was not observed.", "HP:0001433", EXCLUDED),
        ("No hepatomegaly but she had short stature.", "HP:0004322", PRESENT),  # "but" ends the scope
        ("No hepatomegaly but she had short stature.", "HP:0002240", EXCLUDED),
        ("His brother had cleft palate.", "HP:0000175", FAMILY),
        ("Family history is notable for seizures in an uncle.", "HP:0001250", FAMILY),
        ("MRI to rule out hydrocephalus.", "HP:0000238", UNCERTAIN),
        ("Differential diagnosis included scoliosis.", "HP:0002650", UNCERTAIN),
        ("She has scoliosis. Her mother is healthy.", "HP:0002650", PRESENT),  # scope ends at the sentence
        ("CT chest ?pneumothorax, dyspnea", "HP:0002107", UNCERTAIN),  # an order's question mark suspects
        ("CT chest ?pneumothorax, dyspnea", "HP:0002094", PRESENT),
        ("Is this syndromic? He has scoliosis.", "HP:0002650", PRESENT),
    ],
)
def test_negation_family_and_suspicion_scopes(dx_model, text, code, status):
    assert statuses(dx_model.recognizer, text).get(code) == status


def test_only_the_patients_own_findings_are_ranked(dx_model):
    mentions = dx_model.recognizer.recognise(
        "Hypotonia. No seizures. His sister had scoliosis. Rule out hydrocephalus.")
    present, excluded = patient_terms(mentions)
    ids = dx_model.recognizer.ids
    assert [ids[t] for t in present] == ["HP:0001252"]
    assert [ids[t] for t in excluded] == ["HP:0001250"]


def test_labels_with_and_and_coordinated_findings(dx_model):
    text = "Delayed speech and language development, short and broad thumbs."
    found = {m.code: text[m.start : m.end] for m in dx_model.recognizer.recognise(text)}
    assert found["HP:0000750"] == "Delayed speech and language development"
    assert found["HP:0011304"] == "broad thumbs" and found["HP:0009778"] == "short and broad thumbs"


def test_only_phenotypic_abnormalities_count(dx_model):
    codes = statuses(dx_model.recognizer, "Autosomal dominant inheritance, childhood onset, hypotonia.")
    assert "HP:0000006" not in codes and "HP:0011463" not in codes
    assert codes.get("HP:0001252") == PRESENT


def test_phenotypes_command(dx_registry, tmp_path):
    from typer.testing import CliRunner

    from workers.cli import app

    src = tmp_path / "in.jsonl"
    text = "Seizures and hypotonia. No microcephaly."
    src.write_text(json.dumps({"id": "c1", "text": text}) + "\n")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["phenotypes", str(src), str(out), "--registry", str(dx_registry)])
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())
    assert row["id"] == "c1"
    by_code = {t["code"]: t for t in row["terms"]}
    assert by_code["HP:0000252"]["status"] == "excluded"
    start, end = by_code["HP:0001252"]["span"]
    assert text[start:end] == "hypotonia"
    assert set(by_code["HP:0001250"]) == {"code", "label", "status", "span"}
