"""The bench's measurements, each a function that returns its figures.

1. ehr-worker model inference in this process (ONNX Runtime int8, ``TextClassifier`` with
   ``threads=1``): per-order latency of protocol + diagnosis on the same order text, one order at
   a time, and batched throughput.
2. The naive baseline (``training.naive_baseline``) in a process of its own, so that torch never
   enters this one and its memory can be read on its own.
3. Size (the manifests' ``metrics.size``).

The FHIR server's own throughput is :mod:`workers.bench.fhir_server`, the pipeline end to end
:mod:`workers.bench.e2e`, processes (memory, CPU) :mod:`workers.bench.procs`, the per-stage
profile :mod:`workers.bench.profile` and the cold start :mod:`workers.bench.coldstart`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from models.measure import latency_summary, percentile
from models.registry import ModelRegistry
from models.runtime import TextClassifier
from schemas.tasks import TASKS
from schemas.text import build_model_input
from schemas.writeback import build_writeback_bundle
from workers.bench.progress import progress_bar
from workers.pipeline import ModelSet, applicable_models, worth_writing


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


def machine_reference(repeats: int = 5) -> dict:
    """What this machine is and how fast it ran two fixed workloads just now, so that figures from
    different machines can be compared: the same code measured 1.94, 3.0 and 5.9 ms per order on
    three of this project's "2-core" machines. ``python_ms``: a pure-Python loop like the
    recogniser's; ``numpy_ms``: a float32 matrix product like an encoder layer's. Best of ``repeats``."""
    import numpy as np

    def best_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return round(min(times), 2)

    a = np.random.default_rng(0).random((256, 384), dtype=np.float32)
    b = np.random.default_rng(1).random((384, 1152), dtype=np.float32)
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "python_ms": best_ms(lambda: sum(i % 7 for i in range(1_000_000))),
        "numpy_ms": best_ms(lambda: [a @ b for _ in range(20)]),
    }


def measure_inference(models: TextClassifiers, texts: list[str], *, batch_size: int = 32, progress: bool = True) -> dict:
    """Per-order latency (both models, one order at a time) and batched throughput, one thread."""
    warm = texts[: min(10, len(texts))]
    for t in warm:
        models.protocol.predict([t])
        models.diagnosis.predict([t])
    both, prot, diag = [], [], []
    clock = time.perf_counter
    for t in progress_bar(texts, enabled=progress, desc="ehr-worker inference, one order at a time"):
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
    for _ in progress_bar(range(2), enabled=progress, desc=f"ehr-worker inference, batches of {batch_size}"):
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

