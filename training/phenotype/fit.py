"""Fitting and evaluation of the ranker: score weights (conditional logit over candidate diseases),
softmax temperature (NLL over every disease), specificity gate (logistic regression), and the
evaluation figures (top-k by annotation-count bin beside a plain Resnik baseline, CR precision/recall,
gate rates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from models.diagnosis import (
    FEATURES,
    GATE_FEATURES,
    DiagnosisModel,
    softmax,
    text_age,
    text_inheritance,
    text_sex,
)
from models.phenotypes import patient_terms

RESNIK = FEATURES.index("resnik_mean")
BINS = ((1, 3), (4, 10), (11, 30), (31, 100), (101, 10_000))


@dataclass
class Encoded:
    """One generated case as the model sees it: candidate features, recognised terms, gold."""

    disease: int
    X: np.ndarray  # [n_candidates, F]; row 0 is the true disease
    present: list[int]
    excluded: list[int]
    gold_present: list[int]
    gold_excluded: list[int]
    text: str
    extra: dict = field(default_factory=dict)


def encode_cases(model: DiagnosisModel, cases, n_candidates: int = 150, progress: bool = True, desc: str = "cases"):
    out = []
    for c in tqdm(cases, desc=desc, disable=not progress, leave=False):
        mentions = model.recognizer.recognise(c.text)
        present, excluded = patient_terms(mentions)
        present = model.ranker.most_specific(present)
        if not present:
            out.append(Encoded(c.disease, np.zeros((0, len(FEATURES)), np.float32), [], excluded, c.present,
                               c.excluded, c.text))
            continue
        X, _, present, excluded = model.ranker.features(present, excluded, text_sex(c.text), text_age(c.text),
                                                       text_inheritance(c.text))
        cand = np.argpartition(-X[:, RESNIK], n_candidates)[:n_candidates]
        cand = np.concatenate([[c.disease], cand[cand != c.disease]])
        out.append(Encoded(c.disease, X[cand], present, excluded, c.present, c.excluded, c.text))
    return out


def fit_weights(encoded: list[Encoded], l2: float = 1e-3) -> np.ndarray:
    """Conditional logit: maximise log softmax(X w)[true] over each case's candidates."""
    from scipy.optimize import minimize

    data = [e.X for e in encoded if len(e.X) > 1]
    F = len(FEATURES)

    def loss(w):
        total, grad = 0.0, np.zeros(F)
        for X in data:
            s = X @ w
            m = s.max()
            p = np.exp(s - m)
            z = p.sum()
            p /= z
            total -= s[0] - m - math.log(z)
            grad -= X[0] - p @ X
        total += l2 * float(w @ w) * len(data)
        grad += 2 * l2 * w * len(data)
        return total / len(data), grad / len(data)

    w0 = np.zeros(F)
    w0[RESNIK] = 1.0
    res = minimize(loss, w0, jac=True, method="L-BFGS-B", options={"maxiter": 300})
    return res.x.astype(np.float32)


def fit_temperature(model: DiagnosisModel, texts_and_gold: list[tuple[str, int]]) -> float:
    """Temperature minimising the NLL of the true disease under softmax over all diseases."""
    scores = []
    for text, d in texts_and_gold:
        a = model.analyse(text)
        if a.probabilities is None:
            continue
        s, _, _, _ = model.scores(a.present, a.excluded, text_sex(text), text_age(text), text_inheritance(text))
        scores.append((s.astype(np.float64), d))
    grid = np.exp(np.linspace(math.log(0.05), math.log(20.0), 60))

    def nll(t):
        return float(np.mean([-(s[d] / t - (s / t).max() - math.log(np.exp(s / t - (s / t).max()).sum()))
                              for s, d in scores]))

    losses = [nll(t) for t in grid]
    return float(grid[int(np.argmin(losses))])


def fit_gate(pos: np.ndarray, neg: np.ndarray, max_negative_rate: float = 0.02) -> dict:
    """Logistic regression on the gate features; threshold: the highest of (0.5, the score that lets
    at most ``max_negative_rate`` of the fitting negatives through)."""
    from sklearn.linear_model import LogisticRegression

    X = np.vstack([pos, neg])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    mean, scale = X.mean(0), X.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000).fit((X - mean) / scale, y)
    prob_neg = clf.predict_proba((neg - mean) / scale)[:, 1]
    threshold = max(0.5, float(np.quantile(prob_neg, 1.0 - max_negative_rate))) if len(neg) else 0.5
    return {"features": list(GATE_FEATURES), "mean": mean.tolist(), "scale": scale.tolist(),
            "weights": clf.coef_[0].tolist(), "bias": float(clf.intercept_[0]), "threshold": min(threshold, 0.99),
            # one finding that is not common in ordinary orders ("lung cancer, weight loss") is not a work-up
            "min_terms": 1, "min_specific": 2}


def ordinary_terms(model: DiagnosisModel, negatives: list[str], positives: list[str], min_count: int = 2) -> list[str]:
    """HPO ids recognised as present in at least ``min_count`` ordinary orders/notes and at least twice as
    often there as in rare-disease case descriptions (chest pain, fever, cancer; not seizures)."""
    from collections import Counter

    def count(texts):
        c: Counter = Counter()
        for t in texts:
            present, _ = patient_terms(model.recognizer.recognise(t))
            c.update(set(present))
        return c

    neg, pos = count(negatives), count(positives)
    n_neg, n_pos = max(1, len(negatives)), max(1, len(positives))
    return sorted(model.recognizer.ids[t] for t, n in neg.items()
                  if n >= min_count and n / n_neg >= 2 * pos.get(t, 0) / n_pos)


