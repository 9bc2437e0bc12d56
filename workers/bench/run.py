"""``run_bench``: every measurement of ``workers.bench.measurements`` once, in this order (the slow
services start first and sit idle while the models are timed, so both latency measurements see
the same machine), then the table."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from rich.console import Console

from models.diagnosis import load_diagnosis_model
from models.registry import ModelRegistry
from models.runtime import TextClassifier
from schemas.tasks import TASKS
from schemas.text import build_model_input
from workers.bench.measurements import (
    TextClassifiers,
    build_bundles,
    measure_fhir_transactions,
    measure_inference,
    measure_pipeline,
    model_info,
    model_sizes,
    run_baseline_process,
    token_stats,
    worker_memory,
)
from workers.bench.orders import fixture_orders, generated_orders, make_orders, new_tag
from workers.bench.table import print_table, table_rows
from workers.local import LocalStack
from workers.pipeline import ModelSet
from workers.settings import Settings

# the bench's own Redis database, so that its tasks never reach another worker on the same Redis
BENCH_REDIS_DB = 14


def bench_redis_url() -> str:
    """Redis at the port of ``EHRW_REDIS_URL`` (6379 by default), database ``BENCH_REDIS_DB``."""
    url = os.environ.get("EHRW_REDIS_URL", "redis://127.0.0.1:6379/0")
    return f"redis://127.0.0.1:{urlsplit(url).port or 6379}/{BENCH_REDIS_DB}"


def bench_app(redis_url: str) -> Celery:
    """``workers.app.app``, the app the dispatcher sends tasks with, on ``redis_url``. Celery opens
    its connections on first use, and nothing in the bench's process (``ehr-worker bench``) has sent
    or inspected anything before this."""
    from workers.app import app

    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    return app


def run_bench(
    *,
    orders: int = 200,
    latency_orders: int = 300,
    registry: str | Path | None = None,
    json_out: str | Path | None = None,
    concurrency: int = 2,
    fhir_clients: int = 2,
    batch_size: int = 32,
    source: str = "fixtures",
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Run every measurement once, print the table, write ``json_out``; returns the figures."""
    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=130)
    if orders < 1 or latency_orders < 1:
        raise ValueError("orders and latency_orders must be >= 1")
    root = Path(registry or os.environ.get("EHRW_MODEL_REGISTRY") or "registry").resolve()
    reg = ModelRegistry(root)
    for task in TASKS:
        reg.verify(task)  # a missing or corrupt model stops here, with the registry's own message
    tag = new_tag()
    base = fixture_orders() if source == "fixtures" else generated_orders(max(orders, latency_orders))
    figures: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "orders": orders,
            "latency_orders": latency_orders,
            "batch_size": batch_size,
            "worker_concurrency": concurrency,
            "fhir_clients": fhir_clients,
            "source": source,
            "distinct_order_texts": len(base),
            "registry": str(root),
            "models": model_info(reg),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
    }

    latency_texts = [build_model_input(sr) for sr in make_orders(base, latency_orders, f"{tag}-lat")]
    console.print(f"[bold]ehr-worker bench[/] registry {root}, {orders} orders end to end, {latency_orders} for latency")

    redis_url = bench_redis_url()
    settings = Settings(kafka_topic=f"bench-{tag}", kafka_group=f"bench-{tag}", kafka_dlq_topic=f"bench-{tag}.dlq",
                        kafka_result_topic=f"bench-{tag}.results", redis_url=redis_url, model_registry=root,
                        model_threads=1)
    stack = LocalStack(settings, app=bench_app(redis_url))
    with stack:
        # -- services (idle until step 3) --
        s = stack.settings
        console.print(f"started Kafka (Tansu) {s.kafka_bootstrap}, FHIR (sekmet) {s.fhir_base_url}, "
                      f"Redis {redis_url}")

        # -- 1. ehr-worker inference --
        models = TextClassifiers(protocol=TextClassifier.load(reg.current_dir("protocol"), threads=1),
                                 diagnosis=load_diagnosis_model(reg.current_dir("diagnosis"), threads=1))
        figures["orders_text"] = token_stats(models.protocol, latency_texts)
        ours = measure_inference(models, latency_texts, batch_size=batch_size, progress=progress)

        # -- 2. naive baseline (own process): inference, then end to end with sync FHIR --
        console.print("naive baseline: loading torch and the fp32 models in a separate process…")
        baseline = run_baseline_process(str(root), latency_texts, make_orders(base, orders, f"{tag}-nb"),
                                        s.fhir_base_url, progress)
        figures["inference"] = {"ehr_worker": ours, "baseline": baseline["inference"]}

        # -- worker --
        stack.purge()  # leftovers of an interrupted bench
        console.print(f"starting celery -A workers worker (prefork, concurrency {concurrency})…")
        worker = stack.start_worker(concurrency=concurrency, name="bench")
        others = sorted(
            name for reply in stack.app.control.ping(timeout=1.0) for name in reply
            if not name.startswith(f"bench-{os.getpid()}-")
        )  # fmt: skip
        figures["config"]["other_workers_on_broker"] = others

        # -- 3. FHIR server transaction throughput --
        served = ModelSet(models.protocol, models.diagnosis)
        warm = build_bundles(served, make_orders(base, 2, f"{tag}-warm"))
        bundles = build_bundles(served, make_orders(base, orders, f"{tag}-fx"))
        measure_fhir_transactions(s.fhir_base_url, warm, orders=len(warm), clients=1, progress=False)
        fhir_fig = measure_fhir_transactions(s.fhir_base_url, bundles, orders=orders, clients=fhir_clients,
                                             progress=progress)

        # -- 4. ehr-worker end to end --
        pipeline = measure_pipeline(stack, make_orders(base, orders, f"{tag}-e2e"), progress=progress)
        memory = worker_memory(worker.pid)
        memory["baseline_process_rss_mb"] = baseline["rss_mb"]

    figures["config"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    figures["end_to_end"] = end_to_end_figures(ours, fhir_fig, pipeline, baseline, concurrency)
    figures["inference"]["speedup_p50"] = round(baseline["inference"]["p50_ms"] / ours["p50_ms"], 2)
    figures["baseline_model"] = baseline["model"]
    figures["size"] = model_sizes(reg)
    figures["memory"] = memory
    figures["rows"] = table_rows(figures)
    print_table(figures, console)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"figures written to {json_out}")
    return figures


