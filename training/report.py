"""The evaluation report of one model, and the tables that compare models and methods.

``evaluation_report`` runs an exported ONNX classifier through :class:`models.runtime.OnnxTextEncoder`
(the serving code path) on a labelled test set and writes, into one folder:

- ``report.json``: headline metrics, rare-class metrics, calibration, per-class table, serving cost;
- ``REPORT.md``: the same for people (headline table, rare classes, the 15 worst classes, figures);
- ``confusion.png`` (row-normalised, the most-confused classes when there are many) and
  ``reliability.png`` (confidence vs accuracy, with a histogram of confidences).

Only class names/codes and numbers are written: never an example text (they may be patient text).

``general_baseline`` is the reference a fine-tuned, compressed model is compared against: the
unchanged base sentence encoder (fp32, all layers, mean pooling) as a frozen feature extractor with
a logistic-regression head. ``comparison_table`` and ``method_table`` render rows of these results
as markdown.

Serving cost is measured the way a worker pays it: latency on one thread for one order at a time
(``training.evaluate.latency``), and the peak resident memory of a fresh process that loads only the
ONNX model and runs texts (``peak_rss_mb``), not of the training process that computed the report.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.runtime import OnnxTextEncoder, softmax
from training import evaluate as ev
from training.calibrate import expected_calibration_error

REPO_ROOT = Path(__file__).resolve().parent.parent

RARE_FRACTION = 0.2
WORST_CLASSES = 15
LABEL_CHARS = 28  # tick labels longer than this are cut: 600 OMIM names must stay legible

REPORT_JSON = "report.json"
REPORT_MD = "REPORT.md"
CONFUSION_PNG = "confusion.png"
RELIABILITY_PNG = "reliability.png"

GENERAL_BASELINE_NAME = "general base model fp32"


# ---------------------------------------------------------------------------------------------
# per-class and rare-class metrics


def per_class_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], train_support: Sequence[int] | None = None
) -> list[dict]:
    """One dict per class, in class-id order.

    Keys: ``index``, ``label`` (the name given), ``precision``, ``recall``, ``f1``, ``support`` (test
    examples of the class), ``predicted`` (test examples predicted as the class), ``train_support``
    (None when not given) and ``evaluated``: False for a class with neither test examples nor
    predictions, whose precision/recall/F1 are undefined (reported as 0).
    """
    from sklearn.metrics import precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n = len(labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(n), zero_division=0
    )
    predicted = np.bincount(y_pred, minlength=n)[:n]
    rows = []
    for i, name in enumerate(labels):
        rows.append({
            "index": i,
            "label": str(name),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            "predicted": int(predicted[i]),
            "train_support": None if train_support is None else int(train_support[i]),
            "evaluated": bool(support[i] > 0 or predicted[i] > 0),
        })
    return rows


def rare_classes(support: Sequence[int], fraction: float = RARE_FRACTION) -> np.ndarray:
    """Indices of the classes in the bottom ``fraction`` by ``support`` (ascending).

    Pass the TRAINING support when there is one (what makes a class rare is how little the model
    saw of it); the test support otherwise. ``k = ceil(fraction * n_classes)`` (at least one) and
    the cutoff is the k-th smallest support; every class with support <= the cutoff is rare, so
    classes tied at the cutoff are all in: the set can hold more than k classes, never fewer.
    Example: supports [50, 40, 30, 5, 3], fraction 0.2 -> k = 1, cutoff 3 -> class 4.
    """
    support = np.asarray(support)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if support.ndim != 1 or len(support) == 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, math.ceil(fraction * len(support) - 1e-9))  # the epsilon keeps 0.2 * 5 at 1, not 2
    cutoff = np.sort(support)[k - 1]
    return np.flatnonzero(support <= cutoff)


def macro_f1_over(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[int]) -> float:
    """Macro-F1 over ``classes`` only, skipping those with neither test examples nor predictions
    (undefined F1; sklearn's macro-F1 skips them the same way); NaN when none is left."""
    from sklearn.metrics import precision_recall_fscore_support

    classes = np.asarray(classes, dtype=np.int64)
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(classes) == 0:
        return float("nan")
    _, _, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    predicted = np.isin(classes, y_pred)
    defined = (support > 0) | predicted
    return float(f1[defined].mean()) if defined.any() else float("nan")


def rare_class_f1(
    y_true: Sequence[int], y_pred: Sequence[int], support: Sequence[int], fraction: float = RARE_FRACTION
) -> float:
    """Macro-F1 over :func:`rare_classes` of ``support`` (one count per class, training support
    preferred): how the model does on the classes it saw least."""
    return macro_f1_over(y_true, y_pred, rare_classes(support, fraction))


# ---------------------------------------------------------------------------------------------
# figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display in workers, CI or over ssh
    import matplotlib.pyplot as plt

    return plt


def _short(name: str, chars: int = LABEL_CHARS) -> str:
    name = str(name)
    return name if len(name) <= chars else name[: chars - 1] + "…"


def most_confused_classes(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int, k: int) -> np.ndarray:
    """The ``k`` classes (ascending ids) involved in the most errors, as the true class (missed) or
    the predicted one (wrongly given); ties, and classes without errors, go by test support."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if num_classes <= k:
        return np.arange(num_classes)
    wrong = y_true != y_pred
    mass = np.bincount(y_true[wrong], minlength=num_classes) + np.bincount(y_pred[wrong], minlength=num_classes)
    support = np.bincount(y_true, minlength=num_classes)
    return np.sort(np.lexsort((-support[:num_classes], -mass[:num_classes]))[:k])


def shown_confusion(y_true: Sequence[int], y_pred: Sequence[int], shown: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-normalised confusion among ``shown`` classes: ``[len(shown), len(shown) + 1]``, the last
    column the share predicted as a class outside ``shown`` (so every row with examples sums to 1).
    Built without the full ``num_classes``-square matrix (4800 classes would be 184 MB)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(shown)
    position = np.full(num_classes, -1, dtype=np.int64)
    position[shown] = np.arange(k)
    rows = position[y_true]
    keep = rows >= 0
    cols = position[y_pred[keep]]
    cols[cols < 0] = k
    counts = np.zeros((k, k + 1), dtype=np.float64)
    np.add.at(counts, (rows[keep], cols), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def confusion_matrix_png(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str], path: str | Path, max_classes: int = 40
) -> Path:
    """Row-normalised confusion matrix as a PNG. With more than ``max_classes`` classes only the
    ``max_classes`` most-confused ones are drawn (the title says so) plus an "(other)" column for
    predictions outside them; long class names are truncated."""
    plt = _pyplot()
    n = len(labels)
    shown = most_confused_classes(y_true, y_pred, n, max_classes)
    matrix = shown_confusion(y_true, y_pred, shown, n)
    subset = len(shown) < n
    if not subset:
        matrix = matrix[:, :-1]  # nothing can fall outside: drop the empty "(other)" column
    k = len(shown)
    names = [_short(labels[i]) for i in shown]
    side = min(20.0, max(5.0, 0.26 * k + 3.5))
    font = 8 if k <= 20 else max(4, 8 - (k - 20) // 10)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="share of the true class")
    ax.set_xticks(np.arange(matrix.shape[1]), names + (["(other)"] if subset else []), rotation=90, fontsize=font)
    ax.set_yticks(np.arange(k), names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= 20:  # values are readable only in small matrices
        for (r, c), value in np.ndenumerate(matrix):
            if value >= 0.005:
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=font - 1,
                        color="white" if value > 0.5 else "black")
    title = f"Confusion matrix, row-normalised ({n} classes, {len(np.asarray(y_true))} examples)"
    if subset:
        title = (f"Confusion matrix, row-normalised: the {k} most-confused of {n} classes\n"
                 f"(ranked by errors as true or predicted class; '(other)' = predicted outside these {k})")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_bins(probs: np.ndarray, y_true: Sequence[int], n_bins: int = 15) -> dict:
    """Top-1 confidence bins as :func:`training.calibrate.expected_calibration_error` cuts them
    (equal width, ``(lo, hi]``, the first one closed): ``count``, mean ``confidence`` and
    ``accuracy`` per bin (NaN for empty bins) and the bin ``edges``."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == np.asarray(y_true)) if len(probs) else np.zeros(0)
    index = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins) / count
        confidence = np.bincount(index, weights=conf, minlength=n_bins) / count
    return {
        "n_bins": n_bins,
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "count": count.astype(np.int64),
        "confidence": confidence,
        "accuracy": accuracy,
    }


