"""A hospital's own protocol catalog: loading it, and a round trip through training, the registry,
``ehr-worker predict`` and the Task written back (tiny profile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.catalog import LOCAL_PROTOCOL_SYSTEM, load_protocol_catalog, protocol_codesystem

SYSTEM = "https://hospital.example/fhir/CodeSystem/rad-protocols"
CSV = f"""code,display,modality,region,contrast,system,examples
RAD-CTH,CT Head Routine,CT,head,none,{SYSTEM},head injury|fall with head strike|acute confusion
RAD-CHESTPE,CT Chest PE Study,CT,chest,with,{SYSTEM},shortness of breath r/o PE|pleuritic chest pain D-dimer positive
RAD-MRB-MS,MRI Brain MS Protocol,MR,brain,with-and-without,{SYSTEM},multiple sclerosis follow up|optic neuritis
RAD-CXR,Chest Radiograph PA and Lateral,XR,chest,n/a,{SYSTEM},cough and fever|pneumonia
RAD-LSP,MRI Lumbar Spine Routine,MR,lumbar-spine,none,{SYSTEM},low back pain with sciatica|radiculopathy
RAD-THY,Thyroid Sonogram,US,neck,n/a,{SYSTEM},thyroid nodule|goiter
"""


def test_load_csv_and_codesystem(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text(CSV, encoding="utf-8")
    catalog = load_protocol_catalog(path)
    assert catalog.system == SYSTEM and len(catalog.protocols) == 6
    assert catalog.protocols[2].contrast == "with-and-without" and catalog.examples["RAD-CXR"] == ("cough and fever", "pneumonia")
    # the default catalog's own CodeSystem loads as a catalog too
    cs = tmp_path / "cs.json"
    cs.write_text(json.dumps(protocol_codesystem()), encoding="utf-8")
    default = load_protocol_catalog(cs)
    assert default.is_default
    # a CSV with no system column gets the local system
    (tmp_path / "nosys.csv").write_text("code,display,modality,region,contrast\nA,CT A,CT,head,none\nB,US B,US,neck,n/a\n")
    assert load_protocol_catalog(tmp_path / "nosys.csv").system == LOCAL_PROTOCOL_SYSTEM


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("code,display,modality,contrast\nA,x,CT,none\n", "missing column(s) region"),
        ("code,display,modality,region,contrast\nA,x,CAT,head,none\nB,y,CT,head,none\n", "modality 'CAT'"),
        ("code,display,modality,region,contrast\nA,x,CT,head,iv\nB,y,CT,head,none\n", "contrast 'iv'"),
        ("code,display,modality,region,contrast\nA,x,CT,head,none\nA,y,CT,head,none\n", "duplicate code(s) A"),
        ("code,display,modality,region,contrast\nA,x,CT,head,none\n", "at least 2 protocols"),
    ],
)
def test_bad_catalogs_are_refused_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_protocol_catalog(path)


def test_catalog_round_trip_train_predict_write_back(tmp_path):
    catalog_path = tmp_path / "my_protocols.csv"
    catalog_path.write_text(CSV, encoding="utf-8")
    registry = tmp_path / "registry"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    small = ["--set", "n_train=360", "--set", "n_val=60", "--set", "n_test=60", "--set", "max_steps=40",
             "--set", "report=false", "--set", "latency_n=5", "--set", "lexical_epochs=2"]
    run = subprocess.run([sys.executable, "-m", "training", "pipeline", "--task", "protocol", "--profile", "tiny",
                          "--catalog", str(catalog_path), "--registry", str(registry), "--quiet", *small],
                         check=False, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]

    from models.registry import ModelRegistry
    from models.runtime import TextClassifier

    model = TextClassifier.load(ModelRegistry(registry).current_dir("protocol"))
    assert [(lab.system, lab.code) for lab in model.labels] == [(SYSTEM, c) for c in
                                                                ("RAD-CTH", "RAD-CHESTPE", "RAD-MRB-MS", "RAD-CXR", "RAD-LSP", "RAD-THY")]
    # ehr-worker predict on ServiceRequest NDJSON: only the ordered exam's protocols, hospital codes
    orders = [
        {"resourceType": "ServiceRequest", "id": "a", "status": "active", "intent": "order", "subject": {"reference": "Patient/p"},
         "code": {"text": "MRI spine"}, "note": [{"text": "low back pain radiating down the leg"}]},
        {"resourceType": "ServiceRequest", "id": "b", "status": "active", "intent": "order", "subject": {"reference": "Patient/p"},
         "code": {"text": "CT CHEST W CONTRAST"}, "note": [{"text": "tachycardic, hypoxic, r/o PE"}]},
    ]
    src = tmp_path / "orders.ndjson"
    src.write_text("\n".join(json.dumps(o) for o in orders) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "workers.cli", "predict", "--task", "protocol", "--top-k", "3",
                          "--registry", str(registry), str(src), str(out)], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    positive = [[p["code"] for p in line["predictions"] if p["probability"] > 0] for line in lines]
    assert positive[0] == ["RAD-LSP"] and positive[1] == ["RAD-CHESTPE"]
    assert all(p["system"] == SYSTEM for line in lines for p in line["predictions"])

    # the Task written back carries the hospital's code and system
    from schemas.text import build_model_input
    from schemas.writeback import build_writeback_bundle

    weights = model.order_weights([orders[1]])
    (output,) = model.predict([build_model_input(orders[1])], top_k=3, weights=weights)
    bundle = build_writeback_bundle(orders[1], output, None, recorded=datetime(2026, 1, 1, tzinfo=UTC))
    (task,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Task"]
    coding = task["input"][0]["valueCodeableConcept"]["coding"][0]
    assert (coding["system"], coding["code"]) == (SYSTEM, "RAD-CHESTPE")


def test_catalog_option_refuses_a_bad_file_clearly(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("code,display\nA,b\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "training", "pipeline", "--task", "protocol", "--profile", "tiny",
                          "--catalog", str(bad), "--registry", str(tmp_path / "r")], check=False, capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 2 and "missing column(s)" in run.stderr