def end_to_end_figures(ours: dict, fhir_fig: dict, pipeline: dict, baseline: dict, concurrency: int) -> dict:
    """The end-to-end rates against the limit set by the models and the FHIR server."""
    processes = max(1, min(concurrency, os.cpu_count() or 1))
    model_tput = ours["one_at_a_time_orders_per_s"] * processes
    limit = min(model_tput, fhir_fig["orders_per_s"])
    # Informational: when the models and the FHIR server share the same CPUs (as here), their costs
    # add up per order instead of overlapping, so this is the tighter bound on such a machine.
    shared_cpu = 1.0 / (1.0 / model_tput + 1.0 / fhir_fig["orders_per_s"])
    return {
        "ehr_worker": pipeline,
        "baseline": baseline["end_to_end"],
        "fhir_server": fhir_fig,
        "model": {
            "orders_per_s_one_process": ours["one_at_a_time_orders_per_s"],
            "processes": processes,
            "orders_per_s": round(model_tput, 1),
        },
        "limit": {
            "orders_per_s": round(limit, 2),
            "bound_by": "model" if model_tput <= fhir_fig["orders_per_s"] else "fhir_server",
            "formula": "min(model one-order-at-a-time orders/s of one process x min(worker concurrency, CPUs), "
            "FHIR server transaction orders/s with 2 clients)",
            "shared_cpu_orders_per_s": round(shared_cpu, 2),
            "shared_cpu_formula": "1 / (1 / model orders/s + 1 / FHIR orders/s): approximate, assumes each "
            "measurement kept the CPUs busy and both now share them",
        },
        "pct_of_shared_cpu_bound": round(100.0 * pipeline["orders_per_s"] / shared_cpu, 1),
        "pct_of_limit": round(100.0 * pipeline["orders_per_s"] / limit, 1),
        "speedup_vs_baseline": round(pipeline["orders_per_s"] / baseline["end_to_end"]["orders_per_s"], 2),
    }