def reliability_diagram_png(probs: np.ndarray, y_true: Sequence[int], path: str | Path, n_bins: int = 15) -> Path:
    """Reliability diagram of the top-1 prediction: accuracy per confidence bin against the
    diagonal (perfect calibration), the gap to the bin's mean confidence, ECE in the title; below
    it a histogram of the confidences."""
    plt = _pyplot()
    bins = reliability_bins(probs, y_true, n_bins)
    ece = expected_calibration_error(probs, y_true, n_bins)
    centers = (bins["edges"][:-1] + bins["edges"][1:]) / 2
    width = 1.0 / n_bins
    has = bins["count"] > 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers[has], bins["accuracy"][has], width=width, color="tab:blue", edgecolor="black", label="accuracy")
    gap = bins["confidence"][has] - bins["accuracy"][has]
    top.bar(centers[has], gap, bottom=bins["accuracy"][has], width=width, color="tab:red", alpha=0.3,
            edgecolor="tab:red", hatch="//", label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"Reliability of the top-1 prediction: ECE = {ece:.3f} ({n_bins} bins, n = {len(probs)})", fontsize=10)
    bottom.bar(centers, bins["count"], width=width, color="gray", edgecolor="black")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("examples")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# serving footprint

# Run in a fresh interpreter: what a worker process pays to load the model and run texts. The
# texts come from a file (argv would expose them in the process list); only a number is printed.
# On Linux the peak is VmHWM of /proc/self/status, not getrusage's ru_maxrss: execve carries the
# parent's high-water mark into ru_maxrss (a child of a 400 MB process reports >= 400 MB), while
# VmHWM belongs to the fresh address space.
_RSS_PROBE = """
import json, resource, sys
from models.runtime import OnnxTextEncoder
model_path, tokenizer_path, max_length, texts_path, batch_size = sys.argv[1:6]
with open(texts_path, encoding="utf-8") as f:
    texts = json.load(f)
encoder = OnnxTextEncoder(model_path, tokenizer_path, int(max_length), threads=1)
if texts:
    encoder.logits(texts, batch_size=int(batch_size))
try:
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
print(peak)
"""


