"""Build the registry's models: one ``training.pipeline.run_pipeline`` per task.

``build_models(registry, tasks=TASKS, profile="default")`` is what ``python -m training build``
and ``ehr-worker models build`` call. Profiles are in ``training.profiles``: ``default`` builds
the shipped models (about a quarter of an hour on two CPU cores), ``tiny`` builds real but small
models in well under a minute for tests and CI.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from schemas.tasks import TASKS
from training.evaluate import summary_table
from training.pipeline import run_pipeline
from training.profiles import Profile
from training.stages import setup_logging

log = logging.getLogger("training")


def build_models(
    registry: str | Path,
    tasks: Iterable[str] = TASKS,
    profile: str | Profile | Mapping[str, Any] = "default",
    seed: int = 0,
    progress: bool = True,
    *,
    base_model: str | Path | None = None,
    model_card_base_url: str | None = None,
) -> dict[str, Path]:
    """Build, evaluate and publish (as CURRENT) one model per task; returns ``{task: version folder}``
    and prints a summary table (fp32 vs int8 test accuracy/macro-F1, size, latency)."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if "all" in tasks:
        tasks = list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)} (choose from {', '.join(TASKS)}, all)")
    setup_logging(progress)
    t0 = time.perf_counter()
    out: dict[str, Path] = {}
    rows = []
    for task in tasks:
        dest, row = run_pipeline(task, registry, profile=profile, seed=seed, progress=progress, base_model=base_model,
                               model_card_base_url=model_card_base_url)
        out[task] = dest
        rows.append(row)
    if progress:
        print("\n" + summary_table(rows), file=sys.stderr)
        print(f"built {', '.join(tasks)} in {time.perf_counter() - t0:.0f} s into {Path(registry)}", file=sys.stderr)
    return out


__all__ = ["build_models"]
