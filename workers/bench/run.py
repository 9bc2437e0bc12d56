"""``run_bench``: every measurement once, in this order, then the tables.

1. services start (Kafka, FHIR, Redis) and sit idle while the models are timed in this process;
2. the naive baseline in its own process (inference, then end to end on ``baseline_orders``);
3. the FHIR server's own throughput (1 order per transaction and ``k`` per transaction);
4. for each worker concurrency: a worker, then one end-to-end run per N (``orders``), memory and
   CPU of every process at the start and end of each run, and one profiled run (py-spy);
5. the cold start of a fresh worker.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
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
from workers.bench import profile
from workers.bench.coldstart import measure_cold_start
from workers.bench.e2e import WARMUP_ORDERS, measure_pipeline
from workers.bench.fhir_server import fhir_sweep
from workers.bench.measurements import (
    TextClassifiers,
    build_bundles,
    machine_reference,
    measure_inference,
    model_info,
    model_sizes,
    run_baseline_process,
    token_stats,
)
from workers.bench.orders import fixture_orders, generated_orders, make_orders, new_tag
from workers.bench.procs import snapshot, stack_processes
from workers.bench.summary import end_to_end_figures, pipeline_cpu, stage_profile
from workers.bench.table import print_table, table_rows
from workers.local import LocalStack
from workers.pipeline import ModelSet
from workers.settings import Settings

# the bench's own Redis database by default, so that its tasks never reach another worker on the same Redis
BENCH_REDIS_DB = 14


def bench_redis_url(db: int = BENCH_REDIS_DB) -> str:
    """Redis at the port of ``EHRW_REDIS_URL`` (6379 by default), database ``db``."""
    url = os.environ.get("EHRW_REDIS_URL", "redis://127.0.0.1:6379/0")
    return f"redis://127.0.0.1:{urlsplit(url).port or 6379}/{db}"


def bench_app(redis_url: str) -> Celery:
    """``workers.app.app``, the app the dispatcher sends tasks with, on ``redis_url``. Celery opens
    its connections on first use, and nothing in the bench's process (``ehr-worker bench``) has sent
    or inspected anything before this."""
    from workers.app import app

    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    return app


def _run_settings(base: Settings, tag: str) -> Settings:
    return base.model_copy(update={"kafka_topic": f"bench-{tag}", "kafka_group": f"bench-{tag}",
                                   "kafka_dlq_topic": f"bench-{tag}.dlq", "kafka_result_topic": f"bench-{tag}.results"})


def run_bench(
    *,
    orders: Sequence[int] = (200, 2000, 20000),
    concurrency: Sequence[int] = (1, 2),
    latency_orders: int = 300,
    baseline_orders: int | None = None,
    fhir_orders: int = 1000,
    fhir_clients: Sequence[int] = (2,),
    fhir_batch_sizes: Sequence[int] | None = None,
    profile_orders: int = 2000,
    registry: str | Path | None = None,
    json_out: str | Path | None = None,
    profile_dir: str | Path | None = None,
    redis_db: int = BENCH_REDIS_DB,
    batch_size: int = 32,
    source: str = "fixtures",
    progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Run every measurement once, print the tables, write ``json_out``; returns the figures."""
    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=140)
    orders, concurrency = sorted(set(orders)), sorted(set(concurrency))
    if not orders or min(orders) < 1 or latency_orders < 1 or not concurrency or min(concurrency) < 1:
        raise ValueError("orders, concurrency and latency_orders must be >= 1")
    root = Path(registry or os.environ.get("EHRW_MODEL_REGISTRY") or "registry").resolve()
    reg = ModelRegistry(root)
    for task in TASKS:
        reg.verify(task)  # a missing or corrupt model stops here, with the registry's own message
    tag = new_tag()
    baseline_n = baseline_orders or min(orders)
    base = fixture_orders() if source == "fixtures" else generated_orders(max(baseline_n, latency_orders))
    redis_url = bench_redis_url(redis_db)
    # its own Celery queue too: no other worker on the same Redis (another checkout's) takes its tasks
    settings = Settings(kafka_topic=f"bench-{tag}", kafka_group=f"bench-{tag}", redis_url=redis_url,
                        model_registry=root, model_threads=1, celery_queue=f"bench-{tag}")
    write_batch = settings.write_batch_orders
    batch_sizes = sorted(set(fhir_batch_sizes or (1, write_batch)))
    profile_dir = Path(profile_dir or f"bench-profile-{tag}")
    figures: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "orders": orders, "worker_concurrency": concurrency, "latency_orders": latency_orders,
            "baseline_orders": baseline_n, "fhir_orders": fhir_orders, "fhir_clients": list(fhir_clients),
            "fhir_orders_per_transaction": batch_sizes, "write_batch_orders": write_batch,
            "max_in_flight": settings.max_in_flight, "max_in_flight_orders": settings.max_in_flight_orders,
            "batch_size": batch_size, "source": source, "distinct_order_texts": len(base), "registry": str(root),
            "models": model_info(reg), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "profile_dir": str(profile_dir),
            "machine": machine_reference(),
        },
    }  # fmt: skip
    latency_texts = [build_model_input(sr) for sr in make_orders(base, latency_orders, f"{tag}-lat")]
    console.print(f"[bold]ehr-worker bench[/] registry {root}; N = {orders}, worker concurrency {concurrency}")

    # The FHIR server's own cost per order grows with its database (64.7 orders/s empty, 49.3 holding
    # 10,000 orders' write-backs, session 18), so: no request log in its database (sekmet's advice for
    # load runs), every run on an empty server, and the server alone measured empty and holding the
    # largest run's orders (workers.bench.summary.fhir_ceiling).
    stack = LocalStack(settings, app=bench_app(redis_url), fhir_settings={"log_inbound": False})
    with stack:
        s = stack.settings
        console.print(f"started Kafka (Tansu) {s.kafka_bootstrap}, FHIR (sekmet) {s.fhir_base_url}, Redis {redis_url}")

        # -- 1. ehr-worker inference --
        models = TextClassifiers(protocol=TextClassifier.load(reg.current_dir("protocol"), threads=1),
                                 diagnosis=load_diagnosis_model(reg.current_dir("diagnosis"), threads=1))
        figures["orders_text"] = token_stats(models.protocol, latency_texts)
        ours = measure_inference(models, latency_texts, batch_size=batch_size, progress=progress)

        # -- 2. naive baseline (own process): inference, then end to end with sync FHIR --
        console.print("naive baseline: loading torch and the fp32 models in a separate process…")
        baseline = run_baseline_process(str(root), latency_texts, make_orders(base, baseline_n, f"{tag}-nb"),
                                        s.fhir_base_url, progress)
        figures["inference"] = {"ehr_worker": ours, "baseline": baseline["inference"]}

        # -- 3. the FHIR server on its own --
        served = ModelSet(models.protocol, models.diagnosis)

        def make_bundles(n: int, run_tag: str) -> tuple[list[dict], int]:
            return build_bundles(served, make_orders(base, n, f"{tag}-{run_tag}")), n

        stack.services.restart_fhir_empty()
        warm, _ = make_bundles(4, "fxwarm")
        fhir = fhir_sweep(s.fhir_base_url, lambda n, t: (warm, len(warm)), orders=len(warm), clients=[1],
                          batch_sizes=[1], progress=False)  # first requests of a fresh server
        fhir = fhir_sweep(s.fhir_base_url, make_bundles, orders=fhir_orders, clients=fhir_clients,
                          batch_sizes=batch_sizes, progress=progress)

        # -- 4. end to end, per worker concurrency and N, each on an empty FHIR server --
        # (its queue is new: no leftovers of an interrupted bench to purge)
        runs: list[dict] = []
        profiled: dict[str, Any] = {}
        fhir_full: dict | None = None
        largest = (max(orders), max(concurrency))
        plan = [(conc, n, False) for conc in concurrency for n in orders]
        if profile_orders:
            first_top = next(i for i, (conc, _, _) in enumerate(plan) if conc == max(concurrency))
            plan.insert(first_top, (max(concurrency), min(profile_orders, max(orders)), True))
        for conc, n, profiled_run in plan:
            stack.services.restart_fhir_empty()
            console.print(f"N = {n}{' (profiled)' if profiled_run else ''}: empty FHIR server, "
                          f"celery -A workers worker (prefork, concurrency {conc})…")
            worker = stack.start_worker(concurrency=conc, name="bench", EHRW_WORKER_HTTP_PORT="0",
                                        EHRW_CELERY_QUEUE=s.celery_queue)
            others = sorted(name for reply in stack.app.control.ping(timeout=1.0) for name in reply
                            if not name.startswith(f"bench-{os.getpid()}-"))  # fmt: skip
            figures["config"]["other_workers_on_broker"] = others
            run_tag = f"{tag}-c{conc}-n{n}{'-prof' if profiled_run else ''}"
            batch = make_orders(base, n, run_tag)
            warmup = make_orders(base, WARMUP_ORDERS, f"{run_tag}-w")
            procs = stack_processes(stack, worker.pid)
            before = snapshot(procs)
            recorders: list[profile.Recorder] = []

            def start_profile(run_tag: str = run_tag, pid: int = worker.pid) -> None:
                recorders.append(profile.Recorder(os.getpid(), profile_dir / f"{run_tag}-consumer.txt"))
                recorders.append(profile.Recorder(pid, profile_dir / f"{run_tag}-worker.txt", subprocesses=True))

            result = measure_pipeline(_run_settings(s, run_tag), batch, warmup, progress=progress,
                                      on_start=start_profile if profiled_run else None)
            after = snapshot(procs)
            worker.stop()
            stack.workers.remove(worker)
            result.update(worker_concurrency=conc, processes={"start": before, "end": after})
            if profiled_run:
                consumer_lines, worker_lines = (r.stop() for r in recorders)
                errors = [r.error for r in recorders if r.error]
                profiled = stage_profile(consumer_lines, worker_lines, orders=n, rate=recorders[0].rate,
                                         errors=errors, evidence=[str(r.out) for r in recorders])
                profiled["run"] = {k: result[k] for k in ("orders", "orders_per_s", "worker_concurrency")}
                profiled["pipeline_cpu"] = pipeline_cpu(before, after, profiled, orders=n)
                continue
            runs.append(result)
            if (n, conc) == largest:
                figures["memory_largest_run"] = {"orders": n, "worker_concurrency": conc,
                                                 "start": before, "end": after}
                console.print(f"the FHIR server alone again, holding the {n + WARMUP_ORDERS} orders of that run…")
                fhir_full = fhir_sweep(s.fhir_base_url, lambda k, t: make_bundles(k, f"full-{t}"),
                                       orders=fhir_orders, clients=fhir_clients, batch_sizes=batch_sizes,
                                       progress=progress)

        # -- 5. cold start --
        cold = measure_cold_start(stack, make_orders(base, 1, f"{tag}-cold")[0], concurrency=max(concurrency))

    figures["config"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    figures["fhir_server"] = fhir
    figures["fhir_server_full"] = fhir_full
    figures["runs"] = runs
    figures["profile"] = profiled
    figures["cold_start"] = cold
    figures["end_to_end"] = end_to_end_figures(ours, fhir, runs, baseline, fhir_full, max(orders) + WARMUP_ORDERS)
    figures["inference"]["speedup_p50"] = round(baseline["inference"]["p50_ms"] / ours["p50_ms"], 2)
    figures["baseline_model"] = baseline["model"]
    figures["size"] = model_sizes(reg)
    figures["memory"] = {"baseline_process_rss_mb": baseline["rss_mb"]}
    figures["rows"] = table_rows(figures)
    print_table(figures, console)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"figures written to {json_out}")
    return figures