def peak_rss_mb(
    model_path: str | Path,
    tokenizer_path: str | Path,
    max_length: int,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    timeout: float = 600,
) -> float:
    """Peak resident memory (MB, 10^6 bytes) of a fresh Python process that imports
    ``models.runtime``, loads the model with ``OnnxTextEncoder(threads=1)`` and runs ``texts``
    (batches of ``batch_size``, as ``TextClassifier.predict``): the serving footprint, interpreter
    and ONNX Runtime included, whatever the calling (training) process holds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="ehrw-rss-") as tmp:  # mode 0700: the texts stay private
        texts_file = Path(tmp) / "texts.json"
        texts_file.write_text(json.dumps([str(t) for t in texts]), encoding="utf-8")
        args = [str(model_path), str(tokenizer_path), str(int(max_length)), str(texts_file), str(int(batch_size))]
        proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, *args], capture_output=True, text=True, check=False,
                              cwd=REPO_ROOT, env=env, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]  # the error line only, never texts
        raise RuntimeError(f"peak-RSS probe of {model_path} failed (exit {proc.returncode}): {last}")
    return round(int(proc.stdout.strip().splitlines()[-1]) / 1e6, 1)


def _sample(texts: Sequence[str], n: int, seed: int = 0) -> list[str]:
    texts = list(texts)
    if len(texts) <= n:
        return texts
    rng = np.random.default_rng(seed)
    return [texts[i] for i in np.sort(rng.choice(len(texts), size=n, replace=False))]


# ---------------------------------------------------------------------------------------------
# the report of one model


def json_safe(value: Any) -> Any:
    """numpy to Python, NaN/inf to None: ``json.dumps`` would write NaN, which is not JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
    y_true: Sequence[int],
    label_names: Sequence[str],
    out_dir: str | Path,
    *,
    temperature: float = 1.0,
    threshold: float | None = None,
    confidence_top_k: int = 1,
    train_support: Sequence[int] | None = None,
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
        "peak_rss_mb": peak_rss_mb(onnx_path, tokenizer_path, max_length, _sample(texts, latency_n)),
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


