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
    # A batch slower than this gets the consumer evicted from its group, so the dispatcher stops
    # waiting at 80 % of it and retries the batch. Tansu makes the first group join wait this long,
    # hence the modest default; on Apache Kafka raise it above the task timeout (e.g. 300000).
    kafka_max_poll_interval_ms: int = Field(default=10_000, ge=1_000)
    kafka_session_timeout_ms: int = Field(default=6_000, ge=1_000)

    # Celery broker and result backend
    redis_url: str = "redis://127.0.0.1:6379/0"
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

    # Models
    model_registry: Path = Path("registry")
    model_threads: int = Field(default=1, ge=1)
    top_k: int = Field(default=5, ge=1, le=50)

    # Operations (issue 9): metrics/health ports, logs, traces, model roll-out
    consumer_http_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="`/metrics`, `/healthz`, `/readyz` of `ehr-worker consume` (0: off)",
    )
    worker_http_port: int = Field(
        default=9465,
        ge=0,
        le=65535,
        description="the same endpoints of each `celery worker`, for all its pool processes (0: off)",
    )
    http_host: str = Field(default="0.0.0.0", description="address those endpoints listen on")
    celery_queue: str = Field(
        default="ehr-worker",
        description="Celery queue the consumer sends orders to and workers take them from",
    )
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="`json`: one object per line for log shippers; `text`: for people at a terminal",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="log level")
    model_check_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="a worker looks for a new `{task}/CURRENT` at most this often, between tasks",
    )
    otel_enabled: bool = Field(
        default=False, description="OpenTelemetry traces (consumer -> task -> model -> FHIR)"
    )
    otel_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces endpoint, e.g. `http://otel-collector:4318/v1/traces` (default: `OTEL_EXPORTER_OTLP_*`)",
    )
    otel_service_name: str = Field(default="ehr-worker", description="`service.name` of the traces")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
