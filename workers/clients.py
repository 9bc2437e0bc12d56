"""Settings -> client configuration, in one place, so every client gets the same security.

- :func:`kafka_client_config`: kafka-python keyword arguments (TLS, SASL) for *every* Kafka client:
  ``EventConsumer(client_config=...)`` (its consumer and producer), ``make_producer(**...)``,
  ``ensure_topics(**...)``.
- :func:`celery_connection_conf`: the Celery settings for the Redis broker and result backend
  (password, ``rediss://`` TLS, socket timeouts); :func:`configure_celery_connection` applies them
  to an app, keeping its own transport options.
- :func:`build_fhir_client`: the FHIR client with its auth (including SMART Backend Services),
  TLS trust and the http:// refusal.

Nothing here logs a secret; URLs carrying a password are built here and only handed to clients.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from connectors.fhir import FhirAuth, FhirClient
from workers.settings import Settings


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def kafka_client_config(settings: Settings) -> dict[str, Any]:
    """kafka-python arguments for TLS and SASL; ``{}`` for the default PLAINTEXT."""
    s = settings
    protocol = s.kafka_security_protocol
    config: dict[str, Any] = {}
    if protocol == "PLAINTEXT":
        if s.kafka_sasl_mechanism or s.kafka_ssl_cafile:
            raise ValueError(
                "EHRW_KAFKA_SASL_MECHANISM / EHRW_KAFKA_SSL_CAFILE are set but EHRW_KAFKA_SECURITY_PROTOCOL "
                "is PLAINTEXT: set it to SSL, SASL_SSL or SASL_PLAINTEXT"
            )
        return config
    config["security_protocol"] = protocol
    if protocol.startswith("SASL"):
        if not (s.kafka_sasl_mechanism and s.kafka_sasl_username and s.kafka_sasl_password):
            raise ValueError(
                f"EHRW_KAFKA_SECURITY_PROTOCOL={protocol} needs EHRW_KAFKA_SASL_MECHANISM, "
                "EHRW_KAFKA_SASL_USERNAME and EHRW_KAFKA_SASL_PASSWORD"
            )
        config.update(
            sasl_mechanism=s.kafka_sasl_mechanism,
            sasl_plain_username=s.kafka_sasl_username,
            sasl_plain_password=_secret(s.kafka_sasl_password),
        )
    if protocol.endswith("SSL"):
        config["ssl_check_hostname"] = s.kafka_ssl_check_hostname
        for key, path in (
            ("ssl_cafile", s.kafka_ssl_cafile),
            ("ssl_certfile", s.kafka_ssl_certfile),
            ("ssl_keyfile", s.kafka_ssl_keyfile),
        ):
            if path is not None:
                config[key] = str(_readable(path, f"EHRW_KAFKA_{key.upper()}"))
        if s.kafka_ssl_password is not None:
            config["ssl_password"] = _secret(s.kafka_ssl_password)
    return config


_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def redis_url(settings: Settings) -> str:
    """``EHRW_REDIS_URL`` with ``EHRW_REDIS_PASSWORD`` put in (unless the URL has one)."""
    url = settings.redis_url
    password = _secret(settings.redis_password)
    parts = urlsplit(url)
    if not password or parts.password:
        return url
    user = quote(parts.username or "", safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def celery_connection_conf(settings: Settings) -> dict[str, Any]:
    """Celery settings for the Redis broker and result backend: URL with password, TLS for
    ``rediss://``, and socket timeouts (kombu waits forever on a blackholed Redis without them)."""
    s = settings
    url = redis_url(s)
    timeouts = {
        "socket_timeout": s.redis_socket_timeout_s,
        "socket_connect_timeout": s.redis_socket_connect_timeout_s,
    }
    conf: dict[str, Any] = {
        "broker_url": url,
        "result_backend": url,
        # Merge into (do not replace) the app's own transport options such as visibility_timeout.
        "broker_transport_options": {**timeouts, "retry_on_timeout": True},
        "result_backend_transport_options": {**timeouts, "retry_on_timeout": True},
        "redis_socket_timeout": s.redis_socket_timeout_s,
        "redis_socket_connect_timeout": s.redis_socket_connect_timeout_s,
        "broker_connection_timeout": s.redis_socket_connect_timeout_s,
    }
    if urlsplit(url).scheme == "rediss":
        tls: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[s.redis_ssl_cert_reqs]}
        for key, path in (
            ("ssl_ca_certs", s.redis_ssl_ca_certs),
            ("ssl_certfile", s.redis_ssl_certfile),
            ("ssl_keyfile", s.redis_ssl_keyfile),
        ):
            if path is not None:
                tls[key] = str(_readable(path, f"EHRW_REDIS_{key.upper()}"))
        conf["broker_use_ssl"] = tls
        conf["redis_backend_use_ssl"] = dict(tls)
    elif s.redis_ssl_ca_certs is not None:
        raise ValueError("EHRW_REDIS_SSL_CA_CERTS is set but EHRW_REDIS_URL is not rediss://")
    return conf


def configure_celery_connection(app: Any, settings: Settings) -> None:
    """Apply :func:`celery_connection_conf` to ``app``, merging its transport options into the
    app's own (``visibility_timeout`` stays). Call right after creating the app, before it connects."""
    conf = celery_connection_conf(settings)
    for key in ("broker_transport_options", "result_backend_transport_options"):
        conf[key] = {**(app.conf.get(key) or {}), **conf[key]}
    app.conf.update(conf)


def fhir_auth(settings: Settings) -> FhirAuth:
    s = settings
    return FhirAuth(
        kind=s.fhir_auth,
        username=s.fhir_username,
        password=_secret(s.fhir_password),
        token=_secret(s.fhir_token),
        token_url=s.fhir_token_url,
        client_id=s.fhir_client_id,
        client_secret=_secret(s.fhir_client_secret),
        scope=s.fhir_scope,
        private_key_path=str(s.fhir_private_key_path) if s.fhir_private_key_path else None,
        key_id=s.fhir_key_id,
        jku=s.fhir_jku,
        algorithm=s.fhir_algorithm,
    )


def build_fhir_client(settings: Settings) -> FhirClient:
    s = settings
    verify: ssl.SSLContext | bool = True
    if s.fhir_ca_file is not None:
        verify = ssl.create_default_context(cafile=str(_readable(s.fhir_ca_file, "EHRW_FHIR_CA_FILE")))
    return FhirClient(
        s.fhir_base_url,
        auth=fhir_auth(s),
        timeout=s.fhir_timeout_s,
        max_retries=s.fhir_max_retries,
        allow_insecure_http=s.fhir_allow_insecure_http,
        verify=verify,
    )


def _readable(path: Any, variable: str) -> Any:
    if not path.is_file():
        raise ValueError(f"{variable}={path} is not a readable file")
    return path
