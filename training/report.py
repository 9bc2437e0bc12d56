"""The evaluation report of one model, and the tables that compare models and methods.

``evaluation_report`` runs an exported ONNX classifier through :class:`models.runtime.OnnxTextEncoder`
(the serving code path) on a labelled test set and writes, into one folder:

- ``report.json``: headline metrics, rare-class metrics, calibration, per-class table, serving cost;
- ``REPORT.md``: the same for people (headline table, rare classes, the 15 worst classes, figures);
- ``confusion.png`` and ``reliability.png`` (``training.plots``).

Only class names/codes and numbers are written: never an example text (they may be patient text).
The metrics are ``training.evaluate``'s; the general-model reference is ``training.baseline``.
``comparison_table`` and ``method_table`` render rows of these results as markdown.

Serving cost is measured the way a worker pays it: latency on one thread for one order at a time
(``training.evaluate.latency``), and the peak resident memory of a fresh process that loads only the
ONNX model and runs texts (``training.evaluate.peak_rss_mb``), not of the training process that
computed the report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.runtime import OnnxTextEncoder, softmax
from training import evaluate as ev
from training.calibrate import expected_calibration_error
from training.evaluate import (
    RARE_FRACTION,
    IntSeq,
    json_safe,
    macro_f1_over,
    peak_rss_mb,
    per_class_metrics,
    rare_classes,
    reliability_bins,
    sample_texts,
)
from training.plots import confusion_matrix_png, reliability_diagram_png

WORST_CLASSES = 15
REPORT_JSON = "report.json"
REPORT_MD = "REPORT.md"
CONFUSION_PNG = "confusion.png"
RELIABILITY_PNG = "reliability.png"


# ---------------------------------------------------------------------------------------------
# the report of one model


def _rare_summary(y_true, y_pred, labels, train_support, fraction: float) -> dict:
    source = "train" if train_support is not None else "test"
    support = np.asarray(train_support) if train_support is not None else np.bincount(y_true, minlength=len(labels))
    rare = rare_classes(support, fraction)
    return {
        "fraction": fraction,
        "support_source": source,
        "cutoff_support": int(support[rare].max()) if len(rare) else None,
        "n_classes": len(rare),
        "indices": [int(i) for i in rare],
        "classes": [str(labels[i]) for i in rare],
        "f1": macro_f1_over(y_true, y_pred, rare),
    }


def _fp32_comparison(fp32_onnx_path, tokenizer_path, max_length, texts, y_true, int8_logits, onnx_path,
                     temperature: float, threads: int) -> dict:
    encoder = OnnxTextEncoder(fp32_onnx_path, tokenizer_path, max_length, threads=threads)
    metrics, logits = ev.evaluate_onnx(encoder, texts, y_true, temperature=temperature)
    size = ev.sizes(fp32_onnx_path, onnx_path)
    agreement = float(np.mean(logits.argmax(axis=1) == int8_logits.argmax(axis=1))) if len(texts) else float("nan")
    return {
        "size_bytes": size["fp32_bytes"],
        "size_mb": size["fp32_bytes"] / 1e6,
        "int8_over_fp32": size["int8_over_fp32"],
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "top1_agreement": agreement,
    }


def evaluation_report(
    onnx_path: str | Path,
    tokenizer_path: str | Path,
    max_length: int,
    texts: Sequence[str],
    y_true: IntSeq,
    label_names: Sequence[str],
    out_dir: str | Path,
    *,
    temperature: float = 1.0,
    threshold: float | None = None,
    confidence_top_k: int = 1,
    train_support: IntSeq | None = None,
    fp32_onnx_path: str | Path | None = None,
    latency_n: int = 200,
    rare_fraction: float = RARE_FRACTION,
    threads: int = 1,
    title: str | None = None,
) -> dict:
    """Evaluate one ONNX classifier on a labelled test set; write report.json, REPORT.md,
    confusion.png and reliability.png into ``out_dir``; return what report.json holds.

    ``temperature``/``threshold``/``confidence_top_k``: the model's calibration (manifest ``calibration``);
    ``train_support``: training examples per class (rare classes are chosen by it when given, by
    test support otherwise); ``fp32_onnx_path``: the unquantized export, for size and agreement;
    ``threads``: for the batched test pass only — latency is always one order on one thread, on
    ``latency_n`` sampled texts, and the peak RSS is that of a fresh process running the same number.

    Keys: ``title``, ``model_file``, ``n``, ``num_classes``, ``accuracy``, ``macro_f1``,
    ``weighted_f1``, ``rare_f1``, ``top1_accuracy``, ``top3_accuracy``, ``top5_accuracy``, ``nll``,
    ``temperature``, ``ece_before`` (T = 1), ``ece_after`` (T = ``temperature``), ``selective``
    (``threshold``, ``coverage``, ``precision``; None without a threshold), ``rare``
    (``fraction``, ``support_source``, ``cutoff_support``, ``n_classes``, ``indices``, ``classes``,
    ``f1``), ``p50_ms``, ``p95_ms``, ``latency`` (:func:`training.evaluate.latency`), ``size_bytes``,
    ``size_mb``, ``peak_rss_mb``, ``fp32`` (None or ``size_bytes``, ``size_mb``, ``int8_over_fp32``,
    ``accuracy``, ``macro_f1``, ``top1_agreement``), ``reliability`` (:func:`reliability_bins` after
    temperature), ``per_class`` (:func:`per_class_metrics`), ``files``, ``seconds``. NaN is null.
    """
    t0 = time.perf_counter()
    texts, y_true = list(texts), np.asarray(y_true, dtype=np.int64)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(texts) != len(y_true):
        raise ValueError(f"{len(texts)} texts but {len(y_true)} labels")
    encoder = OnnxTextEncoder(onnx_path, tokenizer_path, max_length, threads=threads)
    if encoder.num_outputs != len(label_names):
        raise ValueError(f"{onnx_path} has {encoder.num_outputs} outputs but {len(label_names)} label names were given")
    metrics, logits = ev.evaluate_onnx(encoder, texts, y_true, temperature=temperature, threshold=threshold,
                                       confidence_top_k=confidence_top_k)
    y_pred = logits.argmax(axis=1)
    probs = softmax(logits, temperature)

    serving = encoder if threads == 1 else OnnxTextEncoder(onnx_path, tokenizer_path, max_length, threads=1)
    lat = ev.latency(serving, texts, n=latency_n)
    rare = _rare_summary(y_true, y_pred, label_names, train_support, rare_fraction)
    size_bytes = Path(onnx_path).stat().st_size
    report = {
        "title": title or Path(onnx_path).name,
        "model_file": Path(onnx_path).name,
        "n": len(texts),
        "num_classes": len(label_names),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "weighted_f1": metrics["weighted_f1"],
        "rare_f1": rare["f1"],
        "top1_accuracy": metrics["accuracy"],
        "top3_accuracy": metrics["top3_accuracy"],
        "top5_accuracy": metrics["top5_accuracy"],
        "nll": metrics["nll"],
        "temperature": float(temperature),
        "ece_before": expected_calibration_error(softmax(logits, 1.0), y_true),
        "ece_after": metrics["ece"],
        "selective": metrics.get("selective"),
        "rare": rare,
        "p50_ms": lat["p50_ms"],
        "p95_ms": lat["p95_ms"],
        "latency": lat,
        "size_bytes": size_bytes,
        "size_mb": size_bytes / 1e6,
        "peak_rss_mb": peak_rss_mb(onnx_path, tokenizer_path, max_length, sample_texts(texts, latency_n)),
        "fp32": None if fp32_onnx_path is None else _fp32_comparison(
            fp32_onnx_path, tokenizer_path, max_length, texts, y_true, logits, onnx_path, temperature, threads),
        "reliability": reliability_bins(probs, y_true),
        "per_class": per_class_metrics(y_true, y_pred, label_names, train_support),
        "files": {"json": REPORT_JSON, "markdown": REPORT_MD, "confusion": CONFUSION_PNG, "reliability": RELIABILITY_PNG},
    }
    confusion_matrix_png(y_true, y_pred, label_names, out_dir / CONFUSION_PNG)
    reliability_diagram_png(probs, y_true, out_dir / RELIABILITY_PNG)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report = json_safe(report)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / REPORT_MD).write_text(render_report_markdown(report), encoding="utf-8")
    return report


# ---------------------------------------------------------------------------------------------
# markdown


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


Column = tuple[str, str, Callable[[Any], str]]  # (key, header, formatter)


def _markdown_table(columns: Sequence[Column], rows: Sequence[dict]) -> str:
    """``columns``: (key, header, formatter); a missing key renders as "n/a"."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(fmt(row.get(key))) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def _digits(n: int) -> Callable[[Any], str]:
    """A formatter with ``n`` decimals that also takes ints (a JSON round trip turns 3.0 into 3)."""
    return lambda value: _fmt(float(value) if type(value) is int else value, n)


