"""``ehr-worker bench`` runs end to end on the real services and reports every figure.

Timings are never asserted here (DESIGN.md: speed targets are read off the benchmark's output);
this only checks that one small run produces every figure, positive, and prints the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    ("inference", "baseline", "one_at_a_time_orders_per_s"),
    ("inference", "speedup_p50"),
    ("config", "machine", "python_ms"),  # the reference workloads that let runs on two machines be compared
    ("config", "machine", "numpy_ms"),
    ("end_to_end", "ehr_worker", "orders_per_s"),
    ("end_to_end", "ehr_worker", "seconds"),
    ("end_to_end", "ehr_worker", "latency_produce_to_written", "p50_ms"),
    ("end_to_end", "ehr_worker", "latency_produce_to_written", "p99_ms"),
    ("end_to_end", "ehr_worker", "latency_produce_to_committed", "p99_ms"),
    ("end_to_end", "baseline", "orders_per_s"),
    ("end_to_end", "fhir_server", "orders_per_s"),
    ("end_to_end", "fhir_server_single_order", "orders_per_s"),
    ("end_to_end", "pct_of_fhir_best"),
    ("end_to_end", "speedup_vs_baseline"),
    ("cold_start", "seconds_to_first_order"),
    ("profile", "pipeline_cpu", "consumer_and_worker_cpu_ms_per_order"),
    ("size", "int8_mb"),
    ("memory", "baseline_process_rss_mb", "end"),
]


def _get(doc: dict, path: tuple[str, ...]):
    for key in path:
        doc = doc[key]
    return doc


def test_bench_reports_every_figure(tiny_registry, tmp_path):
    # A subprocess, as a user runs it: the bench points its own Celery app at Redis database 14,
    # which must not leak into this test session's app.
    out, prof = tmp_path / "bench.json", tmp_path / "profile"
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "bench", "--quick", "--registry", str(tiny_registry),
         "--json", str(out), "--profile-dir", str(prof)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(out.read_text())
    for path in FIGURES:
        value = _get(written, path)
        assert isinstance(value, (int, float)) and value > 0, (path, value)

    (run,) = written["runs"]  # --quick: N = 20 at concurrency 2
    assert (run["orders"], run["worker_concurrency"]) == (20, 2) and run["consumer"]["committed"] == 22
    assert run["event_outcomes"] == {"done": 22}  # the 2 warm-up orders included
    assert set(run["order_outcomes"]) <= {"written", "no_suggestion"}
    assert len(run["models_used"]) == 2  # protocol and diagnosis, as the worker reported them
    assert run["latency_produce_to_written"]["n"] == 20
    assert written["cold_start"]["first_order_status"] in ("written", "no_suggestion")

    # memory of every process at the start and the end of the largest run
    mem = written["memory_largest_run"]
    for moment in ("start", "end"):
        names = set(mem[moment])
        assert {"consumer (bench process)", "worker parent", "broker (Tansu)", "FHIR (sekmet)"} <= names
        assert sum(n.startswith("worker child") for n in names) == 2
        assert all(p["rss_mb"] > 0 for p in mem[moment].values())

    fhir = written["fhir_server"]["runs"]
    assert {r["orders_per_transaction"] for r in fhir} == {1, written["config"]["write_batch_orders"]}
    # the server alone again, holding the largest run's orders: each run's ceiling lies between the two
    full = written["fhir_server_full"]["runs"]
    assert {r["orders_per_transaction"] for r in full} == {1, written["config"]["write_batch_orders"]}
    empty_best, full_best = written["fhir_server"]["best"]["orders_per_s"], written["fhir_server_full"]["best"]["orders_per_s"]
    (row,) = written["end_to_end"]["runs"]
    assert min(empty_best, full_best) <= row["fhir_best_orders_per_s"] <= max(empty_best, full_best)

    # the per-stage profile, with its evidence on disk
    profile = written["profile"]
    assert profile["worker_samples"] > 0 and profile["consumer_samples"] > 0, profile
    assert "FHIR write" in profile["worker_ms_per_order"] and "protocol model" in profile["worker_ms_per_order"]
    assert all(Path(p).is_file() for p in profile["evidence"])
    assert isinstance(written["config"]["other_workers_on_broker"], list)  # warned about, not a failure

    rows = written["rows"]
    assert len(rows) == 15 and all({"metric", "ehr_worker", "baseline", "ratio", "target", "met"} <= set(r) for r in rows)
    text = proc.stdout
    for needle in ("ehr-worker bench", "naive baseline", "end-to-end orders/s", "% of the FHIR server's best",
                   "per-stage time per order", "memory (RSS, MB) of every process", "cold start",
                   "reference workloads"):  # fmt: skip
        assert needle in text, needle


def test_the_fhir_ceiling_averages_the_servers_time_per_order_over_the_runs_growth():
    from workers.bench.summary import fhir_ceiling

    assert fhir_ceiling(60.0, None, None, 20000) == 60.0  # no measurement of the full server: the empty one
    # time per order 1/60 s empty, 1/40 s holding 20,000 orders: a run of 20,000 averages the two
    assert fhir_ceiling(60.0, 40.0, 20000, 20000) == pytest.approx(1 / ((1 / 60 + 1 / 40) / 2))
    assert fhir_ceiling(60.0, 40.0, 20000, 2000) == pytest.approx(1 / (1 / 60 + (1 / 40 - 1 / 60) * 0.05))
    assert fhir_ceiling(60.0, 40.0, 20000, 0) == pytest.approx(60.0)
