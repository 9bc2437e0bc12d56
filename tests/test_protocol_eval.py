"""Protocol calibration and slices on exam-restricted probabilities (training.protocol_eval)."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.catalog import PROTOCOLS
from training.datasets import protocol
from training.protocol_eval import (
    calibrate_on_exams,
    coverage_at,
    exam_slices,
    exam_weights,
    served_probs,
    slices_markdown,
)


def test_coverage_at_precision():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    y = np.array([0, 0, 1, 0])  # the third most confident is wrong
    assert coverage_at(probs, y, 0.95) == pytest.approx(0.5)
    assert coverage_at(probs, y, 0.75) == pytest.approx(1.0)


def test_restriction_lifts_accuracy_and_slices_are_reported():
    data = protocol.generate(300, seed=5, split="test")
    y = np.asarray(data.label_ids())
    rng = np.random.default_rng(0)
    # a model that knows the answer weakly and confuses it with every other protocol
    logits = rng.normal(0, 1.0, (len(y), len(PROTOCOLS)))
    logits[np.arange(len(y)), y] += 1.5
    weights = exam_weights(data)
    raw, served = served_probs(logits, 1.0, None), served_probs(logits, 1.0, weights)
    assert (served.argmax(1) == y).mean() > (raw.argmax(1) == y).mean() + 0.1
    slices = exam_slices(logits, data, y, 1.0, 0.5)
    assert set(slices["all (restricted to the ordered exam, as served)"]) >= {"top1", "top3", "coverage_at_90", "coverage_at_95"}
    assert any(k.startswith("short reason") and v["n"] > 0 for k, v in slices.items())
    assert any(k.startswith("long narrative") and v["n"] > 0 for k, v in slices.items())
    assert "coverage at 95 % precision" in slices_markdown(slices)
    calibration = {"temperature": 1.0, "abstain_below": 0.0, "confidence_top_k": 1, "val": {}}
    out = calibrate_on_exams(calibration, logits, data, y, 0.95)
    answered = served.max(1) >= out["abstain_below"]
    assert out["val"]["restricted_to_ordered_exam"] and (served.argmax(1) == y)[answered].mean() >= 0.95