_CLASS_COLUMNS: list[Column] = [
    ("label", "class", str),
    ("f1", "F1", _digits(3)),
    ("precision", "precision", _digits(3)),
    ("recall", "recall", _digits(3)),
    ("support", "test n", _fmt),
    ("train_support", "train n", _fmt),
]


def worst_classes(per_class: Sequence[dict], n: int = WORST_CLASSES) -> list[dict]:
    """The ``n`` evaluated classes with the lowest F1 (ties: more test examples first)."""
    evaluated = [row for row in per_class if row.get("evaluated", True)]
    return sorted(evaluated, key=lambda row: (row["f1"], -row["support"]))[:n]


def render_report_markdown(report: dict, *, max_rare_rows: int = 40) -> str:
    """REPORT.md of an :func:`evaluation_report` dict."""
    rare = report["rare"]
    sel = report.get("selective") or {}
    by_index = {row["index"]: row for row in report["per_class"]}
    rare_rows = sorted((by_index[i] for i in rare["indices"]),
                       key=lambda row: (row["train_support"] if rare["support_source"] == "train" else row["support"],
                                        row["index"]))
    headline = [
        ("accuracy (top-1)", _fmt(report["accuracy"])),
        ("macro-F1", _fmt(report["macro_f1"])),
        ("weighted-F1", _fmt(report["weighted_f1"])),
        ((f"rare-class macro-F1 ({rare['n_classes']} classes: bottom {rare['fraction']:.0%} by "
          f"{rare['support_source']} support, support <= {rare['cutoff_support']})"), _fmt(rare["f1"])),
        ("top-3 accuracy", _fmt(report["top3_accuracy"])),
        ("top-5 accuracy", _fmt(report["top5_accuracy"])),
        ("ECE before temperature (T = 1)", _fmt(report["ece_before"])),
        (f"ECE after temperature (T = {report['temperature']:g})", _fmt(report["ece_after"])),
    ]
    if sel:
        k = int(sel.get("confidence_top_k") or 1)
        on = "top-1 probability" if k == 1 else f"top-{k} probability mass; precision = label among the top {k}"
        headline.append((f"abstain below {_fmt(sel.get('threshold'), 3)} ({on}): coverage / precision",
                         f"{_fmt(sel.get('coverage'), 3)} / {_fmt(sel.get('precision'), 3)}"))
    headline += [
        ("latency p50 / p95, one order, 1 thread (ms)", f"{_fmt(report['p50_ms'], 2)} / {_fmt(report['p95_ms'], 2)}"),
        ("model file (MB)", _fmt(report["size_mb"], 1)),
        ("peak RSS of a fresh serving process (MB)", _fmt(report["peak_rss_mb"], 1)),
    ]
    fp32 = report.get("fp32")
    if fp32:
        headline += [
            ("fp32 export: accuracy / macro-F1", f"{_fmt(fp32['accuracy'])} / {_fmt(fp32['macro_f1'])}"),
            ("fp32 export (MB); this model's share of it", f"{_fmt(fp32['size_mb'], 1)}; {_fmt(fp32['int8_over_fp32'], 3)}"),
            ("top-1 agreement with fp32", _fmt(fp32["top1_agreement"])),
        ]
    lines = [
        f"# Evaluation report: {report['title']}",
        "",
        (f"{report['n']} test examples, {report['num_classes']} classes; probabilities at temperature "
         f"T = {report['temperature']:g}. Built in {_fmt(report.get('seconds'), 1)} s."),
        "",
        "## Headline metrics",
        "",
        _markdown_table([("metric", "metric", str), ("value", "value", str)],
                        [{"metric": name, "value": value} for name, value in headline]),
        "",
        f"## Rare classes ({rare['n_classes']})",
        "",
        (f"The bottom {rare['fraction']:.0%} of classes by {rare['support_source']} support (every class with "
         f"support <= {rare['cutoff_support']}, ties included). Rare-class macro-F1: {_fmt(rare['f1'])}."),
        "",
        _markdown_table(_CLASS_COLUMNS, rare_rows[:max_rare_rows]),
    ]
    if len(rare_rows) > max_rare_rows:
        lines += ["", f"... and {len(rare_rows) - max_rare_rows} more (all in {REPORT_JSON})."]
    lines += [
        "",
        f"## The {WORST_CLASSES} worst classes (by F1)",
        "",
        _markdown_table(_CLASS_COLUMNS, worst_classes(report["per_class"])),
        "",
        "## Figures",
        "",
        f"- [Confusion matrix]({CONFUSION_PNG}) (row-normalised)",
        f"- [Reliability diagram]({RELIABILITY_PNG}) (after temperature)",
        "",
        f"![Confusion matrix]({CONFUSION_PNG})",
        "",
        f"![Reliability diagram]({RELIABILITY_PNG})",
        "",
    ]
    return "\n".join(lines)


