"""connectors.embedded: services start, answer, fail clearly and stop (only what was started)."""

from __future__ import annotations

import socket

import pytest

from connectors.embedded import (
    EmbeddedServices,
    ServiceStartError,
    _spawn,
    _wait_ready,
    ensure_redis,
    free_port,
    redis_answers,
    start_sekmet,
    start_tansu,
)

pytestmark = pytest.mark.services


def test_redis_started_on_a_free_port_and_stopped(tmp_path):
    port = free_port()
    proc = ensure_redis(port, tmp_path)
    assert proc is not None and redis_answers(port)
    assert ensure_redis(port) is None  # one answers now: reused, not started twice
    proc.stop()
    proc.stop()  # idempotent
    assert not proc.alive() and not redis_answers(port)


def test_a_taken_port_fails_clearly(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(ServiceStartError) as err:
            ensure_redis(port, tmp_path)
        assert "does not answer Redis PING" in str(err.value)
        with pytest.raises(ServiceStartError, match=f"port {port} .*in use"):
            start_tansu(port, tmp_path / "tansu")
        with pytest.raises(ServiceStartError, match=f"port {port} .*in use"):
            start_sekmet(port, tmp_path / "sekmet")


def test_a_service_that_dies_at_start_names_its_log(tmp_path):
    (tmp_path / "redis").mkdir()
    proc = _spawn("redis", ["redis-server", "--port", "not-a-port"], tmp_path / "redis")
    with pytest.raises(ServiceStartError) as err:
        _wait_ready(proc, lambda: False, 10, "PING")
    assert "exited with code" in str(err.value) and str(tmp_path / "redis" / "redis.log") in str(err.value)


def test_embedded_services_stop_what_they_started():
    with EmbeddedServices(fhir=False, redis=False) as services:
        workdir = services.workdir
        kafka = services.processes["kafka"]
        assert services.kafka_bootstrap.endswith(str(services.kafka_port)) and kafka.alive()
    assert not kafka.alive() and not workdir.exists()


def test_the_fhir_server_restarts_empty_on_the_same_address():
    # the bench starts every run on an empty server (its cost per order grows with its database)
    import httpx

    with EmbeddedServices(kafka=False, redis=False, fhir_settings={"log_inbound": False}) as services:
        url = services.fhir_base_url
        patient = {"resourceType": "Patient", "id": "bench-empty-check", "gender": "unknown"}
        assert httpx.put(f"{url}/Patient/bench-empty-check", json=patient, timeout=10).status_code in (200, 201)
        assert httpx.get(f"{url}/Patient/bench-empty-check", timeout=10).status_code == 200
        first = services.processes["fhir"]
        services.restart_fhir_empty()
        assert not first.alive() and services.processes["fhir"].alive() and services.fhir_base_url == url
        assert httpx.get(f"{url}/Patient/bench-empty-check", timeout=10).status_code in (404, 410)
    with EmbeddedServices(fhir=False, redis=False) as services, pytest.raises(ServiceStartError, match="without FHIR"):
        services.restart_fhir_empty()