def gate_vectors(model: DiagnosisModel, texts: list[str], progress: bool = True, desc: str = "gate") -> np.ndarray:
    return np.array([model.analyse(t).gate_features for t in tqdm(texts, desc=desc, disable=not progress,
                                                                   leave=False)])


# --------------------------------------------------------------------------- evaluation


def rank_of(values: np.ndarray, d: int) -> int:
    """1-based rank of disease d (ties count against it: a tie is not a win)."""
    return int((values > values[d]).sum() + (values == values[d]).sum())


def evaluate(model: DiagnosisModel, cases, n_annotations: np.ndarray, progress: bool = True) -> dict:
    """Top-1/3/10 of the model and of plain Resnik (recognised terms; and on the true terms) by bin,
    concept recognition precision/recall, gate acceptance."""
    rows = []
    tp = fp = fn = 0
    tp_ex = fp_ex = fn_ex = 0
    for c in tqdm(cases, desc="evaluate", disable=not progress, leave=False):
        a = model.analyse(c.text)
        mentions = model.recognizer.recognise(c.text)
        got_p, got_e = patient_terms(mentions)
        gold_p, gold_e = set(c.present), set(c.excluded)
        tp += len(set(got_p) & gold_p)
        fp += len(set(got_p) - gold_p)
        fn += len(gold_p - set(got_p))
        tp_ex += len(set(got_e) & gold_e)
        fp_ex += len(set(got_e) - gold_e)
        fn_ex += len(gold_e - set(got_e))
        row = {"disease": c.disease, "n_ann": int(n_annotations[c.disease]), "accepted": a.accept}
        if a.probabilities is None:
            row.update(model=10**6, resnik=10**6)
        else:
            row["model"] = rank_of(a.probabilities, c.disease)
            X, _, _, _ = model.ranker.features(a.present, a.excluded, text_sex(c.text), text_age(c.text),
                                               text_inheritance(c.text))
            row["resnik"] = rank_of(X[:, RESNIK], c.disease)
        gold = model.ranker.most_specific(c.present)
        if gold:
            Xg, _, _, _ = model.ranker.features(gold)
            row["resnik_gold"] = rank_of(Xg[:, RESNIK], c.disease)
        else:
            row["resnik_gold"] = 10**6
        rows.append(row)

    def topk(sel, key):
        n = len(sel)
        return {f"top{k}": (sum(r[key] <= k for r in sel) / n if n else None) for k in (1, 3, 5, 10)} | {"n": n}

    def served(sel):  # what a clinician sees: an abstention is a miss
        n = len(sel)
        return {f"top{k}": (sum(r["model"] <= k and r["accepted"] for r in sel) / n if n else None)
                for k in (1, 3, 5, 10)} | {"n": n}

    out: dict[str, Any] = {"all": {"model": topk(rows, "model"), "model_served": served(rows), "resnik": topk(rows, "resnik"),
                   "resnik_true_terms": topk(rows, "resnik_gold")}, "bins": {}}
    for lo, hi in BINS:
        sel = [r for r in rows if lo <= r["n_ann"] <= hi]
        out["bins"][f"{lo}-{hi}" if hi < 10_000 else f">{lo - 1}"] = {
            "model": topk(sel, "model"), "resnik": topk(sel, "resnik"), "resnik_true_terms": topk(sel, "resnik_gold")}
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    out["concept_recognition"] = {
        "present_precision": prec, "present_recall": rec,
        "excluded_precision": tp_ex / (tp_ex + fp_ex) if tp_ex + fp_ex else 0.0,
        "excluded_recall": tp_ex / (tp_ex + fn_ex) if tp_ex + fn_ex else 0.0,
    }
    out["gate_accept_rate_cases"] = float(np.mean([r["accepted"] for r in rows])) if rows else None
    return out


def latency_ms(model: DiagnosisModel, texts: list[str]) -> dict:
    """Per-order wall time of predict (concept recognition + ranking + top-10), one thread."""
    import time

    for t in texts[:5]:
        model.predict([t], top_k=10)
    times = []
    for t in texts:
        t0 = time.perf_counter()
        model.predict([t], top_k=10)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50": float(np.median(times)), "p95": float(np.quantile(times, 0.95)), "n": len(times)}


def probability_calibration(model: DiagnosisModel, cases, bins: int = 5) -> list[dict]:
    """Reliability table of the top-1 probability: mean predicted vs observed top-1 accuracy."""
    pairs = []
    for c in cases:
        a = model.analyse(c.text)
        if a.probabilities is None:
            continue
        d = int(np.argmax(a.probabilities))
        pairs.append((float(a.probabilities[d]), d == c.disease))
    if not pairs:
        return []
    p = np.array([x for x, _ in pairs])
    y = np.array([v for _, v in pairs], dtype=float)
    edges = np.quantile(p, np.linspace(0, 1, bins + 1))
    table = []
    for i in range(bins):
        sel = (p >= edges[i]) & (p <= edges[i + 1]) if i == bins - 1 else (p >= edges[i]) & (p < edges[i + 1])
        if sel.any():
            table.append({"predicted": float(p[sel].mean()), "observed": float(y[sel].mean()), "n": int(sel.sum())})
    return table


__all__ = ["encode_cases", "evaluate", "fit_gate", "fit_temperature", "fit_weights", "gate_vectors",
           "probability_calibration", "softmax"]
