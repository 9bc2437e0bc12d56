"""User-labelled files: JSONL, CSV/TSV, FHIR NDJSON; clear errors; stratified split."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from schemas.catalog import OMIM_SYSTEM, PROTOCOL_SYSTEM, PROTOCOLS
from schemas.text import build_model_input
from training.datasets import LabelledOrder, stratified_split
from training.datasets.common import Dataset
from training.datasets.diagnosis import disease_panel
from training.datasets.loaders import LABEL_EXTENSION_URL, DatasetFormatError, load_labelled_file


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _sr(id_, **extra):
    sr = {"resourceType": "ServiceRequest", "id": id_, "status": "active", "intent": "order",
          "subject": {"reference": "Patient/1"}, "note": [{"text": "RLQ pain, r/o appendicitis"}]}
    sr.update(extra)
    return sr


def test_jsonl_text_rows(tmp_path):
    p = _write(tmp_path, "orders.jsonl", "\n".join([
        json.dumps({"text": "RLQ pain r/o appendicitis", "label": "CT-ABDPEL-W"}),
        "",
        json.dumps({"id": "x9", "text": "worst headache of life", "label": "ct head WITHOUT contrast", "group": "site-a"}),
    ]) + "\n")
    ds = load_labelled_file(p, task="protocol")
    assert [i.label for i in ds.items] == ["CT-ABDPEL-W", "CT-HEAD-WO"]
    assert [lab.code for lab in ds.labels] == [p.code for p in PROTOCOLS]
    assert ds.texts()[0] == "note: RLQ pain r/o appendicitis"
    assert ds.items[1].service_request["id"] == "x9" and ds.items[1].group == "site-a"
    assert ds.items[0].group == "file:orders.jsonl"
    assert ds.label_ids() == [7, 0]


def test_csv_and_tsv(tmp_path):
    p = _write(tmp_path, "orders.csv", 'text,label\n"cough, fever",XR-CHEST-2V\nflank pain hematuria,CT-ABDPEL-WO-STONE\n\n')
    ds = load_labelled_file(p, task="protocol")
    assert [i.label for i in ds.items] == ["XR-CHEST-2V", "CT-ABDPEL-WO-STONE"]
    assert "cough, fever" in ds.texts()[0]
    t = _write(tmp_path, "dx.tsv", "Label\tText\nOMIM:154700\ttall, aortic root dilatation, lens dislocation\n")
    dd = load_labelled_file(t, task="diagnosis")
    assert dd.items[0].label == "OMIM:154700"
    assert dd.labels[0].system == OMIM_SYSTEM and dd.labels[0].code == "154700"
    assert dd.labels[0].display == "Marfan syndrome"


def test_fhir_ndjson_label_sources_and_label_removed(tmp_path):
    detail = _sr("a", orderDetail=[{"coding": [{"system": PROTOCOL_SYSTEM, "code": "CT-ABDPEL-W"}]}])
    code = _sr("b", code={"coding": [{"system": PROTOCOL_SYSTEM, "code": "US-RUQ", "display": "US right upper quadrant"}],
                          "text": "US abdomen"})
    ext = _sr("c", extension=[{"url": LABEL_EXTENSION_URL,
                               "valueCoding": {"system": PROTOCOL_SYSTEM, "code": "XR-CHEST-2V"}}])
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": _sr("d", orderDetail=[{"coding": [{"system": PROTOCOL_SYSTEM, "code": "NM-BONE"}]}])}]}
    p = _write(tmp_path, "orders.ndjson", "\n".join(json.dumps(x) for x in (detail, code, ext, bundle)) + "\n")
    ds = load_labelled_file(p, task="protocol")
    assert [i.label for i in ds.items] == ["CT-ABDPEL-W", "US-RUQ", "XR-CHEST-2V", "NM-BONE"]
    texts = ds.texts()
    assert "orderDetail" not in ds.items[0].service_request
    assert "US right upper quadrant" not in texts[1] and texts[1].startswith("order: US abdomen")
    assert "extension" not in ds.items[2].service_request
    assert all("RLQ pain" in t for t in texts)


def test_fhir_ndjson_diagnosis_label(tmp_path):
    sr = _sr("a", orderDetail=[{"coding": [{"system": OMIM_SYSTEM, "code": "154700"}]}])
    p = _write(tmp_path, "dx.ndjson", json.dumps(sr) + "\n")
    ds = load_labelled_file(p, task="diagnosis")
    assert ds.items[0].label == "OMIM:154700"
    forced = load_labelled_file(p, task="diagnosis", labels=disease_panel(600))
    assert len(forced.labels) == 600 and forced.label_ids()[0] == forced.label_keys().index("OMIM:154700")


@pytest.mark.parametrize(
    "name,content,task,message",
    [
        ("a.jsonl", '{"text": "x", "label": "XR-CHEST-2V"}\n{not json\n', "protocol", r"a\.jsonl:2: not valid JSON"),
        ("b.jsonl", '{"text": "x"}\n', "protocol", r"b\.jsonl:1: missing key\(s\) label"),
        ("c.jsonl", '{"text": "x", "label": "CT ELBOW"}\n', "protocol", r"c\.jsonl:1: unknown protocol 'CT ELBOW'"),
        ("d.jsonl", '{"text": "", "label": "XR-CHEST-2V"}\n', "protocol", r"d\.jsonl:1: 'text' is missing or empty"),
        ("e.jsonl", '[1, 2]\n', "protocol", r"e\.jsonl:1: expected a JSON object"),
        ("f.csv", "note,label\nx,XR-CHEST-2V\n", "protocol", r"f\.csv:1: header must have 'text' and 'label'"),
        ("g.csv", "text,label\nx,XR-CHEST-2V\ny,XR-CHEST-2V,extra\n", "protocol", r"g\.csv:3: row has 3 fields"),
        ("h.jsonl", "\n\n", "protocol", r"h\.jsonl: no labelled examples"),
        ("i.ndjson", json.dumps(_sr("z")) + "\n", "protocol", r"i\.ndjson:1: ServiceRequest 'z' has no protocol label"),
        ("j.ndjson", '{"resourceType": "Patient", "id": "p"}\n', "protocol", r"j\.ndjson:1: resourceType 'Patient'"),
        ("k.jsonl", '{"text": "x", "label": "MIM:1234"}\n', "diagnosis", r"k\.jsonl:1: not a disease id"),
        ("l.xml", "<x/>", "protocol", r"l\.xml: unknown file type"),
    ],
)
def test_errors_name_file_and_line(tmp_path, name, content, task, message):
    p = _write(tmp_path, name, content)
    with pytest.raises(DatasetFormatError, match=message):
        load_labelled_file(p, task=task)


def test_missing_file_and_unknown_label_for_given_space(tmp_path):
    with pytest.raises(DatasetFormatError, match="no such file"):
        load_labelled_file(tmp_path / "nope.jsonl", task="protocol")
    p = _write(tmp_path, "x.jsonl", json.dumps({"text": "x", "label": "OMIM:100050"}) + "\n")
    with pytest.raises(DatasetFormatError, match="not in the given label space"):
        load_labelled_file(p, task="diagnosis", labels=disease_panel(10))


def test_stratified_split():
    labels = [f"L{i}" for i in range(5)]
    items = [LabelledOrder({"resourceType": "ServiceRequest", "id": f"{lab}-{k}", "note": [{"text": lab}]}, lab, "g")
             for i, lab in enumerate(labels) for k in range(3 + 7 * i)]
    from schemas.labels import Label

    ds = Dataset(items, [Label("s", lab, lab) for lab in labels])
    tr, va, te = stratified_split(ds, (0.8, 0.1, 0.1), seed=1)
    assert len(tr) + len(va) + len(te) == len(ds)
    ids = [i.service_request["id"] for d in (tr, va, te) for i in d.items]
    assert len(set(ids)) == len(ds)
    for part in (tr, va, te):
        assert set(part.label_counts()) == set(labels)  # every label (>= 3 items) in every part
    big = Counter(i.label for i in tr.items)["L4"]
    assert 23 <= big <= 26
    again = stratified_split(ds, (0.8, 0.1, 0.1), seed=1)
    assert [i.service_request["id"] for i in again[1].items] == [i.service_request["id"] for i in va.items]
    assert build_model_input(tr.items[0].service_request).startswith("note: ")
