"""``python -m training pipeline`` and ``methods``: every stage runs on a tiny model (LoRA teacher,
distillation into a shallower student, structured pruning with recovery, int8 export, report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import ModelRegistry
from models.runtime import TextClassifier

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

# two layers so that distillation has somewhere to go; small data so the whole run takes ~1 minute
ALL_STAGES = {
    "num_layers": 2,
    "method": "lora",
    "lr": 3e-3,
    "student_layers": 1,
    "distill_epochs": 1.0,
    "prune_heads": 0.25,
    "prune_ffn": 0.5,
    "recovery_epochs": 1.0,
    "baseline": True,
    "baseline_max_train": 150,
    "latency_n": 20,
}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from training.pipeline import run_pipeline
    from training.profiles import Profile, resolve_profile

    root = tmp_path_factory.mktemp("pipeline-registry")
    profile = {"protocol": Profile.from_values({**ALL_STAGES, "name": "custom"}, base=resolve_profile("tiny", "protocol"))}
    dest, row = run_pipeline("protocol", root, profile=profile, seed=0, progress=False)
    return root, dest, row


def test_every_stage_ran_and_was_timed(pipeline_run):
    _, dest, row = pipeline_run
    manifest = json.loads((dest / "manifest.json").read_text())
    stages = manifest["metrics"]["stage_seconds"]
    # "register" is timed after the manifest is written; the summary row carries the total
    assert list(stages) == ["data", "train", "distill", "prune", "lexical", "export", "quantize", "calibrate",
                            "evaluate"]
    training = manifest["training"]
    assert training["method"] == "lora" and training["trainable_parameters"] > 0
    assert training["distill"]["teacher_layers"] == [0, 3] and training["distill"]["student_layers"] == 1
    assert training["prune"]["params_after"] < training["prune"]["params_before"]
    assert training["layers"] == [0]
    lexical = training["lexical"]
    assert lexical["dim"] == 32 and lexical["steps"] > 0 and lexical["used"] == (lexical["mix"] > 0)
    assert ("Lexical branch:" in (dest / "MODEL_CARD.md").read_text()) == lexical["used"]
    assert row["method"] == "lora" and row["train_seconds"] > 0


def test_the_compressed_model_is_registered_verified_and_serves(pipeline_run):
    root, dest, _ = pipeline_run
    reg = ModelRegistry(root)
    assert reg.current_dir("protocol") == dest
    manifest = reg.verify("protocol")  # the report files are checksummed with the model
    assert any(name.startswith("report/") for name in manifest.files)
    clf = TextClassifier.load(dest)
    out = clf.predict(["CT head after fall on warfarin, r/o bleed"], top_k=3)[0]
    assert len(out.predictions) == 3 and 0.0 <= out.predictions[0].probability <= 1.0


def test_report_holds_rare_class_f1_pngs_and_the_baseline_comparison(pipeline_run):
    _, dest, _ = pipeline_run
    report_dir = dest / "report"
    for name in ("REPORT.md", "report.json", "confusion.png", "reliability.png", "COMPARISON.md"):
        assert (report_dir / name).is_file() and (report_dir / name).stat().st_size > 0, name
    assert (report_dir / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((report_dir / "report.json").read_text())
    assert 0.0 <= report["rare_f1"] <= 1.0 and report["rare"]["n_classes"] >= 1
    assert report["p95_ms"] >= report["p50_ms"] > 0 and report["peak_rss_mb"] > 0
    metrics = json.loads((dest / "manifest.json").read_text())["metrics"]
    assert metrics["test"]["int8"]["rare_f1"] == pytest.approx(report["rare_f1"], abs=1e-9)
    models = [r["model"] for r in metrics["comparison"]]
    assert models[0] == "general base model fp32" and "int8" in models[1]
    comparison = (report_dir / "COMPARISON.md").read_text()
    assert "general base model fp32" in comparison and "rare" in comparison.lower()


def test_cli_pipeline_and_methods(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "training"]
    sets = ["--set", "n_train=340", "--set", "max_steps=30", "--set", "latency_n=10", "--set", "report=false"]
    run = subprocess.run(base + ["pipeline", "--task", "protocol", "--profile", "tiny", "--registry", str(tmp_path / "r"),
                                 "--quiet", "--not-current", *sets],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    task, path = run.stdout.strip().splitlines()[-1].split("\t")
    assert task == "protocol" and Path(path).is_dir()
    assert not (tmp_path / "r" / "protocol" / "CURRENT").exists()

    out = tmp_path / "methods.md"
    run = subprocess.run(base + ["methods", "--task", "protocol", "--profile", "tiny", "--registry", str(tmp_path / "m"),
                                 "--only", "full,pruned", "--out", str(out), "--quiet", *sets],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    table = out.read_text()
    for needle in ("| full ", "| pruned ", "rare", "p50"):
        assert needle in table, needle


def test_cli_rejects_an_unknown_method(tmp_path):
    run = subprocess.run([sys.executable, "-m", "training", "methods", "--task", "protocol", "--only", "magic",
                          "--registry", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown method" in run.stderr and "qlora-4bit" in run.stderr


def test_fractional_passes_train_on_a_fixed_random_sample():
    from training.stages import sample_indices as _sample

    picked = _sample(1000, 0.25, 32, seed=0)
    assert len(picked) == 250 and picked == sorted(set(picked)) and picked == _sample(1000, 0.25, 32, seed=0)
    assert picked != list(range(250)) and _sample(1000, 0.25, 32, seed=1) != picked
    assert len(_sample(40, 0.1, 32, seed=0)) == 32  # at least one batch
    assert _sample(10, 0.5, 32, seed=0) == list(range(10))
