"""Celery tasks: plain functions around :mod:`workers.pipeline`.

Models and the FHIR client are created once per worker process (after the prefork), never per
task. The registry is verified before any child starts (``workers.app``), so a corrupt or missing
model stops the worker at start-up with a message saying what to do, instead of failing every
order later.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import signals

from connectors.fhir import FhirAuth, FhirClient, FhirTransientError
from models.diagnosis import load_diagnosis_model
from models.registry import ModelRegistry
from models.runtime import TextClassifier
from schemas.events import OrderItem
from workers.app import app
from workers.pipeline import ModelSet, suggest_for_order
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)

MAX_RETRIES = 6
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0


def build_fhir_client(settings: Settings) -> FhirClient:
    secret = lambda s: s.get_secret_value() if s is not None else None  # noqa: E731
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
        diagnosis=load_diagnosis_model(registry.current_dir("diagnosis"), threads=settings.model_threads),
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


@app.task(name="ehr_worker.suggest_for_order", bind=True, max_retries=MAX_RETRIES)
def suggest(self, item: dict[str, Any]) -> dict[str, Any]:
    """Suggest protocol and diagnoses for one order. ``item``: ``{"service_request": {...}}`` or
    ``{"reference": "ServiceRequest/1"}``. Returns the outcome (the result event)."""
    order_item = OrderItem(service_request=item.get("service_request"), reference=item.get("reference"))
    settings = get_settings()
    try:
        return suggest_for_order(
            order_item,
            process_fhir_client(),
            process_models(),
            enrich_context=settings.fhir_enrich_context,
            top_k=settings.top_k,
        )
    except FhirTransientError as exc:
        # The client already retried quickly; this is the slow, bounded outer retry.
        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**self.request.retries)
        if exc.retry_after is not None:
            delay = max(delay, float(exc.retry_after))
        log.warning("transient FHIR error (%s); retry %d in %.1fs", exc.status, self.request.retries + 1, delay)
        # Past MAX_RETRIES, retry() re-raises exc: the consumer then leaves the offset uncommitted.
        raise self.retry(exc=exc, countdown=delay)
