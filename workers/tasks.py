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
from typing import Any

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded

from connectors.fhir import FhirAuth, FhirClient, FhirTransientError
from models.registry import ModelRegistry
from models.runtime import TextClassifier
from schemas.events import OrderItem
from workers.app import app
from workers.pipeline import ModelSet, suggest_for_order
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)


def build_fhir_client(settings: Settings) -> FhirClient:
    secret = lambda s: s.get_secret_value() if s is not None else None
    auth = FhirAuth(
        kind=settings.fhir_auth,
        username=settings.fhir_username,
        password=secret(settings.fhir_password),
        token=secret(settings.fhir_token),
        token_url=settings.fhir_token_url,
        client_id=settings.fhir_client_id,
        client_secret=secret(settings.fhir_client_secret),
        scope=settings.fhir_scope,
    )
    return FhirClient(
        settings.fhir_base_url, auth=auth, timeout=settings.fhir_timeout_s, max_retries=settings.fhir_max_retries
    )


def load_models(settings: Settings) -> ModelSet:
    registry = ModelRegistry(settings.model_registry)
    return ModelSet(
        protocol=TextClassifier.load(registry.current_dir("protocol"), threads=settings.model_threads),
        diagnosis=TextClassifier.load(registry.current_dir("diagnosis"), threads=settings.model_threads),
    )


@lru_cache(maxsize=1)
def process_models() -> ModelSet:
    return load_models(get_settings())


@lru_cache(maxsize=1)
def process_fhir_client() -> FhirClient:
    return build_fhir_client(get_settings())


@signals.worker_process_init.connect
def _load_per_process(**_: Any) -> None:
    process_models()


# Task results that are not final: the consumer decides when (and whether) the order runs again.
STATUS_UNAVAILABLE = "unavailable"  # a dependency is down: wait, do not spend the event's budget
STATUS_DEPLOYMENT = "deployment_error"  # credentials/base URL wrong: pause consumption, never dead-letter
STATUS_FAILED = "failed"  # this order failed (a bug, a timeout): spends the event's budget

# A task started this many times without finishing (its worker child killed each time, e.g. by
# the OOM killer on one order) reports failure instead of running again.
MAX_RUNS_PER_TASK = 3
_RUNS_TTL_S = 24 * 3600

# FhirPermanentError statuses that say the deployment is wrong, not the event (issue 8, defect 5).
# 404 is only the deployment's when the server's own /metadata is missing too (wrong base URL).
_DEPLOYMENT_STATUSES = frozenset({401, 403, 407, 408, 412})


class FhirDeploymentProblem(Exception):
    """The FHIR server refuses the worker itself (credentials, scopes, base URL): no order can succeed.

    TODO(rel-b): connectors.fhir will raise its own type for this; until then it is recognised
    here by status code from FhirPermanentError (see :func:`deployment_problem`).
    """

    def __init__(self, status: int | None, operation: str) -> None:
        super().__init__(f"{operation}: HTTP {status}")
        self.status = status


def deployment_problem(exc: BaseException, fhir: FhirClient | None = None) -> FhirDeploymentProblem | None:
    """The deployment problem ``exc`` reveals, or None when it is the order's own problem."""
    from connectors.fhir import FhirError, FhirPermanentError

    if isinstance(exc, FhirDeploymentProblem):
        return exc
    if isinstance(exc, FhirPermanentError):
        operation = getattr(exc, "operation", "") or ""
        if "token" in operation.lower() or exc.status in _DEPLOYMENT_STATUSES:
            return FhirDeploymentProblem(exc.status, operation)
        if exc.status == 404 and fhir is not None and not _server_answers(fhir):
            return FhirDeploymentProblem(404, "GET metadata (wrong EHRW_FHIR_BASE_URL?)")
        return None
    if isinstance(exc, FhirError) and not isinstance(exc, FhirTransientError):
        # A FhirError that is neither transient nor permanent: connectors.fhir's deployment type.
        return FhirDeploymentProblem(getattr(exc, "status", None), type(exc).__name__)
    return None


def _server_answers(fhir: FhirClient) -> bool:
    try:
        return fhir.ping()
    except Exception:  # noqa: BLE001 - no answer at all is the same verdict
        return False


class _GuardedFhir:
    """The FHIR client as the pipeline sees it, except that deployment problems are raised as
    :class:`FhirDeploymentProblem` (not a FhirPermanentError, so the pipeline cannot turn them into
    a per-order rejection that would dead-letter every event while a token is expired)."""

    def __init__(self, client: FhirClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        if not callable(target) or name.startswith("_"):
            return target

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return target(*args, **kwargs)
            except Exception as exc:
                problem = deployment_problem(exc, self._client)
                if problem is not None:
                    raise problem from None
                raise

        return guarded


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


def _not_final(order: str | None, status: str, reason_code: str, **extra: Any) -> dict[str, Any]:
    return {"order": order, "status": status, "reason_code": reason_code, **extra}


@app.task(name="ehr_worker.suggest_for_order", bind=True, max_retries=0)
def suggest(self, item: dict[str, Any]) -> dict[str, Any]:
    """Suggest protocol and diagnoses for one order. ``item``: ``{"service_request": {...}}`` or
    ``{"reference": "ServiceRequest/1"}``. Returns the outcome (the result event), always: a
    transient failure, a deployment problem or a bug is reported as a non-final status (see the
    ``STATUS_*`` constants) and the consumer decides about retrying. The task never retries itself:
    one owner of retries, one clock, one budget (issue 8)."""
    sr = item.get("service_request")
    order = f"ServiceRequest/{sr.get('id')}" if isinstance(sr, dict) else item.get("reference")
    runs = _count_run(self.request.id)
    if runs > MAX_RUNS_PER_TASK:
        log.error("order %s: task started %d times without finishing; giving up on it", order, runs - 1)
        return _not_final(order, STATUS_FAILED, "worker_lost", error_type="WorkerLostError")
    settings = get_settings()
    try:
        order_item = OrderItem(service_request=sr, reference=item.get("reference"))
        return suggest_for_order(
            order_item,
            _GuardedFhir(process_fhir_client()),  # type: ignore[arg-type]
            process_models(),
            enrich_context=settings.fhir_enrich_context,
            top_k=settings.top_k,
        )
    except FhirTransientError as exc:
        # The client already retried quickly; the consumer waits (Retry-After included) and re-sends.
        log.warning("order %s: FHIR unavailable (%s)", order, exc.status)
        return _not_final(
            order, STATUS_UNAVAILABLE, "fhir_unavailable", http_status=exc.status, retry_after=exc.retry_after
        )
    except FhirDeploymentProblem as exc:
        log.error("order %s: FHIR deployment problem (HTTP %s)", order, exc.status)
        return _not_final(order, STATUS_DEPLOYMENT, "fhir_deployment", http_status=exc.status)
    except SoftTimeLimitExceeded:
        log.error("order %s: soft time limit exceeded", order)
        return _not_final(order, STATUS_FAILED, "task_timeout", error_type="SoftTimeLimitExceeded")
    except Exception as exc:  # noqa: BLE001 - a bug on one order must reach the consumer as a code
        # The type only: exception text may quote the order.
        log.error("order %s: %s in the pipeline", order, type(exc).__name__)
        return _not_final(order, STATUS_FAILED, "task_error", error_type=type(exc).__name__)
