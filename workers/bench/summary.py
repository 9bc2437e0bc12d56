"""Figures derived from the bench's measurements: end-to-end rates against the baseline and the FHIR
server's best, the per-stage profile per order, and the pipeline's own CPU per order."""

from __future__ import annotations

import re
from typing import Any

from workers.bench import profile

# py-spy stages that are the models' own work (excluded from "the pipeline's own CPU")
MODEL_STAGES = ("tokenize", "protocol model", "diagnosis model")


def fhir_ceiling(empty: float, full: float | None, full_orders: int | None, n: int) -> float:
    """The FHIR server's own orders/s over a run that writes ``n`` orders into an empty server. Alone,
    the server did ``empty`` orders/s empty and ``full`` holding ``full_orders`` orders; its time per
    order is taken as growing linearly with the orders it holds (SQLite indexes and tables grow), and
    averaged over 0..n. Without a ``full`` measurement: ``empty``."""
    if not full or not full_orders:
        return empty
    t_empty, t_full = 1.0 / empty, 1.0 / full
    return 1.0 / (t_empty + (t_full - t_empty) * min(n, full_orders) / (2.0 * full_orders))


def end_to_end_figures(ours: dict, fhir: dict, runs: list[dict], baseline: dict, fhir_full: dict | None = None,
                       full_orders: int | None = None) -> dict:
    """Every run against the naive baseline and the FHIR server's best throughput, and the headline
    run (the largest N at the highest worker concurrency). Each run starts on an empty FHIR server;
    ``fhir`` is the server alone empty, ``fhir_full`` alone holding the largest run's ``full_orders``
    orders, and a run's "% of FHIR best" is against :func:`fhir_ceiling` for its N."""
    base_rate = baseline["end_to_end"]["orders_per_s"]
    best = fhir["best"]["orders_per_s"]
    full = fhir_full["best"]["orders_per_s"] if fhir_full else None
    single = (fhir.get("best_single_order") or fhir["best"])["orders_per_s"]
    table = []
    for r in runs:
        ceiling = fhir_ceiling(best, full, full_orders, r["orders"])
        table.append({
            "orders": r["orders"], "worker_concurrency": r["worker_concurrency"], "orders_per_s": r["orders_per_s"],
            "speedup_vs_baseline": round(r["orders_per_s"] / base_rate, 2),
            "fhir_best_orders_per_s": round(ceiling, 2),
            "pct_of_fhir_best": round(100.0 * r["orders_per_s"] / ceiling, 1),
            "pct_of_fhir_best_empty": round(100.0 * r["orders_per_s"] / best, 1),
            "pct_of_fhir_single_order": round(100.0 * r["orders_per_s"] / single, 1),
            **{f"written_{k}": v for k, v in r["latency_produce_to_written"].items()},
            **{f"committed_{k}": v for k, v in r["latency_produce_to_committed"].items()},
        })  # fmt: skip
    i = max(range(len(runs)), key=lambda i: (runs[i]["orders"], runs[i]["worker_concurrency"], runs[i]["orders_per_s"]))
    headline, head_row = runs[i], table[i]
    return {
        "ehr_worker": headline,
        "baseline": baseline["end_to_end"],
        "fhir_server": fhir["best"],
        "fhir_server_single_order": fhir.get("best_single_order"),
        "fhir_server_full": fhir_full["best"] if fhir_full else None,
        "fhir_server_full_orders": full_orders if fhir_full else None,
        "model": {"orders_per_s_one_process": ours["one_at_a_time_orders_per_s"],
                  "batched_orders_per_s_one_process": ours["batched_orders_per_s"]},
        "runs": table,
        **{k: head_row[k] for k in ("fhir_best_orders_per_s", "pct_of_fhir_best", "pct_of_fhir_best_empty",
                                    "speedup_vs_baseline")},
    }


def stage_profile(consumer_lines: list[str], worker_lines: list[str], *, orders: int, rate: int,
                  errors: list[str], evidence: list[str]) -> dict[str, Any]:
    """Per-order milliseconds of each stage: the consumer's main thread (its run loop) and the
    worker's pool processes (task bodies), from py-spy's raw samples (wall time, idle included)."""
    if errors and not (consumer_lines or worker_lines):
        return {"error": "; ".join(errors)}
    root_consumer = re.compile(r"EventConsumer\.run \(.*connectors/kafka\.py")
    root_worker = re.compile(r"celery/app/trace\.py|workers/tasks\.py")
    consumer = profile.classify(consumer_lines, profile.CONSUMER_STAGES, root=root_consumer)
    worker = profile.classify(worker_lines, profile.WORKER_STAGES, root=root_worker)
    return {
        "method": f"py-spy record --idle --nonblocking --rate {rate}, raw stacks; stage = first rule matching "
        "a frame (workers/bench/profile.py); ms per order = samples / rate / orders (worker: all pool processes)",
        "orders": orders,
        "consumer_ms_per_order": profile.per_order_ms(consumer, rate, orders),
        "worker_ms_per_order": profile.per_order_ms(worker, rate, orders),
        "consumer_samples": consumer.samples,
        "worker_samples": worker.samples,
        "evidence": evidence,
        "errors": errors,
    }


def pipeline_cpu(before: dict[str, dict], after: dict[str, dict], prof: dict[str, Any], *, orders: int) -> dict:
    """CPU milliseconds per order of every process over the profiled run, and the pipeline's own
    (consumer + worker parent and children, less the model stages of the profile); the FHIR server,
    Kafka and Redis are their own processes and listed apart."""
    per_process: dict[str, float] = {}
    for name, end in after.items():
        start = before.get(name)
        if start is None or start.get("cpu_s") is None or end.get("cpu_s") is None:
            continue
        per_process[name] = round((end["cpu_s"] - start["cpu_s"]) / orders * 1000.0, 3)
    consumer = sum(v for k, v in per_process.items() if k.startswith("consumer"))
    worker = sum(v for k, v in per_process.items() if k.startswith("worker"))
    ours = consumer + worker
    # The share of the worker's CPU the models take: their samples over the samples of the stages
    # that compute (waits on the FHIR server and Redis left out), so a loaded machine's run-queue
    # waits, which py-spy sees as activity, scale both alike.
    stages = prof.get("worker_ms_per_order") or {}
    waiting = ("FHIR write", "context fetch", "order read (id-only events)", "task result store (Redis)")
    computing = sum(v for k, v in stages.items() if k not in waiting)
    share = sum(stages.get(stage, 0.0) for stage in MODEL_STAGES) / computing if computing else 0.0
    models = worker * share
    return {
        "cpu_ms_per_order_by_process": per_process,
        "consumer_and_worker_cpu_ms_per_order": round(ours, 3),
        "model_stages_ms_per_order": round(models, 3),
        "pipeline_own_cpu_ms_per_order": round(max(0.0, ours - models), 3),
        "model_share_of_worker_cpu": round(share, 3),
        "note": "pipeline own = consumer + worker CPU (from /proc) - worker CPU x the models' share of the "
        "worker's computing samples (profile, waits on FHIR/Redis left out); the FHIR server, Kafka and Redis "
        "are separate processes (Redis may be shared with other users of the machine)",
    }
