"""Celery tasks: plain functions around :mod:`workers.pipeline`.

Models and the FHIR client are created once per worker process (after the prefork), never per
task. The registry is verified before any child starts (``workers.app``), so a corrupt or missing
model stops the worker at start-up with a message saying what to do, instead of failing every
order later.

The dispatcher sends a micro-batch of orders per task (:func:`suggest_batch`, issue 13): their
suggestions are written in one FHIR transaction (:func:`workers.pipeline.suggest_for_orders`), and
each order's outcome is stored in the result backend under that order's own task id, derived from
the event's coordinates, so a re-dispatched order finds its result (or its batch still running)
instead of running twice. :func:`suggest` is the same for a single order.

A task always returns outcomes and never retries itself: the consumer owns retrying (one clock, one
budget, see :mod:`connectors.retry`). A batch re-delivered after its worker process died runs its
orders one at a time, each result stored at once and finished orders skipped, so an order that kills
its process is found out on its own (``MAX_RUNS_PER_TASK`` starts) and the others get through.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Final, Unpack

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded

from connectors.fhir import FhirClient, FhirConfigurationError, FhirTransientError
from models.diagnosis import load_diagnosis_model
from models.registry import ModelRegistry
from models.runtime import TextClassifier
from schemas.outcomes import NotFinalOutcome, NotFinalStatus, RetryDetails, TaskResult
from workers import logs, metrics
from workers.app import app
from workers.clients import build_fhir_client  # rel-b: one builder (SMART, TLS trust, http:// refusal)
from workers.lost_tasks import mark_received
from workers.payload import PayloadError, open_task_payload, payload_cipher
from workers.pipeline import ModelSet, suggest_for_order, suggest_for_orders
from workers.rollout import process_holder  # Operations (issue 9)
from workers.settings import Settings, get_settings
from workers.supersede import cancel_void_order

log = logging.getLogger(__name__)


def load_models(settings: Settings) -> ModelSet:
    registry = ModelRegistry(settings.model_registry)
    return ModelSet(
        protocol=TextClassifier.load(registry.current_dir("protocol"), threads=settings.model_threads),
        diagnosis=load_diagnosis_model(registry.current_dir("diagnosis"), threads=settings.model_threads),
    )


def process_models() -> ModelSet:
    # Operations (issue 9): the registry's CURRENT versions, switched between tasks without a restart.
    return process_holder().models()


@lru_cache(maxsize=1)
def process_fhir_client() -> FhirClient:
    return build_fhir_client(get_settings())


@lru_cache(maxsize=1)
def process_cipher() -> Any:
    """The cipher for orders carried inline (``EHRW_PAYLOAD_KEY``, shared with the consumer)."""
    return payload_cipher(get_settings().payload_key)


@signals.worker_process_init.connect
def _load_per_process(**_: Any) -> None:
    process_models()


# The dispatcher finds tasks lost between Redis and a worker by the marks these leave (issue 8).
signals.task_received.connect(mark_received)

# Task results that are not final: the consumer decides when (and whether) the order runs again.
# (schemas.outcomes.NotFinalStatus).
STATUS_UNAVAILABLE: Final = "unavailable"  # a dependency is down: wait, do not spend the event's budget
STATUS_DEPLOYMENT: Final = "deployment_error"  # credentials/base URL wrong: pause consumption, never dead-letter
STATUS_FAILED: Final = "failed"  # this order failed (a bug, a timeout): spends the event's budget

# A task started this many times without finishing (its worker child killed each time, e.g. by
# the OOM killer on one order) reports failure instead of running again.
MAX_RUNS_PER_TASK = 3
_RUNS_TTL_S = 24 * 3600

def _count_runs(task_ids: list[str]) -> list[int]:
    """How many times each task id has started (Redis, shared by all workers); 1 when unknown."""
    counted = [t for t in task_ids if t.startswith("ehrw-")]  # only the dispatcher's ids are ever re-sent
    if not counted:
        return [1] * len(task_ids)
    try:
        pipe = app.backend.client.pipeline()
        for tid in counted:
            pipe.incr(f"ehrw:runs:{tid}")
            pipe.expire(f"ehrw:runs:{tid}", _RUNS_TTL_S)
        runs = dict(zip(counted, (int(n) for n in pipe.execute()[::2])))
    except Exception:  # noqa: BLE001 - counting is a safety net, never a reason to fail the order
        return [1] * len(task_ids)
    return [runs.get(t, 1) for t in task_ids]


def _count_run(task_id: str | None) -> int:
    return _count_runs([task_id])[0] if task_id else 1


def _not_final(order: str | None, status: NotFinalStatus, reason_code: str, **extra: Unpack[RetryDetails]) -> NotFinalOutcome:
    return {"order": order, "status": status, "reason_code": reason_code, **extra}


def _failure(order: str | None, exc: BaseException) -> NotFinalOutcome | None:
    """The non-final result for an exception of the pipeline, or ``None`` for one it must not catch."""
    if isinstance(exc, FhirTransientError):
        # The client already retried quickly; the consumer waits (Retry-After included) and re-sends.
        log.warning("order %s: FHIR unavailable (%s)", order, exc.status)
        return _not_final(
            order, STATUS_UNAVAILABLE, "fhir_unavailable", http_status=exc.status, retry_after=exc.retry_after
        )
    if isinstance(exc, (FhirConfigurationError, PayloadError)):
        # The deployment's problem (credentials, base URL, 408/412, a wrong payload key): every
        # order would fail alike, so the consumer pauses and retries; never a dead letter.
        log.error("order %s: deployment problem (%s, HTTP %s)", order, type(exc).__name__, getattr(exc, "status", None))
        return _not_final(order, STATUS_DEPLOYMENT, "fhir_deployment" if isinstance(exc, FhirConfigurationError)
                          else "payload_key", http_status=getattr(exc, "status", None),
                          retry_after=getattr(exc, "retry_after", None))  # fmt: skip
    if isinstance(exc, SoftTimeLimitExceeded):
        log.error("order %s: soft time limit exceeded", order)
        return _not_final(order, STATUS_FAILED, "task_timeout", error_type="SoftTimeLimitExceeded")
    if isinstance(exc, Exception):  # a bug on one order must reach the consumer as a code
        # The type only: exception text may quote the order.
        log.error("order %s: %s in the pipeline", order, type(exc).__name__)
        return _not_final(order, STATUS_FAILED, "task_error", error_type=type(exc).__name__)
    return None


def _run_one(payload: dict[str, Any]) -> TaskResult:
    """One order's outcome, or the non-final result of what went wrong (its log lines carry its
    task id and event when it runs inside a batch)."""
    with logs.bind(task_id=payload.get("task_id"), order=payload.get("reference"), event=payload.get("event")):
        return _run_one_order(payload)


def _run_one_order(payload: dict[str, Any]) -> TaskResult:
    order = payload.get("reference") if isinstance(payload, dict) else None
    settings = get_settings()
    try:
        if payload.get("void"):  # an inline void order: withdraw its open suggestions (ids only)
            return cancel_void_order(process_fhir_client(), payload["reference"], payload["void"])
        item, fallback = open_task_payload(payload, process_cipher())
        return suggest_for_order(
            item,
            process_fhir_client(),
            process_models(),
            enrich_context=settings.fhir_enrich_context,
            top_k=settings.top_k,
            fallback=fallback,
        )
    except BaseException as exc:
        failure = _failure(order, exc)
        if failure is None:
            raise
        return failure


def _run_batch(payloads: list[dict[str, Any]]) -> list[TaskResult]:
    """The orders' outcomes, written in one transaction; void orders and unreadable payloads each
    on their own. A bug that is not an order's own FHIR or payload problem makes each order run
    alone, so it fails only the order it belongs to."""
    settings = get_settings()
    results: list[TaskResult | None] = [None] * len(payloads)
    batch: list[tuple[int, Any, dict[str, Any] | None]] = []
    for i, payload in enumerate(payloads):
        if payload.get("void"):
            results[i] = _run_one(payload)
            continue
        try:
            item, fallback = open_task_payload(payload, process_cipher())
        except PayloadError as exc:
            results[i] = _failure(payload.get("reference"), exc)
            continue
        batch.append((i, item, fallback))
    if batch:
        try:
            outcomes = suggest_for_orders(
                [(item, fallback) for _, item, fallback in batch],
                process_fhir_client(),
                process_models(),
                enrich_context=settings.fhir_enrich_context,
                top_k=settings.top_k,
                log_fields=[{"task_id": payloads[i].get("task_id"), "order": payloads[i].get("reference"),
                             "event": payloads[i].get("event")} for i, _, _ in batch],
            )
            for (i, _, _), outcome in zip(batch, outcomes):
                results[i] = outcome
        except (FhirTransientError, FhirConfigurationError, SoftTimeLimitExceeded) as exc:
            for i, _, _ in batch:  # the whole batch waits (the consumer halts the round anyway)
                results[i] = _failure(payloads[i].get("reference"), exc)
        except Exception as exc:  # noqa: BLE001 - find the order it belongs to
            log.warning("a batch of %d orders failed (%s); running each alone", len(batch), type(exc).__name__)
            for i, _, _ in batch:
                results[i] = _run_one(payloads[i])
    return [r if r is not None else _not_final(None, STATUS_FAILED, "task_error") for r in results]


@app.task(name="ehr_worker.suggest_for_order", bind=True, max_retries=0)
def suggest(self, payload: dict[str, Any]) -> TaskResult:
    """Suggest protocol and diagnoses for one order. ``payload``: see :mod:`workers.payload` (the
    order reference and idempotency key in clear, an inline order only encrypted). Returns the
    outcome (the result event), always: a transient failure, a deployment problem or a bug is
    reported as a non-final status (see the ``STATUS_*`` constants) and the consumer decides about
    retrying. The task never retries itself: one owner of retries, one clock, one budget (issue 8)."""
    order = payload.get("reference") if isinstance(payload, dict) else None
    runs = _count_run(self.request.id)
    if runs > MAX_RUNS_PER_TASK:
        log.error("order %s: task started %d times without finishing; giving up on it", order, runs - 1)
        return _not_final(order, STATUS_FAILED, "worker_lost", error_type="WorkerLostError")
    return _run_one(payload)


def _store(task_id: str, result: TaskResult) -> None:
    """One order's result where the dispatcher looks for it (the result of a task of that id)."""
    app.backend.store_result(task_id, result, "SUCCESS")
    metrics.record_order_outcome(result)


