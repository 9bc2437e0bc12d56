"""A small synchronous FHIR R4 REST client: auth, bounded retries, typed errors.

Synchronous on purpose: the Celery task that uses it is synchronous, and one client (one
connection pool) lives per worker process.

Error model (what the worker does with each; details in :mod:`connectors.fhir_errors`):

- ``FhirTransientError``: 429, 5xx, 409, timeouts and connection errors, after this client's own
  quick retries are exhausted. The caller retries later, honouring ``retry_after``.
- ``FhirPermanentError``: any other 4xx caused by the event (validation, order not found...).
  Retrying cannot help; the event goes to the dead-letter topic with ``operation_outcome``.
- ``FhirConfigurationError``: the deployment's problem (token refused, 401/403 after one token
  refresh, a base URL that is no FHIR server, 408, 412): pause and retry, never dead-letter.

Nothing here logs or formats a request or response body: bodies hold patient data. Errors carry
the HTTP status and the OperationOutcome reduced to issue codes and element paths only.
"""

from __future__ import annotations

import logging
import random
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from connectors.fhir_auth import AuthKind, FhirAuth, TokenCache, check_transport
from connectors.fhir_errors import (
    FhirConfigurationError,
    FhirError,
    FhirPermanentError,
    FhirTransientError,
    outcome_summary,
    parse_retry_after,
)
from schemas.outcomes import outcome_codes
from schemas.references import is_resource_type, parse_relative_reference

__all__ = [
    "AuthKind",
    "FhirAuth",
    "FhirClient",
    "FhirConfigurationError",
    "FhirError",
    "FhirPermanentError",
    "FhirTransientError",
    "entry_status",
    "outcome_summary",
    "parse_retry_after",
]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
Params = Mapping[str, Any] | Sequence[tuple[str, Any]]

# A Retry-After longer than this is not slept through inside a request: the error is raised at
# once with ``retry_after`` so the caller waits without holding a worker process.
_MAX_INLINE_RETRY_AFTER_S = 30.0
# After GET metadata proved the base URL right, a 404 is taken as "not found" this long.
_BASE_URL_CHECK_TTL_S = 300.0


def entry_status(entry: Mapping[str, Any]) -> int:
    """The HTTP status of a transaction/batch-response entry: ``"201 Created"`` or ``"201"`` -> 201."""
    status = str((entry.get("response") or {}).get("status") or "").strip()
    match = re.match(r"^(\d{3})\b", status)
    if not match:
        raise ValueError(f"bundle entry response has no HTTP status code (got {status!r})")
    return int(match.group(1))


