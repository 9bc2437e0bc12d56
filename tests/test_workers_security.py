"""Security plumbing of issue 8: encrypted task payloads (defect 9) and transport settings (defect 10).

Real Redis: a task is sent through the Celery app to a throw-away queue and every Redis key is
searched for the order's text.
"""

from __future__ import annotations

import json
import logging
import ssl
import uuid

import pytest
from cryptography.fernet import Fernet
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from schemas.events import OrderItem
from workers.clients import celery_connection_conf, kafka_client_config, redis_url
from workers.payload import (
    PayloadError,
    apply_async_options,
    open_task_payload,
    payload_cipher,
    task_argsrepr,
    task_payload,
)
from workers.settings import Settings

NOTE = "Xylophone Quagmire, 47, suspected Fabry disease"


def _order(**extra) -> dict:
    return {
        "resourceType": "ServiceRequest",
        "id": "o1",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "note": [{"text": NOTE}],
        **extra,
    }


@pytest.fixture
def cipher():
    return payload_cipher(Fernet.generate_key().decode())


# -- task payloads ---------------------------------------------------------------------------------


def test_inline_versioned_order_travels_as_reference_plus_sealed_copy(cipher):
    sr = _order(meta={"versionId": "3"})
    payload = task_payload(OrderItem(service_request=sr), cipher)
    assert payload["reference"] == "ServiceRequest/o1/_history/3" and len(payload["idempotency_key"]) == 32
    assert NOTE not in str(payload) and NOTE not in task_argsrepr(payload)
    item, fallback = open_task_payload(payload, cipher)
    assert item.reference == "ServiceRequest/o1/_history/3" and fallback == sr  # server first, then the copy


def test_unversioned_inline_order_is_worked_on_from_its_sealed_copy(cipher):
    sr = _order()
    item, fallback = open_task_payload(task_payload(OrderItem(service_request=sr), cipher), cipher)
    assert item.service_request == sr and fallback is None


def test_reference_items_carry_only_the_reference(cipher):
    payload = task_payload(OrderItem(reference="ServiceRequest/9/_history/2"), None)
    assert payload == {"reference": "ServiceRequest/9/_history/2"}
    assert open_task_payload(payload, None) == (OrderItem(reference="ServiceRequest/9/_history/2"), None)


def test_missing_wrong_or_tampered_keys_fail_clearly(cipher):
    with pytest.raises(PayloadError, match="EHRW_PAYLOAD_KEY is not set.*Fernet.generate_key"):
        task_payload(OrderItem(service_request=_order()), None)
    with pytest.raises(PayloadError, match="not a Fernet key"):
        payload_cipher("too-short")
    assert payload_cipher(Settings(payload_key=Fernet.generate_key().decode()).payload_key) is not None
    with pytest.raises(PayloadError, match="EHRW_PAYLOAD_KEY is not set"):
        payload_cipher(Settings(payload_key=None).payload_key)
    payload = task_payload(OrderItem(service_request=_order()), cipher)
    with pytest.raises(PayloadError, match="cannot be decrypted"):
        open_task_payload(payload, payload_cipher(Fernet.generate_key().decode()))
    tampered = {**payload, "sealed": payload["sealed"][:-4] + "AAAA"}
    with pytest.raises(PayloadError, match="cannot be decrypted"):
        open_task_payload(tampered, cipher)


def test_redis_holds_no_order_text_for_a_queued_task(cipher, services):
    import redis

    from workers.app import app
    from workers.tasks import suggest

    options = apply_async_options(OrderItem(service_request=_order(meta={"versionId": "1"})), cipher)
    queue = f"payload-test-{uuid.uuid4().hex[:8]}"
    suggest.apply_async(**options, queue=queue)
    client = redis.Redis.from_url(services.redis_url)
    try:
        keys = list(client.scan_iter(count=1000))
        assert queue.encode() in keys
        searched = 0
        for key in keys:
            kind = client.type(key)
            values = {
                b"string": lambda k: [client.get(k)],
                b"list": lambda k: client.lrange(k, 0, -1),
                b"hash": lambda k: list(client.hgetall(k).values()),
                b"set": lambda k: list(client.smembers(k)),
                b"zset": lambda k: client.zrange(k, 0, -1),
            }.get(kind, lambda k: [])(key)
            for value in values:
                searched += 1
                assert b"Xylophone" not in (value or b""), key
        assert searched >= 1
    finally:
        client.delete(queue)
        app.control.purge()  # nothing else in this test database may pick it up


