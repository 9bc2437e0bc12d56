"""The evaluation report: per-class and rare-class metrics on hand-made labels, the figures, the
markdown tables, the report of a tiny registry model, its serving footprint and the general baseline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models import ModelRegistry
from training.baseline import general_baseline, stratified_subsample
from training.calibrate import expected_calibration_error
from training.evaluate import (
    macro_f1_over,
    peak_rss_mb,
    per_class_metrics,
    rare_class_f1,
    rare_classes,
    reliability_bins,
)
from training.plots import (
    confusion_matrix_png,
    most_confused_classes,
    reliability_diagram_png,
    shown_confusion,
)
from training.report import comparison_table, evaluation_report, method_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, path


# ---------------------------------------------------------------------------------------------
# metrics on hand-made labels


def test_per_class_metrics_known_answer():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    rows = per_class_metrics(y_true, y_pred, ["a", "b", "c", "d"], train_support=[10, 20, 30, 0])
    assert [r["label"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["support"] for r in rows] == [2, 2, 2, 0]
    assert [r["predicted"] for r in rows] == [2, 3, 1, 0]
    assert [r["train_support"] for r in rows] == [10, 20, 30, 0]
    assert rows[0]["precision"] == pytest.approx(0.5) and rows[0]["recall"] == pytest.approx(0.5)
    assert rows[1]["precision"] == pytest.approx(2 / 3) and rows[1]["recall"] == 1.0
    assert rows[1]["f1"] == pytest.approx(0.8)
    assert rows[2]["precision"] == 1.0 and rows[2]["f1"] == pytest.approx(2 / 3)
    assert [r["evaluated"] for r in rows] == [True, True, True, False]  # "d": no examples, no predictions
    assert per_class_metrics(y_true, y_pred, ["a", "b", "c"])[0]["train_support"] is None


def test_rare_classes_are_the_bottom_fraction_by_support():
    assert rare_classes([50, 40, 30, 5, 3]).tolist() == [4]  # k = ceil(0.2 * 5) = 1
    assert rare_classes([50, 40, 30, 5, 3], fraction=0.4).tolist() == [3, 4]
    assert rare_classes([10, 3, 3, 8, 9]).tolist() == [1, 2]  # ties at the cutoff are all in
    assert rare_classes([0, 7, 7, 7, 7]).tolist() == [0]  # a class never seen in training is the rarest
    assert len(rare_classes(np.arange(34) + 1)) == 7  # ceil(6.8)
    assert rare_classes([]).tolist() == []
    with pytest.raises(ValueError):
        rare_classes([1, 2, 3], fraction=0.0)


def test_rare_class_f1_on_a_known_confusion():
    support = [50, 40, 30, 5, 3]  # training support: class 4 is rare (fraction 0.2), 3 and 4 at 0.4
    y_true = [0, 0, 0, 3, 3, 4, 4]
    y_pred = [0, 0, 4, 3, 3, 4, 1]  # class 4: TP 1, FP 1, FN 1 -> F1 0.5; class 3: F1 1
    assert rare_class_f1(y_true, y_pred, support) == pytest.approx(0.5)
    assert rare_class_f1(y_true, y_pred, support, fraction=0.4) == pytest.approx(0.75)
    # a rare class with neither test examples nor predictions has no F1: skipped, not counted as 0
    assert macro_f1_over([0, 1], [0, 1], [1, 2]) == 1.0
    assert math.isnan(macro_f1_over([0, 1], [0, 1], [2]))


def test_stratified_subsample_keeps_every_class_first():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 2 + [3])
    chosen = stratified_subsample(labels, 8, seed=1)
    assert len(chosen) == 8 and np.all(np.diff(chosen) > 0)
    assert set(labels[chosen]) == {0, 1, 2, 3}
    assert stratified_subsample(labels, None).tolist() == list(range(len(labels)))
    assert stratified_subsample(labels, 1000).tolist() == list(range(len(labels)))


# ---------------------------------------------------------------------------------------------
# figures


def random_predictions(num_classes: int, n: int, accuracy: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, size=n)
    y_pred = np.where(rng.random(n) < accuracy, y_true, rng.integers(0, num_classes, size=n))
    return y_true, y_pred


@pytest.mark.parametrize("num_classes", [5, 300])
def test_confusion_matrix_png(tmp_path, num_classes):
    y_true, y_pred = random_predictions(num_classes, 20 * num_classes, 0.7)
    labels = [f"OMIM:{100000 + i} a rare disease with a name far too long for a tick label" for i in range(num_classes)]
    path = confusion_matrix_png(y_true, y_pred, labels, tmp_path / "confusion.png", max_classes=40)
    assert_png(path)


def test_most_confused_classes_and_their_row_normalised_matrix():
    # class 2 and 3 are swapped every time; 0 and 1 are always right
    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4])
    y_pred = np.array([0, 0, 1, 1, 3, 3, 2, 2, 0])
    shown = most_confused_classes(y_true, y_pred, 5, 3)
    assert shown.tolist() == [0, 2, 3]  # 2 and 3 (4 errors each), then 0 and 4 (1 each): 0 has more examples
    matrix = shown_confusion(y_true, y_pred, shown, 5)
    assert matrix.shape == (3, 4)  # + "(other)"
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    assert matrix[1, 2] == 1.0 and matrix[2, 1] == 1.0  # true 2 -> predicted 3, true 3 -> predicted 2
    assert most_confused_classes(y_true, y_pred, 5, 40).tolist() == [0, 1, 2, 3, 4]


def test_reliability_diagram_png_and_bins_match_the_ece(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y_true = rng.integers(0, 6, size=500)
    assert_png(reliability_diagram_png(probs, y_true, tmp_path / "reliability.png"))
    bins = reliability_bins(probs, y_true, 15)
    assert bins["count"].sum() == 500
    has = bins["count"] > 0
    ece = np.sum(bins["count"][has] / 500 * np.abs(bins["accuracy"][has] - bins["confidence"][has]))
    assert ece == pytest.approx(expected_calibration_error(probs, y_true, 15))


# ---------------------------------------------------------------------------------------------
# markdown tables


def test_comparison_and_method_tables_hold_every_row_and_column():
    comparison = comparison_table([
        {"model": "general base model fp32", "accuracy": 0.61, "macro_f1": 0.52, "rare_f1": 0.3, "p50_ms": 12.3,
         "p95_ms": 20.1, "size_mb": 90.4, "peak_rss_mb": 245.0},
        {"model": "fine-tuned compressed model (int8)", "accuracy": 0.73, "macro_f1": 0.7, "rare_f1": None,
         "p50_ms": 2.5, "p95_ms": 4.0, "size_mb": 13.8},
    ])
    lines = comparison.splitlines()
    assert len(lines) == 4 and lines[1].count("---") == 8
    for header in ("model", "accuracy", "macro-F1", "rare-F1", "p50 ms", "p95 ms", "size MB", "peak RSS MB"):
        assert header in lines[0]
    assert "general base model fp32" in lines[2] and "0.6100" in lines[2] and "245.0" in lines[2]
    assert "fine-tuned compressed model (int8)" in lines[3] and lines[3].count("n/a") == 2

    methods = method_table([
        {"method": "full fine-tune", "accuracy": 0.7, "macro_f1": 0.6, "rare_f1": 0.5, "int8_size_mb": 13.8,
         "p50_ms": 2.5, "train_seconds": 300},
        {"method": "LoRA", "accuracy": 0.65, "macro_f1": 0.55, "rare_f1": 0.4, "int8_size_mb": 13.8,
         "p50_ms": 2.5, "train_seconds": 120.4},
        {"method": "distilled | pruned"},
    ])
    lines = methods.splitlines()
    assert len(lines) == 5
    for header in ("method", "accuracy", "macro-F1", "rare-F1", "int8 size MB", "p50 ms", "training time s"):
        assert header in lines[0]
    assert "full fine-tune" in lines[2] and "| 300 |" in lines[2] and "| 120 |" in lines[3]
    assert "distilled \\| pruned" in lines[4] and lines[4].count("n/a") == 6


# ---------------------------------------------------------------------------------------------
# the report of a real (tiny) model


@pytest.fixture(scope="module")
def protocol_model(tiny_registry):
    """The tiny protocol model and the test set and training support it was built with."""
    from training.datasets import protocol

    reg = ModelRegistry(tiny_registry)
    manifest = reg.verify("protocol")
    folder = reg.current_dir("protocol")
    test = protocol.generate(manifest.training["n_test"], seed=manifest.training["seed"], split="test")
    train = protocol.generate(manifest.training["n_train"], seed=manifest.training["seed"], split="train")
    return {
        "folder": folder,
        "manifest": manifest,
        "texts": test.texts(),
        "y": test.label_ids(),
        "train_support": np.bincount(train.label_ids(), minlength=len(train.labels)),
        "labels": [label.code for label in manifest.labels],
    }


def test_evaluation_report_of_the_tiny_protocol_model(protocol_model, tmp_path):
    m = protocol_model
    folder, manifest = m["folder"], m["manifest"]
    out = tmp_path / "report"
    report = evaluation_report(
        folder / "model.onnx", folder / "tokenizer.json", manifest.max_length, m["texts"], m["y"], m["labels"], out,
        temperature=manifest.calibration.temperature, threshold=manifest.calibration.abstain_below,
        train_support=m["train_support"], latency_n=20, title="ehrw-protocol (tiny)",
        fp32_onnx_path=folder / "model.onnx",  # the registry keeps no fp32 export: the model stands in for it
    )
    for name in ("report.json", "REPORT.md"):
        assert (out / name).stat().st_size > 0
    assert_png(out / "confusion.png")
    assert_png(out / "reliability.png")
    assert json.loads((out / "report.json").read_text()) == report

    assert report["n"] == len(m["texts"]) and report["num_classes"] == 34
    # the same model and test set as the build: the same accuracy as the manifest
    assert report["accuracy"] == pytest.approx(manifest.metrics["test"]["int8"]["accuracy"])
    assert 0 < report["macro_f1"] <= 1 and 0 < report["weighted_f1"] <= 1
    assert report["top1_accuracy"] <= report["top3_accuracy"] <= report["top5_accuracy"] <= 1
    assert 0 <= report["ece_before"] <= 1 and 0 <= report["ece_after"] <= 1
    rare = report["rare"]
    assert rare["support_source"] == "train" and rare["n_classes"] >= 7 and len(rare["classes"]) == rare["n_classes"]
    assert all(m["train_support"][i] <= rare["cutoff_support"] for i in rare["indices"])
    assert report["rare_f1"] == rare["f1"] and (rare["f1"] is None or 0 <= rare["f1"] <= 1)
    assert report["selective"]["threshold"] == pytest.approx(manifest.calibration.abstain_below)
    assert report["latency"]["threads"] == 1 and 0 < report["p50_ms"] <= report["p95_ms"]
    assert report["size_bytes"] == (folder / "model.onnx").stat().st_size
    assert 0 < report["peak_rss_mb"] < 1000
    assert report["fp32"]["top1_agreement"] == 1.0 and report["fp32"]["int8_over_fp32"] == 1.0
    assert report["fp32"]["accuracy"] == report["accuracy"]
    assert len(report["per_class"]) == 34 and sum(r["support"] for r in report["per_class"]) == report["n"]

    markdown = (out / "REPORT.md").read_text()
    for part in ("## Headline metrics", "## Rare classes", "## The 15 worst classes", "](confusion.png)",
                 "](reliability.png)", "rare-class macro-F1", "peak RSS", "top-1 agreement with fp32"):
        assert part in markdown, part
    # class codes and numbers only: no example (patient) text in what is written
    written = markdown + (out / "report.json").read_text()
    assert not [t for t in m["texts"] if len(t) > 15 and t in written]


def test_peak_rss_is_the_fresh_serving_process_not_the_caller(protocol_model):
    m = protocol_model
    ballast = np.ones(300_000_000 // 8)  # 300 MB held here must not show up in the child's figure
    rss = peak_rss_mb(m["folder"] / "model.onnx", m["folder"] / "tokenizer.json", m["manifest"].max_length,
                      m["texts"][:40])
    assert ballast[-1] == 1.0
    assert 20 < rss < 300


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The number of unique classes:UserWarning")  # 40 examples, 34 classes
def test_general_baseline_on_a_few_texts(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from training.datasets import protocol

    train = protocol.generate(60, seed=0, split="train")
    test = protocol.generate(20, seed=0, split="test")
    result = general_baseline(None, train.texts(), train.label_ids(), test.texts(), test.label_ids(), num_classes=34,
                              max_length=64, max_train=40, latency_n=10, work_dir=tmp_path)
    for key in ("model", "accuracy", "macro_f1", "rare_f1", "top5_accuracy", "p50_ms", "p95_ms", "size_mb",
                "peak_rss_mb", "n_train", "fit_seconds"):
        assert key in result, key
    assert result["model"] == "general base model fp32"
    assert result["n_train"] == 40 and result["n_train_total"] == 60 and result["n"] == 20
    assert 0 <= result["accuracy"] <= result["top5_accuracy"] <= 1
    assert result["size_mb"] > 80  # all six fp32 MiniLM layers and the full embedding table
    assert result["latency"]["threads"] == 1 and result["p50_ms"] > 0
    assert 0 < result["peak_rss_mb"] < 1000
    assert (tmp_path / "base_encoder.fp32.onnx").is_file()  # kept in work_dir for the next baseline
    assert comparison_table([result]).count("general base model fp32") == 1
