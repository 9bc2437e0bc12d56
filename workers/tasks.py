"""Celery tasks: plain functions around :mod:`workers.pipeline`.

Models and the FHIR client are created once per worker process (after the prefork), never per
task. The registry is verified before any child starts (``workers.app``), so a corrupt or missing
model stops the worker at start-up with a message saying what to do, instead of failing every
order later.

A task always returns an outcome and never retries itself: the consumer owns retrying (one clock,
one budget, see :mod:`connectors.retry`). Its id is derived from the event's coordinates by the
dispatcher, so a re-dispatched order finds the running or finished task instead of a second copy.
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
from workers.app import app
from workers.clients import build_fhir_client  # rel-b: one builder (SMART, TLS trust, http:// refusal)
from workers.payload import PayloadError, open_task_payload, payload_cipher
from workers.pipeline import ModelSet, suggest_for_order
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


# Task results that are not final: the consumer decides when (and whether) the order runs again.
# (schemas.outcomes.NotFinalStatus).
STATUS_UNAVAILABLE: Final = "unavailable"  # a dependency is down: wait, do not spend the event's budget
STATUS_DEPLOYMENT: Final = "deployment_error"  # credentials/base URL wrong: pause consumption, never dead-letter
STATUS_FAILED: Final = "failed"  # this order failed (a bug, a timeout): spends the event's budget

# A task started this many times without finishing (its worker child killed each time, e.g. by
# the OOM killer on one order) reports failure instead of running again.
MAX_RUNS_PER_TASK = 3
_RUNS_TTL_S = 24 * 3600

def _count_run(task_id: str | None) -> int:
    """How many times this task id has started (Redis, shared by all workers); 1 when unknown."""
    if not task_id or not task_id.startswith("ehrw-"):  # only the dispatcher's ids are ever re-sent
        return 1
    try:
        client = app.backend.client
        key = f"ehrw:runs:{task_id}"
        pipe = client.pipeline()
        pipe.incr(key)
        pipe.expire(key, _RUNS_TTL_S)
        return int(pipe.execute()[0])
    except Exception:  # noqa: BLE001 - counting is a safety net, never a reason to fail the order
        return 1


def _not_final(order: str | None, status: NotFinalStatus, reason_code: str, **extra: Unpack[RetryDetails]) -> NotFinalOutcome:
    return {"order": order, "status": status, "reason_code": reason_code, **extra}


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
    except FhirTransientError as exc:
        # The client already retried quickly; the consumer waits (Retry-After included) and re-sends.
        log.warning("order %s: FHIR unavailable (%s)", order, exc.status)
        return _not_final(
            order, STATUS_UNAVAILABLE, "fhir_unavailable", http_status=exc.status, retry_after=exc.retry_after
        )
    except (FhirConfigurationError, PayloadError) as exc:
        # The deployment's problem (credentials, base URL, 408/412, a wrong payload key): every
        # order would fail alike, so the consumer pauses and retries; never a dead letter.
        log.error("order %s: deployment problem (%s, HTTP %s)", order, type(exc).__name__, getattr(exc, "status", None))
        return _not_final(order, STATUS_DEPLOYMENT, "fhir_deployment" if isinstance(exc, FhirConfigurationError)
                          else "payload_key", http_status=getattr(exc, "status", None),
                          retry_after=getattr(exc, "retry_after", None))  # fmt: skip
    except SoftTimeLimitExceeded:
        log.error("order %s: soft time limit exceeded", order)
        return _not_final(order, STATUS_FAILED, "task_timeout", error_type="SoftTimeLimitExceeded")
    except Exception as exc:  # noqa: BLE001 - a bug on one order must reach the consumer as a code
        # The type only: exception text may quote the order.
        log.error("order %s: %s in the pipeline", order, type(exc).__name__)
        return _not_final(order, STATUS_FAILED, "task_error", error_type=type(exc).__name__)
