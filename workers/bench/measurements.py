"""The bench's measurements, each a function that returns its figures.

1. ehr-worker model inference in this process (ONNX Runtime int8, ``TextClassifier`` with
   ``threads=1``): per-order latency of protocol + diagnosis on the same order text, one order at
   a time, and batched throughput.
2. The naive baseline (``training.naive_baseline``) in a process of its own, so that torch never
   enters this one and its memory can be read on its own.
3. The FHIR server's own transaction throughput: pre-built write-back bundles of fresh orders
   posted by concurrent clients.
4. ehr-worker end to end: events on a fresh Kafka topic, the real consumer and dispatcher and a
   real ``celery worker``, until every offset is committed.
5. Size (the manifests' ``metrics.size``) and memory (VmRSS of the worker's pool processes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from connectors.fhir import FhirClient
from connectors.kafka import ConsumerStats
from models.measure import kb_to_mb, latency_summary, percentile, vm_rss_kb
from models.registry import ModelRegistry
from models.runtime import TextClassifier
from schemas.tasks import TASKS
from schemas.text import build_model_input
from schemas.writeback import build_writeback_bundle
from workers.dispatch import build_consumer, build_dispatcher
from workers.local import LocalStack
from workers.pipeline import ModelSet, applicable_models, worth_writing


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


@dataclass
class TextClassifiers:
    """Both served models, as the worker loads them (``workers.pipeline.ModelSet`` of the runtime's classifiers)."""

    protocol: TextClassifier
    diagnosis: Any  # the phenotype ranker (models.diagnosis) or an older text classifier


def model_info(registry: ModelRegistry) -> dict[str, dict]:
    info: dict[str, dict] = {}
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


def measure_inference(models: TextClassifiers, texts: list[str], *, batch_size: int = 32, progress: bool = True) -> dict:
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
        protocol_p50_ms=round(percentile(prot, 50), 3),
        diagnosis_p50_ms=round(percentile(diag, 50), 3),
        # What one worker process can do: the pipeline runs one order per task, batch of one.
        one_at_a_time_orders_per_s=round(1000.0 / summary["mean_ms"], 1),
        batch_size=batch_size,
        batched_orders_per_s=round(len(texts) / min(batched_s), 1),
    )
    return summary


def token_stats(classifier: TextClassifier, texts: list[str]) -> dict:
    """Model-input lengths in word pieces, and the share cut at ``max_length``."""
    lengths = [len(ids) for ids in classifier.encoder.encode(texts)]
    max_len = classifier.manifest.max_length
    return {
        "tokens_p50": percentile(lengths, 50),
        "tokens_p95": percentile(lengths, 95),
        "max_length": max_len,
        "truncated_share": round(sum(n >= max_len for n in lengths) / max(1, len(lengths)), 3),
    }


def run_baseline_process(registry_root: str, latency_texts: list[str], orders: list[dict], fhir_base_url: str | None,
                         progress: bool = True, *, timeout_s: float = 3600) -> dict:
    """``python -m training.naive_baseline`` in a fresh interpreter (no torch in this process, its
    own RSS); the texts and orders go through a private temporary file, never the command line."""
    with tempfile.TemporaryDirectory(prefix="ehrw-baseline-") as tmp:  # mode 0700
        job, out = Path(tmp) / "job.json", Path(tmp) / "figures.json"
        job.write_text(json.dumps({"registry_root": registry_root, "latency_texts": latency_texts, "orders": orders,
                                   "fhir_base_url": fhir_base_url, "progress": progress}), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "training.naive_baseline", str(job), str(out)], check=False,
                              stdout=subprocess.DEVNULL, stderr=None if progress else subprocess.PIPE, text=True,
                              timeout=timeout_s)
        if proc.returncode != 0:
            last = ((proc.stderr or "").strip().splitlines() or ["see its output above"])[-1]
            raise RuntimeError(f"the naive baseline process failed (exit {proc.returncode}): {last}")
        return json.loads(out.read_text(encoding="utf-8"))


def build_bundles(models: ModelSet, orders: list[dict]) -> list[dict]:
    """The write-back bundles the pipeline would post for ``orders``: the pipeline's model gating,
    batched predictions, only the orders with something to write."""
    texts = [build_model_input(sr) for sr in orders]
    gates = [applicable_models(sr) for sr in orders]
    imaging = [i for i, (protocol, _) in enumerate(gates) if protocol]
    clinical = [i for i, (_, diagnosis) in enumerate(gates) if diagnosis]
    p_out = dict(zip(imaging, models.protocol.predict([texts[i] for i in imaging]))) if imaging else {}
    d_out = dict(zip(clinical, models.diagnosis.predict([texts[i] for i in clinical]))) if clinical else {}
    now = datetime.now(timezone.utc)
    return [build_writeback_bundle(sr, p_out.get(i), d_out.get(i), recorded=now) for i, sr in enumerate(orders)
            if worth_writing(p_out.get(i), d_out.get(i))]


def measure_fhir_transactions(base_url: str, bundles: list[dict], *, orders: int, clients: int = 2, progress: bool = True) -> dict:
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


def _timed_stats(clock: _CommitClock) -> ConsumerStats:
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
                for task in TASKS:
                    if isinstance(r.get(task), dict):
                        self.models.add(f"{r[task].get('model')}@{r[task].get('model_version')}")
        return outcomes


def measure_pipeline(stack: LocalStack, orders: list[dict], *, progress: bool = True,
                     idle_timeout_s: float = 120.0) -> dict:
    """The orders through Kafka, the consumer, Celery and FHIR on ``stack`` (its settings name a fresh topic)."""
    stack.create_topics()
    stack.publish((sr["id"].encode(), json.dumps(sr).encode()) for sr in orders)
    settings = stack.settings

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
    rss = {pid: kb for pid in children if (kb := vm_rss_kb(pid)) is not None}
    return {
        "parent_rss_mb": kb_to_mb(vm_rss_kb(worker_pid)),
        "children_rss_mb": [kb_to_mb(kb) for kb in rss.values()],
        "child_rss_mb_max": kb_to_mb(max(rss.values())) if rss else None,
    }


def model_sizes(registry: ModelRegistry) -> dict:
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