def _markdown_table(columns: Sequence[tuple[str, str, Callable[[Any], str]]], rows: Sequence[dict]) -> str:
    """``columns``: (key, header, formatter); a missing key renders as "n/a"."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(fmt(row.get(key))) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def _digits(n: int) -> Callable[[Any], str]:
    """A formatter with ``n`` decimals that also takes ints (a JSON round trip turns 3.0 into 3)."""
    return lambda value: _fmt(float(value) if type(value) is int else value, n)


_CLASS_COLUMNS = [
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
_QUALITY_COLUMNS = [
    ("accuracy", "accuracy", _digits(4)),
    ("macro_f1", "macro-F1", _digits(4)),
    ("rare_f1", "rare-F1", _digits(4)),
]
COMPARISON_COLUMNS = [
    ("model", "model", str),
    *_QUALITY_COLUMNS,
    ("p50_ms", "p50 ms", _digits(2)),
    ("p95_ms", "p95 ms", _digits(2)),
    ("size_mb", "size MB", _digits(1)),
    ("peak_rss_mb", "peak RSS MB", _digits(1)),
]
METHOD_COLUMNS = [
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


# ---------------------------------------------------------------------------------------------
# the general base model reference


def stratified_subsample(labels: Sequence[int], max_n: int | None, seed: int = 0) -> np.ndarray:
    """Up to ``max_n`` indices (ascending) such that every class gets its first example before any
    class gets its second, and so on: subsampling never drops a rare class that fits."""
    labels = np.asarray(labels)
    if max_n is None or len(labels) <= max_n:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    grouped = shuffled[np.argsort(labels[shuffled], kind="stable")]  # by class, random within class
    positions = np.arange(len(grouped))
    starts = np.flatnonzero(np.r_[True, labels[grouped][1:] != labels[grouped][:-1]])
    rank = positions - starts[np.searchsorted(starts, positions, side="right") - 1]
    order = np.lexsort((rng.random(len(grouped)), rank))
    return np.sort(grouped[order[:max_n]])


def export_base_encoder(base_model_dir: str | Path, out_dir: str | Path, max_length: int) -> tuple[Path, Path]:
    """The unchanged base encoder (all layers, fp32) with masked mean pooling as an ONNX model whose
    output is the sentence embedding, and its tokenizer; reused when already in ``out_dir``."""
    out_dir = Path(out_dir)
    onnx_path, tokenizer_path = out_dir / "base_encoder.fp32.onnx", out_dir / "tokenizer.json"
    if onnx_path.is_file() and tokenizer_path.is_file():
        return onnx_path, tokenizer_path
    from training.export import check_export, export_onnx, save_tokenizer
    from training.model import EncoderClassifier, encode, load_tokenizer, pad_id_of

    class MeanPooledEncoder(EncoderClassifier):
        """The classifier's encoder and pooling without its head: the sentence embedding."""

        def forward(self, input_ids, attention_mask):
            return self.pool(input_ids, attention_mask)

    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(base_model_dir, max_length)
    model = MeanPooledEncoder.from_pretrained(base_model_dir, 1, num_layers=None, dropout=0.0).eval()
    export_onnx(model, onnx_path)
    check_export(model, onnx_path, encode(tokenizer, ["ct head without contrast", "x"]), pad_id_of(tokenizer))
    save_tokenizer(tokenizer, tokenizer_path, max_length)
    return onnx_path, tokenizer_path


def _head_probabilities(head, features: np.ndarray, num_classes: int) -> np.ndarray:
    """``predict_proba`` spread over all ``num_classes`` columns (classes absent from the training
    subsample get probability 0)."""
    probs = np.zeros((len(features), num_classes), dtype=np.float64)
    probs[:, head.classes_] = head.predict_proba(features)
    return probs


