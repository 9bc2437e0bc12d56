"""Evaluation: accuracy, macro-F1, per-class and rare-class metrics, top-k, calibration, fp32 vs
int8, and the serving cost (latency, size, peak memory of a fresh process).

Everything that runs a model here runs the exported ONNX models through
:class:`models.runtime.OnnxTextEncoder` (the serving code path), not PyTorch.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.measure import percentile
from models.runtime import OnnxTextEncoder, softmax
from training.calibrate import expected_calibration_error, nll, selective

REPO_ROOT = Path(__file__).resolve().parent.parent

# class ids, per example or per class: a list or a numpy array
IntSeq = Sequence[int] | np.ndarray

# the share of classes, fewest training examples first, that count as rare
RARE_FRACTION = 0.2


def macro_f1(y_true: IntSeq, y_pred: IntSeq) -> float:
    """Unweighted mean of the per-class F1 over the classes present in either (0 where undefined)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def classification_metrics(logits: np.ndarray, labels, *, temperature: float = 1.0, ks=(3, 5)) -> dict:
    from sklearn.metrics import f1_score

    labels = np.asarray(labels)
    logits = np.asarray(logits)
    probs = softmax(logits, temperature)
    pred = probs.argmax(axis=1)
    out = {
        "n": int(len(labels)),
        "accuracy": float(np.mean(pred == labels)) if len(labels) else float("nan"),
        "macro_f1": macro_f1(labels, pred) if len(labels) else float("nan"),
        "weighted_f1": float(f1_score(labels, pred, average="weighted", zero_division=0)) if len(labels) else float("nan"),
    }
    order = np.argsort(-probs, axis=1)
    for k in ks:
        k_eff = min(k, probs.shape[1])
        out[f"top{k}_accuracy"] = float(np.mean([labels[i] in order[i, :k_eff] for i in range(len(labels))]))
    out["nll"] = nll(logits, labels, temperature)
    out["ece"] = expected_calibration_error(probs, labels)
    return out


def per_class_metrics(
    y_true: IntSeq, y_pred: IntSeq, labels: Sequence[str], train_support: IntSeq | None = None
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


def rare_classes(support: IntSeq, fraction: float = RARE_FRACTION) -> np.ndarray:
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


def macro_f1_over(y_true: IntSeq, y_pred: IntSeq, classes: IntSeq) -> float:
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
    y_true: IntSeq, y_pred: IntSeq, support: IntSeq, fraction: float = RARE_FRACTION
) -> float:
    """Macro-F1 over :func:`rare_classes` of ``support`` (one count per class, training support
    preferred): how the model does on the classes it saw least."""
    return macro_f1_over(y_true, y_pred, rare_classes(support, fraction))


def reliability_bins(probs: np.ndarray, y_true: IntSeq, n_bins: int = 15) -> dict:
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


def evaluate_onnx(
    encoder: OnnxTextEncoder, texts: Sequence[str], labels, *, temperature: float = 1.0, threshold: float | None = None,
    confidence_top_k: int = 1,
) -> tuple[dict, np.ndarray]:
    logits = encoder.logits(texts, batch_size=64)
    metrics = classification_metrics(logits, labels, temperature=temperature)
    if threshold is not None:
        sel = selective(softmax(logits, temperature), labels, threshold, confidence_top_k)
        metrics["selective"] = {"coverage": sel["coverage"], "precision": sel["precision"], "threshold": threshold,
                                "confidence_top_k": confidence_top_k}
    return metrics, logits


def latency(encoder: OnnxTextEncoder, texts: Sequence[str], *, n: int = 300, seed: int = 0) -> dict:
    """Single-order latency (tokenize + run, batch of one) on ``encoder.threads`` threads over a
    sample of real texts, plus fixed token lengths to show how cost grows with text length."""
    rng = np.random.default_rng(seed)
    texts = list(texts)
    sample = [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=len(texts) < n)] if texts else []
    times = encoder.latency_ms(sample, repeats=1) if sample else np.array([])
    tokens = [len(x) for x in encoder.encode(sample)]
    by_tokens = {}
    vocab = 2000 + rng.integers(0, 20000, size=512)
    for length in (16, 32, 64, 128):
        if length > encoder.max_length:
            break
        ids = [[101] + vocab[: length - 2].tolist() + [102]]
        for _ in range(5):
            encoder.logits_from_ids(ids, batch_size=1)
        ts = []
        for _ in range(max(20, n // 5)):
            t0 = time.perf_counter()
            encoder.logits_from_ids(ids, batch_size=1)
            ts.append((time.perf_counter() - t0) * 1e3)
        by_tokens[str(length)] = round(statistics.median(ts), 3)
    return {
        "threads": encoder.threads,
        "n": len(sample),
        "p50_ms": round(percentile(times, 50), 3),
        "p95_ms": round(percentile(times, 95), 3),
        "mean_ms": round(float(np.mean(times)), 3) if len(times) else float("nan"),
        "tokens_p50": float(np.median(tokens)) if tokens else float("nan"),
        "tokens_p95": percentile(np.asarray(tokens), 95),
        "p50_ms_by_tokens": by_tokens,
    }


def sizes(fp32_path: Path, int8_path: Path) -> dict:
    a, b = Path(fp32_path).stat().st_size, Path(int8_path).stat().st_size
    return {"fp32_bytes": a, "int8_bytes": b, "int8_over_fp32": round(b / a, 4)}


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


def sample_texts(texts: Sequence[str], n: int, seed: int = 0) -> list[str]:
    texts = list(texts)
    if len(texts) <= n:
        return texts
    rng = np.random.default_rng(seed)
    return [texts[i] for i in np.sort(rng.choice(len(texts), size=n, replace=False))]


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


def summary_table(rows: list[dict]) -> str:
    """A plain-text table of build results (one row per task)."""
    header = [
        "task", "labels", "test n", "acc fp32", "acc int8", "F1 fp32", "F1 int8", "top5 int8",
        "MB fp32", "MB int8", "ratio", "p50 ms", "abstain<", "coverage",
    ]
    lines = []
    for r in rows:
        lines.append([
            r["task"], str(r["labels"]), str(r["test_n"]),
            f"{r['acc_fp32']:.4f}", f"{r['acc_int8']:.4f}", f"{r['f1_fp32']:.4f}", f"{r['f1_int8']:.4f}",
            f"{r['top5_int8']:.4f}", f"{r['mb_fp32']:.1f}", f"{r['mb_int8']:.1f}", f"{r['ratio']:.3f}",
            f"{r['p50_ms']:.2f}", f"{r['threshold']:.3f}", f"{r['coverage']:.3f}",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)
