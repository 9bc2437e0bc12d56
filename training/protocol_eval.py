"""Protocol model: calibration and evaluation on what the worker serves - probabilities restricted to
the protocols of the ordered exam (``schemas.exam_mask``, ``models.runtime.apply_label_weights``).

- ``calibrate_on_exams``: keeps the temperature fitted on the raw logits, refits the abstention
  threshold on the exam-restricted probabilities (for the target precision, 95 % by default).
- ``exam_slices``: top-1, top-3 and coverage at 90 % / 95 % precision on the test split, overall and
  on slices that matter for real orders - short reasons (<= 3 words of indication), long narratives
  (>= 40 words), orders naming a generic exam ("MRI spine": several protocols allowed) - and
  unrestricted (the model alone) for comparison. Written as ``report/PROTOCOL_SLICES.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.runtime import apply_label_weights, softmax
from schemas.catalog import PROTOCOL_SYSTEM, PROTOCOLS, Protocol
from schemas.exam_mask import ExamMasker
from training.stages import TaskData

SHORT_MAX_WORDS = 3
NARRATIVE_MIN_WORDS = 40
PRECISIONS = (0.9, 0.95)


def exam_weights(dataset, catalog: Sequence[Protocol] = PROTOCOLS, system: str = PROTOCOL_SYSTEM) -> list:
    masker = ExamMasker(catalog, system)
    return [masker.weights(item.service_request) for item in dataset.items]


def served_probs(logits: np.ndarray, temperature: float, weights) -> np.ndarray:
    return apply_label_weights(softmax(logits, temperature), weights)[0]


def calibrate_on_exams(calibration: dict, calib_logits: np.ndarray, calib_dataset, calib_y, target_precision: float,
                       catalog: Sequence[Protocol] = PROTOCOLS, system: str = PROTOCOL_SYSTEM) -> dict:
    """``calibration`` (from ``training.calibrate.calibrate``) with the threshold refitted on the
    exam-restricted probabilities of the calibration set."""
    from training.calibrate import choose_threshold

    k = int(calibration.get("confidence_top_k", 1))
    probs = served_probs(calib_logits, calibration["temperature"], exam_weights(calib_dataset, catalog, system))
    thr = choose_threshold(probs, np.asarray(calib_y), target_precision, k=k)
    out = dict(calibration, abstain_below=thr["threshold"], target_precision=float(target_precision))
    out["val"] = dict(calibration["val"], coverage=thr["coverage"], precision=thr["precision"],
                      target_reached=thr["reached"], restricted_to_ordered_exam=True)
    return out


def indication_words(sr: dict) -> int:
    texts = [c.get("text", "") for c in sr.get("reasonCode", []) or []] + [n.get("text", "") for n in sr.get("note", []) or []]
    return len(" ".join(t for t in texts if isinstance(t, str)).split())


def coverage_at(probs: np.ndarray, y: np.ndarray, precision: float) -> float:
    """The largest share of orders answered (most confident first) at ``precision`` top-1 precision."""
    if len(y) == 0:
        return float("nan")
    order = np.argsort(-probs.max(axis=1), kind="stable")
    correct = (probs.argmax(axis=1) == y)[order].astype(float)
    running = np.cumsum(correct) / np.arange(1, len(y) + 1)
    ok = np.flatnonzero(running >= precision)
    return float((ok[-1] + 1) / len(y)) if len(ok) else 0.0


def metrics(probs: np.ndarray, y: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    y = np.asarray(y)
    if len(y) == 0:
        return {"n": 0}
    top3 = np.argsort(-probs, axis=1)[:, :3]
    out = {
        "n": len(y),
        "top1": float((probs.argmax(axis=1) == y).mean()),
        "top3": float((top3 == y[:, None]).any(axis=1).mean()),
        **{f"coverage_at_{int(p * 100)}": coverage_at(probs, y, p) for p in PRECISIONS},
    }
    if threshold is not None:
        answered = probs.max(axis=1) >= threshold
        out["served_coverage"] = float(answered.mean())
        out["served_precision"] = float((probs.argmax(axis=1) == y)[answered].mean()) if answered.any() else float("nan")
    return out


def exam_slices(test_logits: np.ndarray, test_dataset, test_y, temperature: float, threshold: float,
                catalog: Sequence[Protocol] = PROTOCOLS, system: str = PROTOCOL_SYSTEM) -> dict[str, dict]:
    y = np.asarray(test_y)
    weights = exam_weights(test_dataset, catalog, system)
    raw = softmax(test_logits, temperature)
    served = apply_label_weights(raw, weights)[0]
    words = np.array([indication_words(it.service_request) for it in test_dataset.items])
    generic = np.array([w is not None and sum(x > 0 for x in w) > 1 for w in weights])
    slices = {
        "all (restricted to the ordered exam, as served)": np.ones(len(y), bool),
        f"short reason (<= {SHORT_MAX_WORDS} words)": words <= SHORT_MAX_WORDS,
        f"long narrative (>= {NARRATIVE_MIN_WORDS} words)": words >= NARRATIVE_MIN_WORDS,
        "generic exam (several protocols allowed)": generic,
        "no exam named (not restricted)": np.array([w is None for w in weights]),
    }
    out = {name: metrics(served[m], y[m], threshold) for name, m in slices.items()}
    out["all, unrestricted (the model alone)"] = metrics(raw, y)
    return out


def slices_markdown(slices: dict[str, dict]) -> str:
    head = "| slice | n | top-1 | top-3 | coverage at 90 % precision | coverage at 95 % precision | served coverage | served precision |"
    rows = [head, "|" + "---|" * 8]
    for name, m in slices.items():
        cells = [m.get(k) for k in ("top1", "top3", "coverage_at_90", "coverage_at_95", "served_coverage", "served_precision")]
        fmt = [f"{c:.3f}" if isinstance(c, float) and not math.isnan(c) else "-" for c in cells]
        rows.append(f"| {name} | {m.get('n', 0)} | " + " | ".join(fmt) + " |")
    return "\n".join(rows) + "\n"


def write_exam_slices(report_dir: Path, test_logits, data: TaskData, temperature: float, threshold: float,
                      catalog: Sequence[Protocol] = PROTOCOLS, system: str = PROTOCOL_SYSTEM) -> dict:
    """Compute the slices for the pipeline's held-out test split and write PROTOCOL_SLICES.md."""
    slices = exam_slices(test_logits, data.splits["test"], data.test_y, temperature, threshold, catalog, system)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "PROTOCOL_SLICES.md").write_text(
        "# Protocol model on the held-out test split, by slice\n\n"
        "Probabilities restricted to the protocols of the ordered exam (as the worker serves them); "
        f"served coverage/precision at the calibrated threshold {threshold:.4f}.\n\n" + slices_markdown(slices),
        encoding="utf-8")
    return slices