def general_baseline(
    base_model_dir: str | Path | None,
    train_texts: Sequence[str],
    y_train: Sequence[int],
    test_texts: Sequence[str],
    y_test: Sequence[int],
    *,
    num_classes: int | None = None,
    train_support: Sequence[int] | None = None,
    max_length: int = 128,
    max_train: int | None = 4000,
    latency_n: int = 100,
    rare_fraction: float = RARE_FRACTION,
    threads: int = 2,
    C: float = 1.0,
    max_iter: int = 300,
    work_dir: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """The "general base model fp32" reference: the unchanged base sentence encoder
    (``training.model.default_base_model()`` when ``base_model_dir`` is None: all 6 MiniLM
    layers, fp32, mean pooling, exported to ONNX and run with ONNX Runtime like the served models)
    as a frozen feature extractor, L2-normalised embeddings as sentence-transformers makes them,
    and a logistic-regression head fitted on at most ``max_train`` training examples
    (:func:`stratified_subsample`).

    Rare classes are chosen by ``train_support``, else by the support of the full ``y_train``.
    Latency: the encoder forward of one text on one thread (the head adds microseconds). Size: the
    fp32 encoder file plus the head's float32 weights. ``work_dir`` keeps the ONNX export for reuse.

    Keys: ``model``, ``base_model``, ``n_train``, ``n_train_total``, ``n``, ``num_classes``,
    ``accuracy``, ``macro_f1``, ``weighted_f1``, ``rare_f1``, ``rare_classes``, ``top3_accuracy``,
    ``top5_accuracy``, ``ece``, ``p50_ms``, ``p95_ms``, ``latency``, ``size_bytes``, ``size_mb``,
    ``encoder_bytes``, ``head_bytes``, ``peak_rss_mb``, ``embed_seconds``, ``fit_seconds``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if base_model_dir is None:
        from training.model import default_base_model

        base_model_dir = default_base_model()
    y_train, y_test = np.asarray(y_train, dtype=np.int64), np.asarray(y_test, dtype=np.int64)
    num_classes = int(num_classes or max(y_train.max(initial=-1), y_test.max(initial=-1)) + 1)
    chosen = stratified_subsample(y_train, max_train, seed)
    if len(np.unique(y_train[chosen])) < 2:
        raise ValueError("the general baseline needs training examples of at least two classes")

    with tempfile.TemporaryDirectory(prefix="ehrw-baseline-") as tmp:
        onnx_path, tokenizer_path = export_base_encoder(base_model_dir, Path(work_dir or tmp), max_length)
        encoder = OnnxTextEncoder(onnx_path, tokenizer_path, max_length, threads=threads)
        t0 = time.perf_counter()
        train_features = encoder.logits([train_texts[i] for i in chosen], batch_size=64)
        test_features = encoder.logits(list(test_texts), batch_size=64)
        embed_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        head = make_pipeline(Normalizer(), StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
        head.fit(train_features, y_train[chosen])
        fit_seconds = time.perf_counter() - t0
        probs = _head_probabilities(head, test_features, num_classes)
        single = OnnxTextEncoder(onnx_path, tokenizer_path, max_length, threads=1)
        lat = ev.latency(single, test_texts, n=latency_n, seed=seed)
        rss = peak_rss_mb(onnx_path, tokenizer_path, max_length, _sample(test_texts, latency_n, seed))
        encoder_bytes = onnx_path.stat().st_size

    metrics = ev.classification_metrics(np.log(np.clip(probs, 1e-12, None)), y_test)  # softmax(log p) = p
    y_pred = probs.argmax(axis=1)
    support = np.asarray(train_support) if train_support is not None else np.bincount(y_train, minlength=num_classes)
    rare = rare_classes(support, rare_fraction)
    linear = head[-1]
    head_bytes = int((linear.coef_.size + linear.intercept_.size) * 4)
    return json_safe({
        "model": GENERAL_BASELINE_NAME,
        "base_model": str(base_model_dir),
        "n_train": len(chosen),
        "n_train_total": len(y_train),
        "n": len(y_test),
        "num_classes": num_classes,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "weighted_f1": metrics["weighted_f1"],
        "rare_f1": macro_f1_over(y_test, y_pred, rare),
        "rare_classes": len(rare),
        "top3_accuracy": metrics["top3_accuracy"],
        "top5_accuracy": metrics["top5_accuracy"],
        "ece": metrics["ece"],
        "p50_ms": lat["p50_ms"],
        "p95_ms": lat["p95_ms"],
        "latency": lat,
        "size_bytes": encoder_bytes + head_bytes,
        "size_mb": (encoder_bytes + head_bytes) / 1e6,
        "encoder_bytes": encoder_bytes,
        "head_bytes": head_bytes,
        "peak_rss_mb": rss,
        "embed_seconds": round(embed_seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
    })


__all__ = [
    "comparison_table",
    "confusion_matrix_png",
    "evaluation_report",
    "general_baseline",
    "method_table",
    "peak_rss_mb",
    "per_class_metrics",
    "rare_class_f1",
    "rare_classes",
    "reliability_diagram_png",
]
