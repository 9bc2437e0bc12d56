"""``python -m training.phenotype.measure --registry R``: per-order cost of the diagnosis model (concept
recognition + ranking + top-10, one thread) and the resident memory of a process holding both of the
registry's models, as a worker does. Figures as JSON on stdout."""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np


def vm_rss_mb() -> float:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.phenotype.measure")
    parser.add_argument("--registry", required=True)
    parser.add_argument("--n", type=int, default=300, help="orders timed one by one")
    args = parser.parse_args(argv)
    os.environ.setdefault("EHRW_MODEL_REGISTRY", args.registry)
    rss_start = vm_rss_mb()
    from models.diagnosis import load_diagnosis_model
    from models.registry import ModelRegistry
    from models.runtime import TextClassifier

    reg = ModelRegistry(args.registry)
    diagnosis = load_diagnosis_model(reg.current_dir("diagnosis"), threads=1)
    protocol = TextClassifier.load(reg.current_dir("protocol"), threads=1) if "protocol" in reg.tasks() else None
    warm = "We report a 4-year-old boy with global developmental delay, hypotonia, seizures and microcephaly."
    diagnosis.predict([warm], top_k=10)
    if protocol is not None:
        protocol.predict([warm])
    rss_models = vm_rss_mb()  # before the generators below are imported: what a worker holds
    examples = json.loads((reg.current_dir("diagnosis") / "report" / "metrics.json").read_text())["examples"]
    from training.phenotype.cases import ordinary_texts

    texts = [e["text"] for e in examples] + ordinary_texts(max(10, args.n), seed=11, split="test")
    random.Random(0).shuffle(texts)
    texts = (texts * (args.n // max(1, len(texts)) + 1))[: args.n]
    if protocol is not None:
        protocol.predict(texts[:5])
    for t in texts[:10]:
        diagnosis.predict([t], top_k=10)
    times = []
    for t in texts:
        t0 = time.perf_counter()
        diagnosis.predict([t], top_k=10)
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"diagnosis_ms_p50": round(float(np.median(times)), 3),
           "diagnosis_ms_p95": round(float(np.quantile(times, 0.95)), 3), "n": len(times),
           "mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
           "rss_mb_both_models" if protocol is not None else "rss_mb_diagnosis_only": round(rss_models, 1),
           "rss_mb_before_loading": round(rss_start, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
