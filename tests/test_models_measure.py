"""models.measure: the one percentile helper (training report and bench) agrees with numpy."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest

from models.measure import kb_to_mb, latency_summary, percentile, vm_rss_kb


@pytest.mark.parametrize("n", [1, 2, 5, 300])
@pytest.mark.parametrize("q", [0, 12.5, 50, 95, 100])
def test_percentile_is_numpys_linear_percentile(n, q):
    values = [random.Random(n).uniform(0, 50) for _ in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
    assert percentile(np.asarray(values), q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)


def test_no_values_and_bad_q():
    assert math.isnan(percentile([], 50)) and latency_summary([])["n"] == 0
    with pytest.raises(ValueError, match=r"q must be in \[0, 100\]"):
        percentile([1.0], 101)


def test_latency_summary_and_rss():
    summary = latency_summary([1.0, 2.0, 3.0, 4.0])
    assert summary == {"n": 4, "p50_ms": 2.5, "p95_ms": 3.85, "mean_ms": 2.5}
    rss = vm_rss_kb(os.getpid())
    assert rss is None or (rss > 0 and kb_to_mb(rss) > 0)
    assert kb_to_mb(None) is None