def _stored(task_ids: list[str]) -> set[str]:
    keys = [app.backend.get_key_for_task(t) for t in task_ids]
    return {t for t, raw in zip(task_ids, app.backend.client.mget(keys)) if raw is not None}


@app.task(name="ehr_worker.suggest_for_orders", bind=True, max_retries=0)
def suggest_batch(self, payloads: list[dict[str, Any]]) -> list[list[str]]:
    """A micro-batch of orders: each payload is a :func:`suggest` payload plus ``task_id``, the id
    its outcome is stored under. Returns ``[[task_id, status], ...]`` (ids and codes only)."""
    task_ids = [str(p.get("task_id")) for p in payloads]
    statuses: list[list[str]] = []
    if _count_run(self.request.id) <= 1:
        _count_runs(task_ids)
        for tid, result in zip(task_ids, _run_batch(payloads)):
            _store(tid, result)
            statuses.append([tid, str(result.get("status"))])
    else:
        # Re-delivered: a worker process died running this batch. One order at a time.
        done = _stored(task_ids)
        for tid, payload in zip(task_ids, payloads):
            if tid in done:
                continue
            runs = _count_run(tid)
            if runs > MAX_RUNS_PER_TASK:
                log.error("order %s: started %d times without finishing; giving up on it", payload.get("reference"), runs - 1)
                result = _not_final(payload.get("reference"), STATUS_FAILED, "worker_lost", error_type="WorkerLostError")
            else:
                result = _run_one(payload)
            _store(tid, result)
            statuses.append([tid, str(result.get("status"))])
    return statuses
