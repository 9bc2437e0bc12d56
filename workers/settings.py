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
    # 128 (was 32, issue 13): a round of the consumer is a few micro-batches per worker process, so
    # the pause between rounds (publish, commit, poll) costs less of the FHIR server's time.
    max_in_flight: int = Field(default=128, ge=1, le=10_000)
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
    fhir_auth: Literal["none", "basic", "bearer", "client_credentials", "smart_backend"] = "none"
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

    # Security: transport, SMART Backend Services, task payloads (issue 8; workers/clients.py, docs/security.md)

    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description="Kafka security protocol of every client: consumer, producer, admin (clients.kafka_client_config)",
    )
    # Kafka SASL mechanism (with SASL_PLAINTEXT or SASL_SSL).
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    # Kafka SASL user name.
    kafka_sasl_username: str | None = None
    # Kafka SASL password (secret).
    kafka_sasl_password: SecretStr | None = None
    # CA bundle that signed the Kafka brokers' certificates (SSL, SASL_SSL).
    kafka_ssl_cafile: Path | None = None
    # Kafka client certificate (mutual TLS).
    kafka_ssl_certfile: Path | None = None
    # Key of the Kafka client certificate.
    kafka_ssl_keyfile: Path | None = None
    # Password of that key file (secret).
    kafka_ssl_password: SecretStr | None = None
    # Check that the broker's certificate names its host.
    kafka_ssl_check_hostname: bool = True
    # Redis password (secret); kept out of the URL so it never reaches a log line.
    redis_password: SecretStr | None = None
    # Certificate check for rediss:// URLs (TLS).
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    # CA bundle that signed the Redis server's certificate.
    redis_ssl_ca_certs: Path | None = None
    # Redis client certificate (mutual TLS).
    redis_ssl_certfile: Path | None = None
    # Key of the Redis client certificate.
    redis_ssl_keyfile: Path | None = None
    # Seconds a Redis call may block: a blackholed Redis fails apply_async quickly instead of for ever.
    redis_socket_timeout_s: float = Field(default=10.0, gt=0)
    # Seconds to establish a Redis connection.
    redis_socket_connect_timeout_s: float = Field(default=5.0, gt=0)
    # SMART Backend Services (fhir_auth=smart_backend): PEM private key, RSA (RS384) or P-384 EC (ES384).
    fhir_private_key_path: Path | None = None
    # The JWT "kid" of the registered public key.
    fhir_key_id: str | None = None
    # URL of the JWKS holding that key, when the server fetches keys (the JWT "jku").
    fhir_jku: str | None = None
    # Signing algorithm of the client assertion (default: from the key).
    fhir_algorithm: Literal["RS384", "ES384"] | None = None
    # CA bundle for a FHIR server behind a hospital's private PKI.
    fhir_ca_file: Path | None = None
    # Credentials over http:// are refused except to this machine (127.0.0.1/localhost, the demo).
    fhir_allow_insecure_http: bool = False
    # Fernet key encrypting orders carried inline in events while they sit in Redis (workers/payload.py).
    payload_key: SecretStr | None = None

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
    write_batch_orders: int = Field(
        default=16,
        ge=1,
        le=500,
        description="Orders per Celery task and per FHIR transaction (micro-batch); a refused transaction "
        "is retried order by order, so one bad order never blocks the others (1: one order per task).",
    )
    # First wait before an event is tried again; it doubles with each failure.
    retry_backoff_s: float = Field(default=2.0, gt=0)
    # The longest wait between two attempts of an event.
    retry_backoff_max_s: float = Field(default=60.0, gt=0)
    # Retry-After is honoured up to this long (the partition is paused meanwhile, not re-sent).
    retry_after_max_s: float = Field(default=300.0, gt=0)
    # Celery limits per order: the soft one reports a timeout (spends the budget), the hard one
    # kills the child. The broker re-delivers an unacknowledged order after the visibility timeout.
    task_soft_time_limit_s: float = Field(default=60.0, gt=0)
    # Seconds after which Celery kills the child running an order (and replaces it).
    task_hard_time_limit_s: float = Field(default=90.0, gt=0)
    # Seconds before Redis hands an unacknowledged order to another worker (at least the hard limit + 30).
    broker_visibility_timeout_s: int = Field(default=300, ge=10)

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
