"""All runtime configuration, from environment variables prefixed ``EHRW_``.

Defaults point at the embedded local services that ``ehr-worker demo`` starts, so a fresh
checkout works without configuration. Secrets (FHIR passwords, tokens, client secrets) are only
ever read from the environment; nothing in the repository holds one.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EHRW_", extra="ignore")

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_topic: str = "fhir.servicerequest"
    kafka_group: str = "ehr-worker"
    kafka_dlq_topic: str = "fhir.servicerequest.dlq"
    kafka_result_topic: str = "ehr-worker.suggestions"
    # Events in flight at once: the consumer fetches nothing more until these are durable.
    max_in_flight: int = Field(default=32, ge=1, le=10_000)
    # The consumer keeps polling (paused) while a batch runs, so this no longer bounds a batch;
    # Tansu makes the first group join wait this long, hence the modest default.
    kafka_max_poll_interval_ms: int = Field(default=10_000, ge=1_000)
    kafka_session_timeout_ms: int = Field(default=6_000, ge=1_000)

    # Celery broker and result backend
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The longest one dispatch round waits for its orders; unfinished ones are collected next round.
    task_timeout_s: float = Field(default=120.0, gt=0)

    # FHIR server
    fhir_base_url: str = "http://127.0.0.1:8090/fhir"
    fhir_auth: Literal["none", "basic", "bearer", "client_credentials"] = "none"
    fhir_username: str | None = None
    fhir_password: SecretStr | None = None
    fhir_token: SecretStr | None = None
    fhir_token_url: str | None = None
    fhir_client_id: str | None = None
    fhir_client_secret: SecretStr | None = None
    fhir_scope: str | None = None
    fhir_timeout_s: float = Field(default=15.0, gt=0)
    fhir_max_retries: int = Field(default=4, ge=0)
    # Fetch reasonReference/supportingInfo resources to enrich the model input.
    fhir_enrich_context: bool = True

    # Reliability (issue 8, consumer side: connectors.kafka, connectors.retry, workers.dispatch)
    # Failed attempts of one event (bugs, timeouts, killed workers) before it is dead-lettered with
    # reason attempts_exhausted. Outages and deployment problems never spend it.
    event_max_attempts: int = Field(default=5, ge=1, le=100)
    # Events above this size are dead-lettered (event_too_large) before parsing.
    max_event_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Dead letters above this size are sent as a truncated copy with the original's sha256 and size.
    dlq_max_record_bytes: int = Field(default=1_000_000, ge=64 * 1024)
    # Orders (not events) queued or running at once per consumer: bounds the Redis queue.
    max_in_flight_orders: int = Field(default=64, ge=1, le=10_000)
    retry_backoff_s: float = Field(default=2.0, gt=0)
    retry_backoff_max_s: float = Field(default=60.0, gt=0)
    # Retry-After is honoured up to this long (the partition is paused meanwhile, not re-sent).
    retry_after_max_s: float = Field(default=300.0, gt=0)
    # Celery limits per order: the soft one reports a timeout (spends the budget), the hard one
    # kills the child. The broker re-delivers an unacknowledged order after the visibility timeout.
    task_soft_time_limit_s: float = Field(default=60.0, gt=0)
    task_hard_time_limit_s: float = Field(default=90.0, gt=0)
    broker_visibility_timeout_s: int = Field(default=300, ge=10)
    # The Celery queue orders are sent to and workers read (one per deployment sharing a Redis).
    celery_queue: str = "ehr-worker"

    # Models
    model_registry: Path = Path("registry")
    model_threads: int = Field(default=1, ge=1)
    top_k: int = Field(default=5, ge=1, le=50)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
