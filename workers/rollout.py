"""Model roll-out without restarts: a worker process serves the registry's CURRENT versions.

Between tasks (:meth:`ModelHolder.models`, called at the start of each), at most every
``EHRW_MODEL_CHECK_INTERVAL_S`` seconds, the holder reads the ``{task}/CURRENT`` files (two small
reads). When one names another version, that version is loaded with its checksums verified first;
only then does the next task use it. A version that fails verification is refused (logged, counted
in ``ehrw_model_switches{result="refused"}``) and the process keeps serving what it had, until
CURRENT changes again. ``ehr-worker models promote``/``rollback`` change CURRENT.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from models.diagnosis import load_diagnosis_model
from models.registry import ModelIntegrityError, ModelNotFoundError, ModelRegistry
from models.runtime import TextClassifier
from schemas.tasks import TASKS
from workers import logs, metrics, tracing
from workers.pipeline import ModelSet
from workers.settings import get_settings

log = logging.getLogger(__name__)

Loader = Callable[[Path], Any]


class TimedClassifier:
    """A classifier whose ``predict`` is timed into ``ehrw_inference_seconds{model=...}``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._name = str(getattr(inner, "name", "model"))
        self._histogram = metrics.inference_seconds.labels(self._name)

    def predict(self, texts: Sequence[str], top_k: int = 5, **options: Any) -> list:
        # options: e.g. the protocol model's per-order label ``weights`` (the ordered exam)
        # Issue 13: a micro-batch is one call; each order counts once, with its share of the time.
        started = time.perf_counter()
        with tracing.span("ehrw.inference", model=self._name):
            out = self.inner.predict(texts, top_k=top_k, **options)
        share = (time.perf_counter() - started) / max(1, len(texts))
        for _ in texts:
            self._histogram.observe(share)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ModelHolder:
    """The models one worker process serves, switched to a new CURRENT version between tasks."""

    def __init__(self, registry: Path, *, loader: Loader, check_interval_s: float = 5.0) -> None:
        self.registry = ModelRegistry(registry)
        self.loader = loader
        self.check_interval_s = check_interval_s
        self._loaded: dict[str, Any] = {}
        self._versions: dict[str, str] = {}
        self._refused: dict[str, str] = {}
        self._checked = 0.0
        self._lock = threading.Lock()

    @property
    def versions(self) -> dict[str, str]:
        return dict(self._versions)

    def models(self) -> ModelSet:
        with self._lock:
            now = time.monotonic()
            if not self._loaded or now - self._checked >= self.check_interval_s:
                self._refresh()
                self._checked = now
            return ModelSet(protocol=self._loaded["protocol"], diagnosis=self._loaded["diagnosis"])

    def _refresh(self) -> None:
        for task in TASKS:
            try:
                version = self.registry.current_version(task)
            except (ModelNotFoundError, ModelIntegrityError):
                if task not in self._loaded:
                    raise  # nothing to serve: the task fails and the worker log says what to do
                log.exception("%s/CURRENT is unreadable; still serving %s", task, self._versions[task])
                continue
            if version == self._versions.get(task) or version == self._refused.get(task):
                continue
            self._switch(task, version)

    def _switch(self, task: str, version: str) -> None:
        previous = self._versions.get(task)
        try:
            classifier = TimedClassifier(self.loader(self.registry.version_dir(task, version)))
        except (ModelNotFoundError, ModelIntegrityError) as exc:
            if previous is None:
                raise
            self._refused[task] = version
            metrics.model_switches.labels(task, "refused").inc()
            log.error("refusing %s model %s, still serving %s: %s", task, version, previous, exc)
            return
        self._loaded[task] = classifier
        self._versions[task] = version
        self._refused.pop(task, None)
        logs.model_versions[task] = version
        if previous is not None:
            metrics.model_loaded.labels(task, previous).set(0)
            metrics.model_switches.labels(task, "switched").inc()
            log.info("switched %s model %s -> %s", task, previous, version)
        metrics.model_loaded.labels(task, version).set(1)


def load_model_folder(path: Path, *, threads: int = 1) -> Any:
    """The model a registry version folder (``{task}/{version}``) serves: the diagnosis folder may
    hold the phenotype ranker (models.diagnosis), every other one a text classifier."""
    if path.parent.name == "diagnosis":
        return load_diagnosis_model(path, threads=threads)
    return TextClassifier.load(path, threads=threads)


@lru_cache(maxsize=1)
def process_holder() -> ModelHolder:
    """This worker process's holder, from the settings (created after the prefork)."""
    settings = get_settings()
    return ModelHolder(
        settings.model_registry,
        loader=lambda path: load_model_folder(path, threads=settings.model_threads),
        check_interval_s=settings.model_check_interval_s,
    )
