"""Calibration on validation logits: temperature scaling and the abstention threshold.

Both are fitted on the logits of the model that is served (the int8 one), so the probabilities
written to FHIR mean what they say for that model.

- ``fit_temperature``: the T > 0 that minimises the negative log-likelihood of
  ``softmax(logits / T)`` (Guo et al. 2017), by a log-spaced grid then golden-section refinement
  (1-D, convex in practice, no torch needed).
- ``choose_threshold``: the lowest top-1 probability ``t`` such that the predictions with
  confidence >= t reach the target precision on validation: the most coverage at that precision.
"""

from __future__ import annotations

import math

import numpy as np

from models.runtime import softmax, top_k_confidence  # the runtime's: calibrated and served alike


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(logz - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels, *, lo: float = 0.05, hi: float = 20.0) -> float:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), 61))
    losses = [nll(logits, labels, t) for t in grid]
    i = int(np.argmin(losses))
    a, b = math.log(grid[max(0, i - 1)]), math.log(grid[min(len(grid) - 1, i + 1)])
    phi = (math.sqrt(5) - 1) / 2
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = nll(logits, labels, math.exp(c)), nll(logits, labels, math.exp(d))
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = nll(logits, labels, math.exp(d))
    return float(round(math.exp((a + b) / 2), 4))


def expected_calibration_error(probs: np.ndarray, labels, n_bins: int = 15) -> float:
    """Top-1 ECE with equal-width confidence bins."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def top_k_correct(probs: np.ndarray, labels, k: int = 1) -> np.ndarray:
    """Whether the true label is among the ``k`` most probable ones."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    k = max(1, min(int(k), probs.shape[1]))
    if k == 1:
        return probs.argmax(axis=1) == labels
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def selective(probs: np.ndarray, labels, threshold: float, k: int = 1) -> dict:
    """Coverage and precision (the answered ones whose true label is in the top ``k``) at a threshold
    on the top-``k`` probability mass."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    conf = top_k_confidence(probs, k)
    answered = conf >= threshold
    correct = top_k_correct(probs, labels, k)
    return {
        "threshold": float(threshold),
        "coverage": float(answered.mean()) if len(labels) else float("nan"),
        "precision": float(correct[answered].mean()) if answered.any() else float("nan"),
        "answered": int(answered.sum()),
    }


def choose_threshold(probs: np.ndarray, labels, target_precision: float, *, min_answered: int = 1, k: int = 1) -> dict:
    """The lowest confidence threshold whose answered set reaches ``target_precision``. With ``k`` > 1
    the confidence is the top-``k`` probability mass and an answer is right when the true label is
    among those ``k`` (a differential list rather than one answer).

    Sorted by confidence, the precision of the top-n answered predictions is computed for every n;
    the largest n that reaches the target (and answers at least ``min_answered``) sets the
    threshold at its lowest confidence. When no n reaches the target, the model abstains on
    everything below the highest validation confidence (``reached: False``).
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return {"threshold": 0.0, "target_precision": target_precision, "reached": False}
    conf = top_k_confidence(probs, k)
    correct = top_k_correct(probs, labels, k).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    conf_sorted, correct_sorted = conf[order], correct[order]
    precision = np.cumsum(correct_sorted) / np.arange(1, len(order) + 1)
    # only cut between distinct confidences: ties are answered or abstained together
    distinct = np.append(conf_sorted[1:] < conf_sorted[:-1], True)
    ok = np.flatnonzero((precision >= target_precision) & distinct & (np.arange(1, len(order) + 1) >= min_answered))
    if len(ok):
        n = int(ok[-1]) + 1
        threshold = float(np.floor(conf_sorted[n - 1] * 1e6) / 1e6)  # rounded down: keep what was measured
        reached = True
    else:
        threshold = float(min(1.0, np.ceil(conf_sorted[0] * 1e6) / 1e6 + 1e-6))
        reached = False
    out = selective(probs, labels, threshold, k)
    out.update({"target_precision": float(target_precision), "reached": reached, "k": int(k)})
    return out


def calibrate(val_logits: np.ndarray, val_labels, target_precision: float, *, top_k: int = 1) -> dict:
    """Temperature, then threshold on the temperature-scaled validation probabilities (on the
    top-``top_k`` probability mass, see :func:`choose_threshold`)."""
    labels = np.asarray(val_labels)
    t = fit_temperature(val_logits, labels)
    before = softmax(val_logits, 1.0)
    after = softmax(val_logits, t)
    thr = choose_threshold(after, labels, target_precision, k=top_k)
    return {
        "temperature": t,
        "abstain_below": thr["threshold"],
        "confidence_top_k": int(top_k),
        "target_precision": float(target_precision),
        "val": {
            "nll_before": nll(val_logits, labels, 1.0),
            "nll_after": nll(val_logits, labels, t),
            "ece_before": expected_calibration_error(before, labels),
            "ece_after": expected_calibration_error(after, labels),
            "coverage": thr["coverage"],
            "precision": thr["precision"],
            "target_reached": thr["reached"],
        },
    }