# -- transport settings ----------------------------------------------------------------------------


def test_kafka_client_config_reaches_every_kafka_client_type(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="ehrw",
        kafka_sasl_password="pw",
        kafka_ssl_cafile=ca,
    )
    config = kafka_client_config(settings)
    assert config == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "ehrw",
        "sasl_plain_password": "pw",
        "ssl_check_hostname": True,
        "ssl_cafile": str(ca),
    }
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):  # kafka-python's own option names
        assert set(config) <= set(client.DEFAULT_CONFIG), client
    assert kafka_client_config(Settings()) == {}
    with pytest.raises(ValueError, match="EHRW_KAFKA_SASL_USERNAME"):
        kafka_client_config(Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN"))
    with pytest.raises(ValueError, match="EHRW_KAFKA_SECURITY_PROTOCOL"):
        kafka_client_config(Settings(kafka_ssl_cafile=ca))


def test_celery_connection_conf_sets_tls_password_and_timeouts(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    settings = Settings(
        redis_url="rediss://redis.hospital.example:6380/2",
        redis_password="p@ss/word",
        redis_ssl_ca_certs=ca,
        redis_socket_timeout_s=3,
    )
    conf = celery_connection_conf(settings)
    assert conf["broker_url"] == "rediss://:p%40ss%2Fword@redis.hospital.example:6380/2" == conf["result_backend"]
    assert conf["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    assert conf["redis_backend_use_ssl"] == conf["broker_use_ssl"]
    assert conf["broker_transport_options"]["socket_timeout"] == 3 and conf["redis_socket_timeout"] == 3
    assert redis_url(Settings(redis_url="redis://:inurl@h:1/0", redis_password="other")) == "redis://:inurl@h:1/0"
    with pytest.raises(ValueError, match="rediss://"):
        celery_connection_conf(Settings(redis_ssl_ca_certs=ca))


def test_a_celery_app_with_the_conf_talks_to_the_real_redis(services):
    from celery import Celery

    from workers.clients import configure_celery_connection

    app = Celery("conf-test")
    app.conf.update(broker_transport_options={"visibility_timeout": 3600})
    configure_celery_connection(app, Settings(redis_url=services.redis_url, redis_socket_timeout_s=2))
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        assert conn.transport_options["socket_timeout"] == 2
        assert conn.transport_options["visibility_timeout"] == 3600  # the app's own option kept
    assert app.backend.client.ping() and app.backend.connparams["socket_timeout"] == 2


def test_the_worker_app_lets_a_stale_redelivery_lock_lapse_in_seconds(services):
    """kombu's channel, as the worker builds it, holds its re-delivery lock 30 s, not kombu's 300 s: a
    lock request that timed out while Redis was frozen and ran on waking no longer stops the
    re-delivery of dead workers' tasks for 5 minutes."""
    from workers.app import make_app

    app = make_app(Settings(redis_url=services.redis_url))
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        channel = conn.default_channel
        assert channel.unacked_mutex_expire == 30
        assert channel.visibility_timeout >= 120  # the hard time limit + 30 s, at least


# -- FHIR over TLS with a private CA ---------------------------------------------------------------


def _self_signed_ca_and_server_cert(tmp_path):
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test hospital CA")).issuer_name(name("test hospital CA"))
        .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(2).not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    paths["key"].write_bytes(key_pem)
    return paths


def test_fhir_over_tls_trusts_the_configured_ca_only(tmp_path):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from connectors.fhir import FhirConfigurationError
    from workers.clients import build_fhir_client

    paths = _self_signed_ca_and_server_cert(tmp_path)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"resourceType": "Patient", "id": "p1"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths["cert"], paths["key"])
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"https://127.0.0.1:{httpd.server_address[1]}/fhir"
    try:
        common = {"fhir_base_url": base, "fhir_auth": "bearer", "fhir_token": "t", "fhir_max_retries": 2}
        with build_fhir_client(Settings(**common, fhir_ca_file=paths["ca"])) as fhir:
            assert fhir.read("Patient/p1")["id"] == "p1"
        with build_fhir_client(Settings(**common)) as fhir, pytest.raises(FhirConfigurationError) as err:
            fhir.read("Patient/p1")  # the system trust store does not know the hospital's CA
        assert "EHRW_FHIR_CA_FILE" in str(err.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- end to end: consumer, Redis, Celery worker, FHIR, result and dead-letter topics ----------------


def _redis_values(client) -> list[tuple[bytes, bytes]]:
    """(key, value) for every value of every key in the test database."""
    readers = {
        b"string": lambda k: [client.get(k)],
        b"list": lambda k: client.lrange(k, 0, -1),
        b"hash": lambda k: [f + b"=" + v for f, v in client.hgetall(k).items()],
        b"set": lambda k: list(client.smembers(k)),
        b"zset": lambda k: client.zrange(k, 0, -1),
    }
    out = []
    for key in client.scan_iter(count=1000):
        out += [(key, v or b"") for v in readers.get(client.type(key), lambda k: [])(key)]
    return out


class _EveryRecord(logging.Handler):
    """Keeps every log record of this process, with all its attributes (``extra`` included)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = {k: v for k, v in vars(record).items() if k not in ("msg", "args")}
        self.texts.append(record.getMessage() + " " + json.dumps(fields, default=repr))


def test_note_text_reaches_no_log_record_redis_key_dead_letter_header_or_result_event(
    services, celery_worker, capsys
):
    """Defects 9 and 10 end to end, the issue's privacy test. Orders with a distinctive note go
    through every path: success (versioned and unversioned inline orders), a retry (tasks waiting in
    Redis), the dead-letter topic, and a crash (a consumer SIGKILLed after publishing an event's
    outcome and before committing it, then a new consumer), on the real consumer, Redis and a Celery
    worker. Searched: every log record of this process at INFO (consumers, dispatcher, Celery, Kafka
    clients), every line the Celery worker and the crashed consumer logged, every Redis value, every
    dead-letter header, every result event. The note is nowhere; the count searched is printed."""
    import copy
    import os
    import subprocess
    import sys

    import redis

    from connectors.fhir import FhirClient
    from connectors.kafka import Incoming, ensure_topics
    from schemas.events import parse_event
    from schemas.text import is_imaging_order
    from tests.support import Topics, consume, publish, read_topic, settings_for
    from workers.chaos_lab import settings_env
    from workers.demo import actionable_orders, fixture_events, seed_fhir, suggestions_by_order
    from workers.dispatch import CeleryDispatcher

    records = _EveryRecord()
    root = logging.getLogger()
    # The deployed level, INFO, for every logger of this process: earlier tests quieten some (kafka).
    levels = {logger: logger.level for logger in [root, *logging.root.manager.loggerDict.values()]
              if isinstance(logger, logging.Logger)}  # fmt: skip
    for logger in levels:
        logger.setLevel(logging.NOTSET)
    root.addHandler(records)
    root.setLevel(logging.INFO)
    worker_log_start = celery_worker.log_path.stat().st_size
    try:
        fhir = FhirClient(services.fhir_base_url)
        patients, events = fixture_events()
        template = next(o for o in actionable_orders(seed_fhir(fhir, patients, events)) if is_imaging_order(o))
        marker = f"Zanzibar{uuid.uuid4().hex[:10]}"
        orders = []
        for n in range(3):
            sr = copy.deepcopy(template)
            sr.update(id=f"priv-{n}-{uuid.uuid4().hex[:8]}", note=[{"text": f"{marker} Quagmire, 47, Fabry?"}])
            sr.pop("meta", None)
            stored = fhir.put(sr)
            orders.append(stored if n == 0 else {k: v for k, v in stored.items() if k != "meta"})
        crash_order = orders.pop()
        bad = {**orders[0], "id": f"priv-bad-{uuid.uuid4().hex[:6]}"}
        bad.pop("subject")  # the parser rejects it: a dead letter holding the note in its body only
        topics = Topics.fresh("privacy")
        raws = [json.dumps(o).encode() for o in [*orders, bad]]
        publish(services.kafka_bootstrap, topics.events, [(None, raw) for raw in raws])

        # A retry: a round whose tasks sit in a queue no worker reads (what Redis holds while waiting).
        client = redis.Redis.from_url(services.redis_url)
        idle_queue = f"privacy-idle-{uuid.uuid4().hex[:8]}"
        dispatcher = CeleryDispatcher(group=topics.group, queue=idle_queue, no_keepalive_timeout_s=1.0)
        batch = [Incoming(topics.events, 0, 1000 + i, None, raw, parse_event(raw)) for i, raw in enumerate(raws[:2])]
        try:
            outcomes = dispatcher(batch)
            assert [o.status for o in outcomes] == ["retry", "retry"]
            assert client.llen(idle_queue) == 1  # both orders in one micro-batch task (issue 13)
            leaked = [k for k, v in _redis_values(client) if marker.encode() in v]
            assert leaked == [], leaked
        finally:
            client.delete(idle_queue)
            dispatcher.finished(batch)

        stats = consume(services, topics, max_events=3)
        assert (stats.committed, stats.dead_lettered) == (3, 1), stats.as_dict()

        # A crash: the consumer dies after publishing the outcome, before committing; a new one takes over.
        crashed = Topics.fresh("privacy-crash")
        ensure_topics(services.kafka_bootstrap, [crashed.events, crashed.dlq, crashed.results])
        publish(services.kafka_bootstrap, crashed.events, [(None, json.dumps(crash_order).encode())])
        env = {**os.environ, **settings_env(settings_for(services, crashed))}
        crash = subprocess.run([sys.executable, "-m", "workers.chaos", "crash-consumer", "1"], env=env,
                               capture_output=True, timeout=240, check=False)  # fmt: skip
        assert crash.returncode == -9, crash.stderr[-2000:]
        stats = consume(services, crashed, max_events=1)
        assert stats.committed == 1, stats.as_dict()
    finally:
        root.removeHandler(records)
        for logger, level in levels.items():
            logger.setLevel(level)

    found = suggestions_by_order(fhir)
    assert all(len(found.get(o["id"], {}).get("Task", [])) == 1 for o in [*orders, crash_order])
    letters = read_topic(services.kafka_bootstrap, topics.dlq)
    assert len(letters) == 1 and marker.encode() in letters[0].value  # the original bytes, for replay
    headers = [v or b"" for r in letters for v in r.headers.values()]
    results = read_topic(services.kafka_bootstrap, topics.results) + read_topic(services.kafka_bootstrap, crashed.results)
    assert len(results) >= 4  # three events, the crashed one's outcome published twice (at least once)
    with celery_worker.log_path.open("rb") as f:
        f.seek(worker_log_start)
        worker_lines = f.read().splitlines()
    crash_lines = crash.stderr.splitlines()
    redis_values = _redis_values(client)
    assert records.texts and worker_lines and crash_lines
    assert any(b"received" in line for line in worker_lines)  # Celery's own records are there
    searched = {
        "log records (this process)": [t.encode() for t in records.texts],
        "worker log lines": worker_lines,
        "crashed consumer log lines": crash_lines,
        "Redis values": [v for _, v in redis_values],
        "dead-letter headers": headers,
        "result events": [r.value for r in results] + [r.key or b"" for r in results],
    }
    for where, items in searched.items():
        leaked = [item[:200] for item in items if marker.encode() in item]
        assert leaked == [], f"the note reached {where}: {leaked}"
    with capsys.disabled():
        print(f"\nprivacy: {sum(len(v) for v in searched.values())} records searched, note found in none ("
              + ", ".join(f"{len(v)} {k}" for k, v in searched.items()) + ")")


def test_dead_letter_headers_and_result_events_keep_outcome_codes_only():
    """Whoever built a result (an older worker, a bug), the consumer reduces its OperationOutcome
    to codes again before it becomes a result event or a dead-letter header."""
    from connectors.dlq import reason_headers
    from workers.dispatch import outcome_for_event

    raw = {"resourceType": "OperationOutcome",
           "issue": [{"severity": "error", "code": "invariant", "diagnostics": NOTE, "details": {"text": NOTE}}]}  # fmt: skip
    outcome = outcome_for_event([{"order": "ServiceRequest/o1", "status": "rejected", "operation_outcome": raw}])
    assert outcome.status == "dead_letter" and NOTE not in json.dumps(outcome.results)
    headers = reason_headers(topic="t", partition=0, offset=1, reason_code="fhir_rejected_writeback",
                             reason="refused", details={"operation_outcome": raw})  # fmt: skip
    assert all(NOTE.encode() not in value for _, value in headers)
    assert b'"code":"invariant"' in dict(headers)["ehrw-details"]
