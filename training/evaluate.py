"""Evaluation: accuracy, macro-F1, top-k, calibration, fp32 vs int8, latency and size.

Everything here runs the exported ONNX models through :class:`models.runtime.OnnxTextEncoder`
(the serving code path), not PyTorch.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from models.runtime import OnnxTextEncoder, softmax
from training.calibrate import expected_calibration_error, nll, selective


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
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


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


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
        "p50_ms": round(_pct(times, 50), 3),
        "p95_ms": round(_pct(times, 95), 3),
        "mean_ms": round(float(np.mean(times)), 3) if len(times) else float("nan"),
        "tokens_p50": float(np.median(tokens)) if tokens else float("nan"),
        "tokens_p95": _pct(np.asarray(tokens), 95),
        "p50_ms_by_tokens": by_tokens,
    }


def sizes(fp32_path: Path, int8_path: Path) -> dict:
    a, b = Path(fp32_path).stat().st_size, Path(int8_path).stat().st_size
    return {"fp32_bytes": a, "int8_bytes": b, "int8_over_fp32": round(b / a, 4)}


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
