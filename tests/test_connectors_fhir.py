"""connectors.fhir against a real sekmet FHIR server, plus small real HTTP servers (in threads) for
the failure modes a healthy sekmet never shows: 503 with Retry-After, slow answers, OAuth2."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from connectors.fhir import (
    FhirAuth,
    FhirClient,
    FhirConfigurationError,
    FhirPermanentError,
    FhirTransientError,
    entry_status,
    parse_retry_after,
)

pytestmark = pytest.mark.services


@pytest.fixture
def client(fhir_base) -> Iterator[FhirClient]:
    with FhirClient(fhir_base, timeout=10, max_retries=1, backoff_base=0.05) as c:
        yield c


def _patient(**extra) -> dict:
    return {"resourceType": "Patient", "name": [{"family": "Testperson", "given": ["Ada"]}], **extra}


# -- against sekmet --------------------------------------------------------------------------------


def test_ping_and_capabilities(client):
    assert client.ping()
    assert client.capabilities()["resourceType"] == "CapabilityStatement"
    assert not FhirClient("http://127.0.0.1:9/fhir", timeout=0.5).ping()


def test_create_read_put_history(client, fhir_base):
    created = client.create(_patient())
    pid = created["id"]
    assert created["meta"]["versionId"] == "1"

    updated = client.put({**created, "active": True}, if_match="1")
    assert updated["meta"]["versionId"] == "2" and updated["active"] is True

    assert client.read(f"Patient/{pid}")["active"] is True
    assert "active" not in client.read(f"Patient/{pid}/_history/1")
    assert client.read(f"{fhir_base}/Patient/{pid}")["id"] == pid  # absolute URL on this server

    put_new = client.put(_patient(id=f"p-{uuid.uuid4().hex[:12]}"))
    assert put_new["meta"]["versionId"] == "1"


def test_read_errors(client):
    with pytest.raises(FhirPermanentError) as err:
        client.read("Patient/does-not-exist")
    assert err.value.status == 404
    assert err.value.operation_outcome["resourceType"] == "OperationOutcome"
    assert "404" in str(err.value) and "not-found" in str(err.value)

    for bad in ("Patient", "Patient/a b", "urn:uuid:1234", "http://elsewhere.example/fhir/Patient/1"):
        with pytest.raises(ValueError):
            client.read(bad)


def test_conditional_create_transaction_is_idempotent(client):
    ident = uuid.uuid4().hex
    if_none = f"identifier=urn:test|{ident}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:5c1b2c58-6b8e-4f59-9d0c-7d0a3f7f0a01",
                "resource": _patient(identifier=[{"system": "urn:test", "value": ident}]),
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": if_none},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "test"},
                    "subject": {"reference": "urn:uuid:5c1b2c58-6b8e-4f59-9d0c-7d0a3f7f0a01"},
                    "identifier": [{"system": "urn:test", "value": ident}],
                },
                "request": {"method": "POST", "url": "Observation", "ifNoneExist": if_none},
            },
        ],
    }
    first = client.transaction(bundle)
    assert first["type"] == "transaction-response"
    assert [entry_status(e) for e in first["entry"]] == [201, 201]
    second = client.transaction(bundle)
    assert [entry_status(e) for e in second["entry"]] == [200, 200]

    (obs,) = client.search("Observation", {"identifier": f"urn:test|{ident}"})
    (patient,) = client.search("Patient", {"identifier": f"urn:test|{ident}"})
    assert obs["subject"]["reference"] == f"Patient/{patient['id']}"  # urn:uuid resolved


def test_invalid_transaction_surfaces_operation_outcome(client):
    ident = uuid.uuid4().hex
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": _patient(identifier=[{"system": "urn:test", "value": ident}]),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {"resourceType": "Observation", "bogus": 1},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    with pytest.raises(FhirPermanentError) as err:
        client.transaction(bundle)
    exc = err.value
    assert exc.status == 400
    assert exc.operation_outcome and exc.operation_outcome["issue"]
    text = str(exc)
    assert "400" in text and "[structure]" in text and "Observation" in text
    assert "Testperson" not in text and ident not in text  # never the request body
    assert client.count("Patient", {"identifier": f"urn:test|{ident}"}) == 0  # rolled back


def test_search_follows_paging_and_count(client, caplog):
    tag = uuid.uuid4().hex
    for i in range(7):
        meta = {"tag": [{"system": "urn:test-tag", "code": tag}]}
        client.create(_patient(meta=meta, gender=["male", "female"][i % 2]))
    query = {"_tag": f"urn:test-tag|{tag}", "_count": 3}
    found = client.search("Patient", query)
    assert len(found) == 7 and len({p["id"] for p in found}) == 7
    assert client.count("Patient", {"_tag": f"urn:test-tag|{tag}"}) == 7
    # repeated parameters are ANDed
    assert client.count("Patient", [("_tag", f"urn:test-tag|{tag}"), ("gender", "female")]) == 3

    with caplog.at_level(logging.WARNING, logger="connectors.fhir"):
        assert len(client.search("Patient", query, max_pages=2)) == 6
    assert "stopped after 2 pages" in caplog.text


# -- helpers without a server ----------------------------------------------------------------------


def test_entry_status_and_retry_after_parsing():
    assert entry_status({"response": {"status": "201 Created"}}) == 201
    assert entry_status({"response": {"status": "200"}}) == 200
    with pytest.raises(ValueError):
        entry_status({"response": {}})
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=90), usegmt=True), now=now) == 0.0


def test_auth_settings_are_checked_and_secrets_hidden():
    with pytest.raises(ValueError, match="EHRW_FHIR_CLIENT_SECRET"):
        FhirAuth(kind="client_credentials", token_url="http://x/token", client_id="c")
    with pytest.raises(ValueError, match="unknown FHIR auth kind"):
        FhirAuth(kind="oauth")  # type: ignore[arg-type]
    auth = FhirAuth(kind="basic", username="u", password="hunter2")
    assert "hunter2" not in repr(auth) and "hunter2" not in repr(FhirClient("https://x/fhir", auth))


# -- scripted real HTTP servers --------------------------------------------------------------------

Handler = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, str], dict | None]]


class ScriptedServer:
    """A real HTTP server on a free port whose answers come from ``handle``; records requests."""

    def __init__(self, handle: Handler) -> None:
        self.handle = handle
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class _H(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, body = outer.handle(self)
                payload = json.dumps(body).encode() if body is not None else b""
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                    pass

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


PATIENT = {"resourceType": "Patient", "id": "p1"}
BUSY = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "transient", "diagnostics": "busy"}],
}
INVALID = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]}


def test_retries_503_honouring_retry_after():
    calls = {"n": 0}

    def handle(_req):
        calls["n"] += 1
        if calls["n"] <= 2:
            return 503, {"Retry-After": "1"}, BUSY
        return 200, {}, PATIENT

    with ScriptedServer(handle) as server, FhirClient(server.base, max_retries=4, backoff_base=0.01) as c:
        start = time.monotonic()
        assert c.read("Patient/p1") == PATIENT
        elapsed = time.monotonic() - start
    assert calls["n"] == 3
    assert 2.0 <= elapsed < 5.0  # slept the server's 1 s twice, not the 10 ms backoff


def test_transient_error_after_retries_and_no_retry_on_4xx():
    def handle(req):
        if req.path.endswith("/Patient/bad"):
            return 422, {}, INVALID
        return 503, {"Retry-After": "0"}, BUSY

    with ScriptedServer(handle) as server, FhirClient(server.base, max_retries=2, backoff_base=0.01) as c:
        with pytest.raises(FhirTransientError) as err:
            c.read("Patient/p1")
        assert err.value.status == 503 and err.value.retry_after == 0.0
        assert len(server.requests) == 3  # 1 + max_retries

        with pytest.raises(FhirPermanentError) as perm:
            c.read("Patient/bad")
        assert perm.value.status == 422 and "[invalid]" in str(perm.value)
        assert len(server.requests) == 4  # not retried


def test_long_retry_after_is_left_to_the_caller():
    with ScriptedServer(lambda _r: (429, {"Retry-After": "120"}, None)) as server:
        with FhirClient(server.base, max_retries=4) as c, pytest.raises(FhirTransientError) as err:
            c.read("Patient/p1")
    assert err.value.status == 429 and err.value.retry_after == 120.0
    assert len(server.requests) == 1  # no worker process sleeps two minutes inside a request


def test_timeout_is_transient():
    def handle(_req):
        time.sleep(1.5)
        return 200, {}, PATIENT

    with ScriptedServer(handle) as server:
        c = FhirClient(server.base, timeout=0.3, max_retries=1, backoff_base=0.01)
        with pytest.raises(FhirTransientError, match="Timeout"):
            c.read("Patient/p1")
        assert len(server.requests) == 2
        c.close()


def test_connection_refused_is_transient():
    with FhirClient("http://127.0.0.1:9/fhir", timeout=1, max_retries=1, backoff_base=0.01) as c:
        with pytest.raises(FhirTransientError, match="ConnectError"):
            c.read("Patient/p1")


def test_client_credentials_token_cached_and_refreshed_once_on_401():
    state = {"issued": 0, "valid": set()}

    def handle(req):
        if req.path == "/token":
            assert req.headers["Authorization"].startswith("Basic ")  # client_secret_basic
            assert b"grant_type=client_credentials" in req.body and b"scope=system" in req.body
            state["issued"] += 1
            token = f"tok-{state['issued']}"
            state["valid"].add(token)
            return 200, {}, {"access_token": token, "token_type": "bearer", "expires_in": 3600}
        token = (req.headers.get("Authorization") or "").removeprefix("Bearer ")
        return (200, {}, PATIENT) if token in state["valid"] else (401, {}, None)

    with ScriptedServer(handle) as server:
        auth = FhirAuth(
            kind="client_credentials",
            token_url=server.base.removesuffix("/fhir") + "/token",
            client_id="ehrw",
            client_secret="s3cret",
            scope="system/*.rs",
        )
        with FhirClient(server.base, auth, max_retries=0) as c:
            assert c.read("Patient/p1") == PATIENT
            assert c.read("Patient/p1") == PATIENT
            assert state["issued"] == 1  # cached
            state["valid"].clear()  # the server revokes it
            assert c.read("Patient/p1") == PATIENT
            assert state["issued"] == 2
            state["valid"].clear()
            state["issued"] = 100  # from now on the server never accepts what it issues
            server.handle = lambda req: (401, {}, None) if req.path != "/token" else handle(req)
            with pytest.raises(FhirConfigurationError) as err:
                c.read("Patient/p1")
            assert err.value.status == 401  # refreshed once, then gave up: the deployment's problem
            assert "EHRW_FHIR_AUTH" in str(err.value)


def test_basic_and_bearer_headers():
    with ScriptedServer(lambda _r: (200, {}, PATIENT)) as server:
        with FhirClient(server.base, FhirAuth(kind="bearer", token="abc")) as c:
            c.read("Patient/p1")
        with FhirClient(server.base, FhirAuth(kind="basic", username="u", password="p")) as c:
            c.read("Patient/p1")
    assert server.requests[0][2]["Authorization"] == "Bearer abc"
    assert server.requests[1][2]["Authorization"].startswith("Basic ")


# -- deployment problems are not the event's (issue 8, defect 5) -----------------------------------


@pytest.mark.parametrize(
    "status, variable",
    [(401, "EHRW_FHIR_AUTH"), (403, "EHRW_FHIR_AUTH"), (408, "EHRW_FHIR_TIMEOUT_S"), (412, "EHRW_FHIR_BASE_URL")],
)
def test_deployment_answers_raise_configuration_errors(status, variable):
    with ScriptedServer(lambda _r: (status, {}, INVALID)) as server:
        with FhirClient(server.base, max_retries=2) as c, pytest.raises(FhirConfigurationError) as err:
            c.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})
        assert len(server.requests) == 1  # not retried inside the request: the consumer pauses
    assert err.value.status == status and variable in str(err.value)
    assert not isinstance(err.value, (FhirPermanentError, FhirTransientError))  # never dead-lettered


def test_wrong_base_url_is_a_configuration_error_but_a_missing_order_is_not(client, fhir_base):
    with pytest.raises(FhirPermanentError) as missing:  # sekmet: a FHIR server, the order is absent
        client.read(f"ServiceRequest/{uuid.uuid4().hex}")
    assert missing.value.status == 404
    wrong = fhir_base.removesuffix("/fhir") + "/not-fhir"
    with FhirClient(wrong, max_retries=0) as c, pytest.raises(FhirConfigurationError) as err:
        c.read("ServiceRequest/1")
    assert err.value.status == 404 and "EHRW_FHIR_BASE_URL" in str(err.value)


def test_token_endpoint_refusal_is_a_configuration_error():
    def handle(req):
        if req.path == "/token":
            return 400, {}, {"error": "invalid_client", "error_description": "client Ada Lovelace unknown"}
        return 200, {}, PATIENT

    with ScriptedServer(handle) as server:
        auth = FhirAuth(
            kind="client_credentials",
            token_url=server.base.removesuffix("/fhir") + "/token",
            client_id="ehrw",
            client_secret="s3cret",
        )
        with FhirClient(server.base, auth, max_retries=3) as c, pytest.raises(FhirConfigurationError) as err:
            c.read("Patient/p1")
    text = str(err.value)
    assert err.value.status == 400 and "invalid_client" in text and "EHRW_FHIR_CLIENT_SECRET" in text
    assert "Ada" not in text


def test_configuration_errors_survive_celerys_json_round_trip():
    original = FhirConfigurationError("token refused", 400, "EHRW_FHIR_CLIENT_ID", 3.0, None)
    rebuilt = FhirConfigurationError(*original.args)  # how Celery rebuilds a task's exception
    assert (rebuilt.status, rebuilt.variable, rebuilt.retry_after, str(rebuilt)) == (
        original.status, original.variable, original.retry_after, str(original),
    )  # fmt: skip
    assert FhirPermanentError(*FhirPermanentError(404, INVALID, "read").args).status == 404


# -- server text stays out of errors (issue 8, defect 9) -------------------------------------------


def test_operation_outcome_is_reduced_to_codes_and_paths():
    chatty = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "invalid",
                "diagnostics": "Task.note 'Ada Lovelace, 36, BRCA1' too long",
                "details": {"text": "Ada Lovelace", "coding": [{"system": "http://x.org/cs", "code": "MSG_LEN"}]},
                "expression": ["Task.note[0].text", "Task.where(note = 'Ada Lovelace')"],
            }
        ],
    }
    with (
        ScriptedServer(lambda _r: (422, {}, chatty)) as server,
        FhirClient(server.base, max_retries=0) as c,
        pytest.raises(FhirPermanentError) as err,
    ):
        c.read("Patient/p1")
    kept = err.value.operation_outcome
    assert kept == {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "invalid",
                "details": {"coding": [{"code": "MSG_LEN", "system": "http://x.org/cs"}]},
                "expression": ["Task.note[0].text"],
            }
        ],
    }
    for text in (str(err.value), repr(err.value.args), json.dumps(kept)):
        assert "Ada" not in text
    assert "[invalid] Task.note[0].text" in str(err.value)


# -- credentials only over TLS (issue 8, defect 11) ------------------------------------------------


def test_credentials_over_plain_http_are_refused_except_to_this_machine():
    auth = FhirAuth(kind="bearer", token="t")
    with pytest.raises(ValueError, match="EHRW_FHIR_ALLOW_INSECURE_HTTP"):
        FhirClient("http://fhir.hospital.example/fhir", auth)
    FhirClient("http://fhir.hospital.example/fhir", auth, allow_insecure_http=True).close()
    FhirClient("https://fhir.hospital.example/fhir", auth).close()
    FhirClient("http://127.0.0.1:8090/fhir", auth).close()  # the local demo
    FhirClient("http://fhir.hospital.example/fhir").close()  # no credentials, nothing to leak