# The quality columns both tables share, then what each one is about.
_QUALITY_COLUMNS: list[Column] = [
    ("accuracy", "accuracy", _digits(4)),
    ("macro_f1", "macro-F1", _digits(4)),
    ("rare_f1", "rare-F1", _digits(4)),
]

COMPARISON_COLUMNS: list[Column] = [
    ("model", "model", str),
    *_QUALITY_COLUMNS,
    ("p50_ms", "p50 ms", _digits(2)),
    ("p95_ms", "p95 ms", _digits(2)),
    ("size_mb", "size MB", _digits(1)),
    ("peak_rss_mb", "peak RSS MB", _digits(1)),
]

METHOD_COLUMNS: list[Column] = [
    ("method", "method", str),
    *_QUALITY_COLUMNS,
    ("int8_size_mb", "int8 size MB", _digits(1)),
    ("p50_ms", "p50 ms", _digits(2)),
    ("train_seconds", "training time s", _digits(0)),
]


def comparison_table(rows: Sequence[dict]) -> str:
    """Markdown table, one row per model (e.g. "general base model fp32" vs "fine-tuned
    compressed model (int8)"). Keys per row: ``model``, ``accuracy``, ``macro_f1``, ``rare_f1``,
    ``p50_ms``, ``p95_ms``, ``size_mb``, ``peak_rss_mb`` — what :func:`evaluation_report` and
    :func:`general_baseline` return, plus ``model``. Missing or None values show as "n/a"."""
    return _markdown_table(COMPARISON_COLUMNS, rows)


def method_table(rows: Sequence[dict]) -> str:
    """Markdown table, one row per training/compression method. Keys per row: ``method``,
    ``accuracy``, ``macro_f1``, ``rare_f1``, ``int8_size_mb``, ``p50_ms``, ``train_seconds``.
    Missing or None values show as "n/a"."""
    return _markdown_table(METHOD_COLUMNS, rows)


__all__ = ["comparison_table", "evaluation_report", "method_table", "render_report_markdown"]
