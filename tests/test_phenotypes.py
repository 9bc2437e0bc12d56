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


@pytest.mark.parametrize(
    "text, code",
    [
        ("His height was 192 cm (+3.1 SD).", "HP:0000098"),
        ("Short stature (height -2.8 SD) was noted.", "HP:0004322"),
        ("Her occipitofrontal circumference was -2.2 SD.", "HP:0000252"),
        ("Head circumference was above the 98th centile.", "HP:0000256"),
        ("Formal testing gave a full-scale IQ of 55.", "HP:0001256"),
        ("The platelet count was 62 x 10^9/L.", "HP:0001873"),
        ("Serum creatine kinase was markedly elevated at 18,000 U/L.", "HP:0003236"),
        ("The sweat chloride concentration was 98 mmol/L.", "HP:0012236"),
    ],
)
def test_measurements_stated_as_numbers(dx_model, text, code):
    assert statuses(dx_model.recognizer, text).get(code) == PRESENT


def test_numbers_in_range_are_no_finding(dx_model):
    codes = statuses(dx_model.recognizer, "Height -0.5 SD, IQ of 102, platelet count 250 x 10^9/L, CK 120 U/L.")
    assert not {"HP:0004322", "HP:0000098", "HP:0001249", "HP:0001256", "HP:0001873", "HP:0003236"} & set(codes)


def test_a_measurement_in_a_relative_is_not_the_patients(dx_model):
    assert statuses(dx_model.recognizer, "His father's height is -3 SD.").get("HP:0004322") == FAMILY


@pytest.mark.parametrize(
    "text, code",
    [
        ("Deep tendon reflexes were absent.", "HP:0001284"),  # the cue is part of the term: Areflexia
        ("Serum calcium was elevated.", "HP:0003072"),  # Hypercalcemia, laboratory word order
        ("She had hypermobile joints.", "HP:0001382"),  # adjective form
        ("He was clumsy.", "HP:0002312"),
        ("The hands and feet were small; she had small hands and feet.", "HP:0001773"),  # "small feet"
        ("A long smooth philtrum.", "HP:0000343"),  # stacked adjectives: long philtrum
        ("Soft, velvety, hyperextensible skin.", "HP:0000977"),  # comma list: soft skin
        ("Continuous hand-wringing movements.", "HP:0012171"),
    ],
)
def test_case_report_wording(dx_model, text, code):
    assert statuses(dx_model.recognizer, text).get(code) == PRESENT, text


def test_reflexes_denied_stay_excluded(dx_model):
    assert statuses(dx_model.recognizer, "There was no areflexia.").get("HP:0001284") == EXCLUDED
