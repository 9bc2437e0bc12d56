"""A fault-injecting HTTP proxy in front of the FHIR server, for ``ehr-worker chaos`` and the fault suite.

It forwards every request to the real server unless told to misbehave:

- ``fail(status, fraction, retry_after)``: answer ``status`` (500, 429, 401...) to that fraction of
  requests, with a ``Retry-After`` header when given;
- ``drop(True)``: close connections without answering (a server that is gone);
- ``poison(ids)``: a read of ``ServiceRequest/{id}`` returns a valid-looking order with an
  ``extension`` nested 150 deep (about 5 kB), as a server that stores whatever it is sent would:
  the "fetched order that breaks validation" of issue 8, defect 1;
- ``refuse_transactions(status, diagnostics)``: answer ``status`` (400, 422) with an
  OperationOutcome (code ``business-rule``, the given ``diagnostics`` text) to every transaction
  Bundle posted to the base: a server refusing the write-back for the event's sake.

Counts of what it answered are kept per status. Only for tests and chaos runs; never in production.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


def poisoned_order(order_id: str, depth: int = 150) -> dict[str, Any]:
    extension: dict[str, Any] = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(depth):
        extension = {"url": "http://example.org/x", "extension": [extension]}
    return {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "meta": {"versionId": "1"},
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "code": {"text": "CT head"},
        "extension": [extension],
    }


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up (a killed worker child) is part of the experiment, not news


class FaultProxy:
    """``http://127.0.0.1:{port}/fhir`` forwarding to ``upstream`` (a FHIR base URL)."""

    def __init__(self, upstream: str, port: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/fhir"
        self.counts: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._status: int | None = None
        self._fraction = 0.0
        self._retry_after: float | None = None
        self._drop = False
        self._poisoned: set[str] = set()
        self._refusal: tuple[int, str] | None = None
        self._poison_bodies: dict[str, dict[str, Any]] = {}  # poisoned ids answered with a given order
        self._rng = random.Random(0)
        self._http = httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=64))
        self._server = _QuietServer(("127.0.0.1", port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def fail(self, status: int | None, fraction: float = 1.0, retry_after: float | None = None) -> None:
        with self._lock:
            self._status, self._fraction, self._retry_after = status, fraction, retry_after

    def heal(self) -> None:
        with self._lock:
            self._status, self._drop = None, False

    def drop(self, on: bool = True) -> None:
        with self._lock:
            self._drop = on

    def refuse_transactions(self, status: int | None, diagnostics: str = "") -> None:
        """Refuse (``status``) or, with ``None``, forward again every transaction Bundle."""
        with self._lock:
            self._refusal = None if status is None else (status, diagnostics)

    def poison(self, ids: Iterable[str] | Mapping[str, dict[str, Any]]) -> None:
        """Answer reads of these ServiceRequest ids with :func:`poisoned_order`, or, given a mapping,
        each with its own resource (any order a lenient server might hand back)."""
        with self._lock:
            self._poisoned |= set(ids)
            if isinstance(ids, Mapping):
                self._poison_bodies.update(ids)

    # -- serving ---------------------------------------------------------------------------------

    def _decide(self, method: str, path: str) -> tuple[str, Any]:
        with self._lock:
            if self._drop:
                return "drop", None
            if path.startswith("/fhir/metadata"):
                return "forward", None  # health probes see the server as it is
            if self._status is not None and self._rng.random() < self._fraction:
                return "status", (self._status, self._retry_after)
            parts = path.split("?")[0].strip("/").split("/")
            if method == "POST" and parts == ["fhir"] and self._refusal is not None:
                return "refuse", self._refusal
            if method == "GET" and len(parts) >= 3 and parts[1] == "ServiceRequest" and parts[2] in self._poisoned:
                return "poison", parts[2]
        return "forward", None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet: request lines may name patients
                pass

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                with proxy._lock:
                    proxy.counts[status] += 1
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action, arg = proxy._decide(self.command, self.path)
                if action == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if action == "status":
                    status, retry_after = arg
                    outcome = {"resourceType": "OperationOutcome",
                               "issue": [{"severity": "error", "code": "transient"}]}  # fmt: skip
                    headers = {"Content-Type": "application/fhir+json"}
                    if retry_after is not None:
                        headers["Retry-After"] = str(int(retry_after))
                    self._answer(status, json.dumps(outcome).encode(), headers)
                    return
                if action == "refuse":
                    status, diagnostics = arg
                    outcome = {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "business-rule", "diagnostics": diagnostics}]}  # fmt: skip
                    self._answer(status, json.dumps(outcome).encode(), {"Content-Type": "application/fhir+json"})
                    return
                if action == "poison":
                    order = proxy._poison_bodies.get(arg) or poisoned_order(arg)
                    self._answer(200, json.dumps(order).encode(), {"Content-Type": "application/fhir+json"})
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                url = proxy.upstream + self.path.removeprefix("/fhir")
                try:
                    resp = proxy._http.request(self.command, url, content=body, headers=headers)
                except httpx.HTTPError:
                    self.close_connection = True  # the server is down: so are we
                    self.connection.close()
                    return
                out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
                self._answer(resp.status_code, resp.content, out)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler
