"""``ehr-worker bench`` runs end to end on the real services and reports every figure.

Timings are never asserted here (DESIGN.md: speed targets are read off the benchmark's output);
this only checks that one small run produces every figure, positive, and prints the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.services, pytest.mark.slow]

FIGURES = [
    ("inference", "ehr_worker", "p50_ms"),
    ("inference", "ehr_worker", "p95_ms"),
    ("inference", "ehr_worker", "protocol_p50_ms"),
    ("inference", "ehr_worker", "diagnosis_p50_ms"),
    ("inference", "ehr_worker", "one_at_a_time_orders_per_s"),
    ("inference", "ehr_worker", "batched_orders_per_s"),
    ("inference", "baseline", "p50_ms"),
    ("inference", "baseline", "p95_ms"),
    ("inference", "baseline", "one_at_a_time_orders_per_s"),
    ("inference", "speedup_p50"),
    ("end_to_end", "ehr_worker", "orders_per_s"),
    ("end_to_end", "ehr_worker", "seconds"),
    ("end_to_end", "baseline", "orders_per_s"),
    ("end_to_end", "baseline", "seconds"),
    ("end_to_end", "fhir_server", "orders_per_s"),
    ("end_to_end", "fhir_server", "transactions_per_s"),
    ("end_to_end", "model", "orders_per_s"),
    ("end_to_end", "limit", "orders_per_s"),
    ("end_to_end", "limit", "shared_cpu_orders_per_s"),
    ("end_to_end", "pct_of_limit"),
    ("end_to_end", "speedup_vs_baseline"),
    ("size", "int8_mb"),
    ("size", "fp32_mb"),
    ("size", "int8_over_fp32"),
    ("memory", "child_rss_mb_max"),
    ("memory", "parent_rss_mb"),
    ("memory", "baseline_process_rss_mb", "end"),
]


def _get(doc: dict, path: tuple[str, ...]):
    for key in path:
        doc = doc[key]
    return doc


def test_bench_reports_every_figure(tiny_registry, tmp_path):
    # A subprocess, as a user runs it: the bench points its own Celery app at Redis database 14,
    # which must not leak into this test session's app (database 15).
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "bench", "--orders", "20", "--latency-orders", "20",
         "--registry", str(tiny_registry), "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(out.read_text())
    for path in FIGURES:
        value = _get(written, path)
        assert isinstance(value, (int, float)) and value > 0, (path, value)
    assert len(written["memory"]["children_rss_mb"]) == 2  # concurrency 2: two pool processes

    pipeline = written["end_to_end"]["ehr_worker"]
    assert pipeline["orders"] == 20 and pipeline["consumer"]["committed"] == 20
    assert pipeline["event_outcomes"] == {"done": 20}
    assert set(pipeline["order_outcomes"]) <= {"written", "no_suggestion"}
    assert len(pipeline["models_used"]) == 2  # protocol and diagnosis, as the worker reported them
    assert written["end_to_end"]["baseline"]["orders"] == 20
    assert written["end_to_end"]["limit"]["bound_by"] in ("model", "fhir_server")
    assert isinstance(written["config"]["other_workers_on_broker"], list)  # warned about, not a failure

    rows = written["rows"]
    assert len(rows) == 11 and all({"metric", "ehr_worker", "baseline", "ratio", "target", "met"} <= set(r) for r in rows)
    text = proc.stdout
    for needle in ("ehr-worker bench", "naive baseline", "end-to-end orders/s", "% of limit", "worker process RSS", "(c) model ="):
        assert needle in text, needle
