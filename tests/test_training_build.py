"""The build pipeline end to end (tiny profile): what it publishes, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import Manifest, ModelRegistry
from schemas.catalog import PROTOCOLS
from schemas.tasks import TASKS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def manifests(tiny_registry) -> dict[str, Manifest]:
    reg = ModelRegistry(tiny_registry)
    return {task: reg.verify(task) for task in TASKS}


def test_registry_layout(tiny_registry, manifests):
    reg = ModelRegistry(tiny_registry)
    assert reg.tasks() == ["diagnosis", "protocol"]
    for task, manifest in manifests.items():
        folder = reg.current_dir(task)
        if task == "diagnosis":  # the torch-free phenotype ranker: see test_diagnosis_ranker_artefacts
            continue
        assert sorted(p.name for p in folder.iterdir()) == ["MODEL_CARD.md", "manifest.json", "model.onnx", "report",
                                                             "tokenizer.json"]
        assert {"report/REPORT.md", "report/confusion.png", "report/reliability.png"} <= set(manifest.files)
        assert manifest.task == task and manifest.version == folder.name
        assert manifest.name == f"ehrw-{task}"
        assert manifest.format_version == 1 and len(manifest.training_data_sha256) == 64
        assert manifest.base_model == "sentence-transformers/all-MiniLM-L6-v2"
        assert manifest.max_length == 64
        raw = json.loads((folder / "manifest.json").read_text())
        assert raw["created"].endswith("Z")
        tok = json.loads((folder / "tokenizer.json").read_text())
        assert tok["padding"] is None and tok["truncation"]["max_length"] == 64


def test_labels(manifests):
    protocol = manifests["protocol"]
    assert [label.display for label in protocol.labels] == [p.display for p in PROTOCOLS]
    assert [label.code for label in protocol.labels] == [p.code for p in PROTOCOLS]
    diagnosis = manifests["diagnosis"]  # every annotated disease, OMIM first, each once
    assert diagnosis.num_labels > 10_000
    assert all(label.system in ("http://www.omim.org", "http://www.orpha.net") for label in diagnosis.labels)
    assert diagnosis.labels[0].code.startswith("OMIM:") and diagnosis.labels[-1].code.startswith("ORPHA:")
    assert len({label.code for label in diagnosis.labels}) == diagnosis.num_labels


def test_diagnosis_ranker_artefacts(tiny_registry, manifests):
    reg = ModelRegistry(tiny_registry)
    folder = reg.current_dir("diagnosis")
    manifest = manifests["diagnosis"]
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["kind"] == "hpo-ranker" and raw["hpo_release"] == "2023-01-27" and raw["hpo_vendored"] is True
    assert {"hpo_terms.json", "hpo_graph.npz", "diseases.json", "lexicon.json", "ranker.json", "MODEL_CARD.md",
            "report/REPORT.md", "report/metrics.json"} <= set(manifest.files)
    m = manifest.metrics
    assert m["coverage"]["diseases"] == manifest.num_labels
    for key in ("model", "resnik", "resnik_true_terms"):
        assert 0.0 <= m["all"][key]["top1"] <= m["all"][key]["top10"] <= 1.0
    assert 0.0 <= m["gate_accept_rate_ordinary"] <= 1.0


def test_metrics_calibration_and_parity(manifests):
    for task, manifest in manifests.items():
        if task == "diagnosis":
            continue  # no fp32/int8 pair: see test_diagnosis_ranker_artefacts
        m = manifest.metrics
        for precision in ("fp32", "int8"):
            for key in ("accuracy", "macro_f1", "top3_accuracy", "top5_accuracy", "ece", "nll"):
                assert 0.0 <= m["test"][precision][key] or key == "nll"
        assert m["test"]["fp32"]["n"] == manifest.training["n_test"]
        # int8 is a faithful copy of fp32; 1-layer tiny models trained for seconds have small logit
        # margins, so the bar here is lower than for the default models (see test_training_finetune)
        assert m["test"]["int8_vs_fp32_top1_agreement"] >= 0.8, task
        assert abs(m["test"]["fp32"]["accuracy"] - m["test"]["int8"]["accuracy"]) <= 0.1, task
        assert m["size"]["int8_over_fp32"] <= 0.26
        assert m["latency_int8"]["threads"] == 1 and m["latency_int8"]["p50_ms"] > 0
        assert manifest.calibration.temperature > 0
        assert 0.0 <= manifest.calibration.abstain_below <= 1.0
        assert "coverage" in m["test"]["int8"]["selective"]
        assert manifest.training["train_steps"] > 0 and manifest.training["history"]
        assert list(m["stage_seconds"])[:2] == ["data", "train"]


def test_the_tiny_models_learned_something(manifests):
    # chance is 1/34 and 1/n_diseases; the tiny profile trains for seconds, so the bar is low
    assert manifests["protocol"].metrics["test"]["int8"]["top5_accuracy"] > 5 * 5 / 34
    diagnosis = manifests["diagnosis"]  # ranked over ~12,000 diseases: chance is 1 in 1,000 for the top 10
    assert diagnosis.metrics["all"]["model"]["top10"] > 0.3


def test_model_card(tiny_registry, manifests):
    for task, manifest in manifests.items():
        card = (ModelRegistry(tiny_registry).current_dir(task) / "MODEL_CARD.md").read_text()
        for section in ("## Intended use", "## Training data", "## Evaluation", "## Calibration and abstention",
                        "## Limitations", "## AI Transparency on FHIR", "AIAST"):
            assert section in card, (task, section)
        assert manifest.name in card and manifest.version in card
        if task == "diagnosis":
            assert "Human Phenotype Ontology" in card


def test_cli_builds_one_task_with_overrides(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    reg = tmp_path / "reg"
    proc = subprocess.run(
        [sys.executable, "-m", "training", "build", "--task", "protocol", "--profile", "tiny", "--registry", str(reg),
         "--seed", "1", "--set", "max_steps=4", "--set", "n_train=68", "--set", "latency_n=5", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    registry = ModelRegistry(reg)
    assert registry.tasks() == ["protocol"]
    manifest = registry.verify("protocol")
    assert manifest.training["train_steps"] == 4 and manifest.training["n_train"] == 68 and manifest.training["seed"] == 1
    assert proc.stdout.strip().startswith("protocol\t")


def test_cli_rejects_an_unknown_profile():
    proc = subprocess.run([sys.executable, "-m", "training", "build", "--profile", "huge"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown profile" in proc.stderr


def test_profiles_are_plain_values():
    from training.profiles import PROFILES

    assert set(PROFILES) >= {"default", "tiny"}
    json.dumps(PROFILES)
    default = PROFILES["default"]
    assert default["diagnosis"]["max_diseases"] >= 500
    assert default["protocol"]["num_layers"] <= 3 and default["diagnosis"]["num_layers"] <= 3


def test_cli_rejects_an_unknown_profile_key_naming_the_close_match():
    proc = subprocess.run([sys.executable, "-m", "training", "build", "--profile", "tiny", "--set", "nm_train=5"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown profile key 'nm_train'" in proc.stderr and "n_train" in proc.stderr


def test_named_profiles_override_one_set_of_defaults():
    from training.profiles import PROFILE_KEYS, PROFILES, Profile, resolve_profile

    for name, tasks in PROFILES.items():
        for task, values in tasks.items():
            assert list(values) == list(PROFILE_KEYS) and values["name"] == name, (name, task)
    tuned = Profile.from_values({"lr": 1}, base=resolve_profile("tiny", "protocol"))
    assert tuned.lr == 1.0 and isinstance(tuned.lr, float) and tuned.max_steps == 80 and tuned.name == "tiny"
    with pytest.raises(KeyError, match="did you mean recovery_lr"):
        Profile.from_values({"recovery_lrr": 1e-4})


def test_every_profile_key_is_documented():
    from training.profiles import PROFILE_KEYS

    doc = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    assert [key for key in PROFILE_KEYS if f"| `{key}` |" not in doc] == []
