"""``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, for the consumer and for each Celery worker.

- ``/healthz``: 200 while the process can answer at all (a liveness probe: restart me if not).
- ``/readyz``: 200 when every dependency check passes, else 503; the JSON body names each check
  and, for a failing one, the error type (never a payload). A readiness probe: stop sending work.
- ``/metrics``: the Prometheus text exposition of every process of this service
  (:func:`workers.metrics.exposition`).

The server runs on a daemon thread of the process it reports on and answers requests one thread
each (``ThreadingHTTPServer``), so a slow dependency check never blocks a scrape.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from schemas.tasks import TASKS
from workers import metrics

log = logging.getLogger(__name__)

Check = Callable[[], None]  # raises when the dependency is not usable
CHECK_TIMEOUT_S = 3.0


# -- dependency checks ---------------------------------------------------------------------------
def kafka_check(bootstrap: str, client_config: Mapping[str, Any] | None = None) -> Check:
    def check() -> None:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=2000,
            bootstrap_timeout_ms=2000,
            **dict(client_config or {}),
        )
        try:
            admin.list_topics()
        finally:
            admin.close()

    return check


def redis_check(url: str) -> Check:
    def check() -> None:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            client.ping()
        finally:
            client.close()

    return check


def fhir_check(base_url: str) -> Check:
    """The server answers its CapabilityStatement (``/metadata``); 401/403 still mean reachable."""

    def check() -> None:
        import httpx

        resp = httpx.get(
            f"{base_url.rstrip('/')}/metadata", timeout=2.0, headers={"Accept": "application/fhir+json"}
        )
        if resp.status_code >= 500 or resp.status_code == 404:
            raise RuntimeError(f"GET /metadata answered {resp.status_code}")

    return check


def models_check(
    registry: Path, tasks: Iterable[str] = TASKS, *, loaded: bool = True
) -> Check:
    """Every task has a CURRENT version whose manifest parses, and (``loaded``) a live process of
    this worker has a model of the task loaded (checksums are verified when loading)."""

    def check() -> None:
        from models.registry import ModelRegistry

        reg = ModelRegistry(registry)
        serving = metrics.loaded_versions() if loaded else {}
        for task in tasks:
            reg.load_manifest(task)
            if loaded and not serving.get(task):
                raise RuntimeError(f"no worker process has a {task} model loaded yet")

    return check


def run_checks(
    checks: Mapping[str, Check], timeout_s: float = CHECK_TIMEOUT_S
) -> tuple[bool, dict[str, str]]:
    """Run the checks in parallel; ``(all passed, {name: "ok" | "ErrorType: short message"})``."""
    results: dict[str, str] = {}
    if not checks:
        return True, results
    pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="readyz")
    try:
        futures = {name: pool.submit(fn) for name, fn in checks.items()}
        for name, future in futures.items():
            try:
                future.result(timeout=timeout_s)
                results[name] = "ok"
            except FutureTimeout:
                results[name] = f"timeout after {timeout_s:g}s"
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                results[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return all(v == "ok" for v in results.values()), results


# -- the server ----------------------------------------------------------------------------------
class HealthServer:
    """Serves the three endpoints on ``host:port`` from a daemon thread; ``stop()`` closes it."""

    def __init__(
        self,
        host: str,
        port: int,
        checks: Mapping[str, Check],
        *,
        collectors: Iterable[metrics.Collector] = (),
        service: str = "ehr-worker",
    ) -> None:
        self.checks = dict(checks)
        self.collectors = list(collectors)
        self.service = service
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"{service}-http", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("%s serving /metrics, /healthz and /readyz on port %d", self.service, self.port)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype = metrics.exposition(server.collectors)
                    self._send(200, body, ctype)
                elif path == "/healthz":
                    self._send_json(200, {"status": "ok", "service": server.service})
                elif path == "/readyz":
                    ready, results = run_checks(server.checks)
                    self._send_json(
                        200 if ready else 503, {"ready": ready, "service": server.service, "checks": results}
                    )
                else:
                    self._send_json(
                        404, {"error": f"no such endpoint {path}; try /metrics, /healthz, /readyz"}
                    )

            def _send_json(self, status: int, doc: dict) -> None:
                self._send(status, json.dumps(doc).encode(), "application/json")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def start_server(
    host: str,
    port: int,
    checks: Mapping[str, Check],
    *,
    service: str,
    collectors: Iterable[metrics.Collector] = (),
) -> HealthServer | None:
    """Start a :class:`HealthServer`, or log why not and return None (port 0 = off, port taken).

    A worker that cannot bind its metrics port still processes orders: the warning says which
    setting to change.
    """
    if port == 0:
        return None
    try:
        return HealthServer(host, port, checks, collectors=collectors, service=service).start()
    except OSError as exc:
        log.warning(
            "%s: cannot serve /metrics on %s:%d (%s); set another port",
            service,
            host,
            port,
            exc.strerror or exc,
        )
        return None
