"""Serving-cost figures the training report and the bench both use: percentiles of latencies and
the resident memory of a process."""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Sequence
from pathlib import Path


def percentile(values: Collection[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between the two nearest ranks
    (numpy's default method); NaN for no values."""
    if len(values) == 0:
        return float("nan")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(float(v) for v in values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), min(math.floor(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(ms: Sequence[float]) -> dict[str, float]:
    """``n``, ``p50_ms``, ``p95_ms`` and ``mean_ms`` of per-order times in milliseconds, to 3 decimals."""
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p95_ms": round(percentile(ms, 95), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if len(ms) else float("nan"),
    }


def vm_rss_kb(pid: int) -> int | None:
    """VmRSS of a process from /proc, in kB (KiB); None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def kb_to_mb(kb: int | None) -> float | None:
    """KiB to MB (10^6 bytes), one decimal; None stays None."""
    return None if kb is None else round(kb * 1024 / 1e6, 1)