class FhirClient:
    """FHIR R4 REST client over ``httpx.Client``.

    Every request is retried up to ``max_retries`` times on transient failures, sleeping
    ``backoff_base * 2**attempt`` (equal jitter, capped at ``backoff_max``) or the server's
    ``Retry-After`` when it sends one. Writes are only safe to retry because the worker's
    write-back is idempotent (conditional creates); a plain :meth:`create` without
    ``if_none_exist`` is therefore retried only when the server cannot have processed it.
    """

    def __init__(
        self,
        base_url: str,
        auth: FhirAuth | None = None,
        *,
        timeout: float = 15.0,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        max_pages: int = 50,
        transport: httpx.BaseTransport | None = None,
        user_agent: str = "ehr-worker",
        allow_insecure_http: bool = False,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"FHIR base URL must start with http:// or https:// (got {base_url!r})")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.auth = auth or FhirAuth()
        check_transport(self.base_url, self.auth, allow_insecure_http=allow_insecure_http)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_pages = max_pages
        self._base = urlsplit(self.base_url)
        self._tokens: TokenCache | None = None
        if self.auth.kind in ("client_credentials", "smart_backend"):
            self._tokens = TokenCache(self.auth, self.base_url, allow_insecure_http=allow_insecure_http)
        self._base_checked_until = 0.0
        self._http = httpx.Client(
            timeout=timeout,
            transport=transport,
            verify=verify,
            headers={"Accept": FHIR_JSON, "User-Agent": user_agent},
            auth=httpx.BasicAuth(self.auth.username or "", self.auth.password or "")
            if self.auth.kind == "basic"
            else None,
            follow_redirects=False,  # a redirect to another host must not carry our credentials
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r}, auth={self.auth.kind!r})"

    # -- operations ------------------------------------------------------------------------------

    def ping(self) -> bool:
        """True when ``GET [base]/metadata`` answers 200 (no retries, never raises)."""
        try:
            resp = self._http.get(f"{self.base_url}/metadata", headers=self._auth_headers())
        except (httpx.HTTPError, FhirError):
            return False
        return resp.status_code == 200

    def capabilities(self) -> dict:
        return self._request("GET", "metadata", operation="capabilities")

    def transaction(self, bundle: dict) -> dict:
        """POST a ``transaction`` (or ``batch``) Bundle to the base; returns the response Bundle.

        A transaction is atomic on the server, so retrying after an ambiguous failure is safe as
        long as its entries are conditional (``ifNoneExist``), as the worker's write-backs are.
        """
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
            raise ValueError("transaction() needs a Bundle of type 'transaction' or 'batch'")
        # Entries with ifMatch make 412 this Bundle's own precondition failing (a resource changed
        # since it was read), which the caller rebuilds from a fresh read; not a deployment problem.
        if_match = any(isinstance(e, dict) and (e.get("request") or {}).get("ifMatch") for e in bundle.get("entry") or [])
        result = self._request(
            "POST", "", json=bundle, operation=f"{bundle['type']} Bundle", own_preconditions=if_match
        )
        expected = f"{bundle['type']}-response"
        if result.get("resourceType") != "Bundle" or result.get("type") != expected:
            raise FhirPermanentError(
                200, operation="transaction", detail=f"server did not return a {expected} Bundle"
            )
        return result

    def read(self, reference: str) -> dict:
        """Read ``Type/id`` or ``Type/id/_history/vid`` (also as an absolute URL on this server)."""
        rtype, rid, vid = self.parse_reference(reference)
        path = f"{rtype}/{rid}" + (f"/_history/{vid}" if vid else "")
        return self._request("GET", path, operation=f"read {rtype}")

    def search(
        self, resource_type: str, params: Params | None = None, *, max_pages: int | None = None
    ) -> list[dict]:
        """Resources matching a search (``match`` and ``include`` entries), following ``next`` links.

        Stops after ``max_pages`` pages (default: the client's) with a warning rather than
        paging forever through a runaway result set.
        """
        _check_type(resource_type)
        limit = max_pages or self.max_pages
        bundle = self._request("GET", resource_type, params=params, operation=f"search {resource_type}")
        resources: list[dict] = []
        for page in range(1, limit + 1):
            for entry in bundle.get("entry") or []:
                mode = (entry.get("search") or {}).get("mode", "match")
                if mode != "outcome" and isinstance(entry.get("resource"), dict):
                    resources.append(entry["resource"])
            next_url = _link(bundle, "next")
            if not next_url:
                return resources
            if page == limit:
                log.warning(
                    "search %s: stopped after %d pages (%d resources); narrow the search",
                    resource_type, limit, len(resources),
                )  # fmt: skip
                return resources
            bundle = self._request(
                "GET", self._same_server(next_url), operation=f"search {resource_type} (next page)"
            )
        return resources

    def count(self, resource_type: str, params: Params | None = None) -> int:
        """The number of matches of a search, via ``_summary=count`` (no resources transferred)."""
        _check_type(resource_type)
        query = [*_param_items(params), ("_summary", "count")]
        bundle = self._request("GET", resource_type, params=query, operation=f"count {resource_type}")
        total = bundle.get("total")
        if not isinstance(total, int):
            raise FhirPermanentError(
                200, operation=f"count {resource_type}", detail="server returned no Bundle.total"
            )
        return total

    def create(self, resource: dict, *, if_none_exist: str | None = None) -> dict:
        """POST a resource; with ``if_none_exist`` (a search query) a conditional create.

        Returns the stored resource (a conditional create that matched returns the existing one).
        """
        rtype = _check_type(resource.get("resourceType"))
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else {}
        return self._request(
            "POST",
            rtype,
            json=resource,
            headers=headers,
            operation=f"create {rtype}",
            idempotent=bool(if_none_exist),
        )

    def put(self, resource: dict, *, if_match: str | None = None) -> dict:
        """PUT (update or create-with-id) a resource; ``if_match`` is a versionId for optimistic locking."""
        rtype = _check_type(resource.get("resourceType"))
        rid = resource.get("id")
        if not rid or parse_relative_reference(f"{rtype}/{rid}") is None:
            raise ValueError("put() needs a resource with a valid id")
        headers = {"If-Match": f'W/"{if_match}"'} if if_match else {}
        return self._request(
            "PUT", f"{rtype}/{rid}", json=resource, headers=headers, operation=f"update {rtype}"
        )

    # -- helpers ---------------------------------------------------------------------------------

    def parse_reference(self, reference: str) -> tuple[str, str, str | None]:
        """``(type, id, version or None)`` from a relative reference or an absolute URL on this server."""
        ref = reference.strip()
        if ref.startswith(("http://", "https://")):
            if not ref.startswith(self.base_url + "/"):
                raise ValueError(f"reference {reference!r} is not on this FHIR server ({self.base_url})")
            ref = ref[len(self.base_url) + 1 :]
        parsed = parse_relative_reference(ref)
        if parsed is None:
            raise ValueError(
                "not a FHIR reference like 'ServiceRequest/123' or 'ServiceRequest/123/_history/2': "
                f"{reference!r}"
            )
        return parsed.resource_type, parsed.id, parsed.version

    def _same_server(self, url: str) -> str:
        """Map a paging link onto our base URL.

        Servers behind proxies often write their internal host name into links; the path and query
        are what matter. A link outside our base path is refused so credentials never go elsewhere.
        """
        parts = urlsplit(url)
        if not parts.scheme:  # relative link
            return url
        if not parts.path.startswith(self._base.path):
            raise FhirPermanentError(
                200, operation="search paging", detail="next link points outside the FHIR base URL"
            )
        return urlunsplit((self._base.scheme, self._base.netloc, parts.path, parts.query, ""))

    def _auth_headers(self) -> dict[str, str]:
        if self.auth.kind == "bearer":
            return {"Authorization": f"Bearer {self.auth.token}"}
        if self._tokens is not None:
            return {"Authorization": f"Bearer {self._tokens.get(self._http)}"}
        return {}

    def _url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path}" if path else self.base_url

    def _sleep_before_retry(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            delay = retry_after
        else:
            cap = min(self.backoff_max, self.backoff_base * 2**attempt)
            delay = cap / 2 + random.uniform(0, cap / 2)
        time.sleep(delay)

    def _deployment_problem(
        self, status: int, operation: str, outcome: dict | None, *, own_preconditions: bool
    ) -> FhirConfigurationError | None:
        """The error to raise when an answer says the deployment is wrong rather than the event.
        ``own_preconditions``: the request carried If-Match (header or transaction entries), so a
        412 means "changed since read", the caller's to handle."""
        issues = outcome_summary(outcome)
        said = f"{operation} failed with HTTP {status}" + (f": {issues}" if issues else "")
        if status in (401, 403):
            variable = "EHRW_FHIR_AUTH and its credentials" + (" and EHRW_FHIR_SCOPE" if self._tokens else "")
            refreshed = " after a fresh token" if self._tokens else ""
            return FhirConfigurationError(f"{said}{refreshed}", status, variable, None, outcome)
        if status == 404 and not self._base_url_answers():
            return FhirConfigurationError(
                f"{said}, and GET {self.base_url}/metadata gives no CapabilityStatement: not a FHIR base URL",
                status, "EHRW_FHIR_BASE_URL", None, outcome,
            )  # fmt: skip
        if status == 408:
            return FhirConfigurationError(
                f"{said}: the server or a proxy timed the request out", status,
                "the network path to EHRW_FHIR_BASE_URL (proxy timeouts) and EHRW_FHIR_TIMEOUT_S", None, outcome,
            )  # fmt: skip
        if status == 412 and not own_preconditions:
            # Conditional creates (ifNoneExist) matched several resources: duplicates on the server.
            return FhirConfigurationError(
                f"{said}: a conditional request matched several resources on the server", status,
                "the server's duplicate suggestion resources (EHRW_FHIR_BASE_URL names the server)", None, outcome,
            )  # fmt: skip
        return None

    def _base_url_answers(self) -> bool:
        """True when ``GET [base]/metadata`` returns a CapabilityStatement (cached for a while), so
        that a 404 is "this resource does not exist" rather than "this is no FHIR server"."""
        if time.monotonic() < self._base_checked_until:
            return True
        try:
            resp = self._http.get(f"{self.base_url}/metadata", headers=self._auth_headers())
            ok = resp.status_code == 200 and resp.json().get("resourceType") == "CapabilityStatement"
        except (httpx.HTTPError, ValueError, AttributeError, FhirError):
            return True  # cannot tell: keep the answer the server gave
        if ok:
            self._base_checked_until = time.monotonic() + _BASE_URL_CHECK_TTL_S
        return ok

    def _request(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        json: dict | None = None,
        params: Params | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
        own_preconditions: bool = False,
    ) -> dict:
        url = self._url(path)
        log_path = urlsplit(url).path  # never the query: search parameters may name a patient
        refreshed_token = False
        attempt = 0
        while True:
            failure: FhirTransientError
            try:
                req_headers = {**(headers or {}), **self._auth_headers()}
                if json is not None:
                    req_headers["Content-Type"] = FHIR_JSON
                    req_headers.setdefault("Prefer", "return=representation")
                # params=None, not []: httpx replaces a URL's query (a paging link's) with empty params.
                query = tuple(_param_items(params)) or None
                resp = self._http.request(method, url, json=json, params=query, headers=req_headers)
            except httpx.TimeoutException as exc:
                failure = FhirTransientError(
                    f"{operation}: {type(exc).__name__} after {self.timeout}s at {log_path}"
                )
                # A request that may have reached the server is only retried when repeating it is harmless.
                retryable = idempotent or isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout))
            except httpx.TransportError as exc:
                if _certificate_rejected(exc):  # waiting will not make the certificate trusted
                    raise FhirConfigurationError(
                        f"{operation}: the TLS certificate of {self._base.netloc} is not trusted",
                        None, "EHRW_FHIR_CA_FILE (the CA bundle of the hospital's PKI) and EHRW_FHIR_BASE_URL",
                    ) from None
                failure = FhirTransientError(
                    f"{operation}: {type(exc).__name__} talking to {self._base.netloc}"
                )
                retryable = idempotent or isinstance(exc, httpx.ConnectError)
            except FhirTransientError as exc:  # the OAuth2 token endpoint
                failure, retryable = exc, True
            else:
                status = resp.status_code
                if 200 <= status < 300:
                    return _json_body(resp, operation)
                outcome = _operation_outcome(resp)
                if status in (401, 403) and self._tokens is not None and not refreshed_token:
                    # The cached token was revoked, expired early or lacks a scope: fetch a new one, once.
                    log.info("%s %s: %d, refreshing the OAuth2 token", method, log_path, status)
                    self._tokens.invalidate()
                    refreshed_token = True
                    continue
                deployment = self._deployment_problem(
                    status, operation, outcome, own_preconditions=own_preconditions or "If-Match" in (headers or {})
                )
                if deployment is not None:
                    raise deployment
                if status not in (409, 429) and status < 500:
                    raise FhirPermanentError(status, outcome, operation=operation)
                # 409 is a concurrent-version conflict (two workers' conditional creates racing):
                # a retry finds the winner's resource.
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                summary = outcome_summary(outcome)
                failure = FhirTransientError(
                    f"{operation} failed with HTTP {status}" + (f": {summary}" if summary else ""),
                    status=status,
                    retry_after=retry_after,
                    operation_outcome=outcome,
                )
                retryable = idempotent or status in (429, 503)
            if not retryable or attempt >= self.max_retries:
                raise failure
            if failure.retry_after is not None and failure.retry_after > _MAX_INLINE_RETRY_AFTER_S:
                raise failure  # the caller schedules the retry; no worker should sleep minutes here
            log.info(
                "%s %s: %s (status %s); retry %d/%d",
                method, log_path, operation, failure.status, attempt + 1, self.max_retries,
            )  # fmt: skip
            self._sleep_before_retry(attempt, failure.retry_after)
            attempt += 1


def _certificate_rejected(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _check_type(resource_type: object) -> str:
    if not is_resource_type(resource_type):
        raise ValueError(f"not a FHIR resource type: {resource_type!r}")
    return resource_type


def _param_items(params: Params | None) -> list[tuple[str, str]]:
    """Search parameters as a list of pairs, so a parameter may repeat (``_tag`` twice = AND)."""
    if params is None:
        return []
    items = params.items() if isinstance(params, Mapping) else params
    out: list[tuple[str, str]] = []
    for key, value in items:
        values = value if isinstance(value, (list, tuple)) else [value]
        out.extend((key, str(v)) for v in values)
    return out


def _link(bundle: dict, relation: str) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == relation and link.get("url"):
            return str(link["url"])
    return None


def _json_body(resp: httpx.Response, operation: str) -> dict:
    if not resp.content:
        return {}
    try:
        body = resp.json()
    except ValueError:
        raise FhirPermanentError(resp.status_code, operation=operation, detail="not JSON") from None
    if not isinstance(body, dict):
        raise FhirPermanentError(resp.status_code, operation=operation, detail="not a JSON object")
    return body


def _operation_outcome(resp: httpx.Response) -> dict | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    return outcome_codes(body)  # codes and element paths only: diagnostics may quote patient data
