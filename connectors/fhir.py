"""A small synchronous FHIR R4 REST client: auth, bounded retries, typed errors.

Synchronous on purpose: the Celery task that uses it is synchronous, and one client (one
connection pool) lives per worker process.

Error model (what the worker does with each):

- ``FhirTransientError``: 429, 5xx, 409, timeouts and connection errors, after this client's own
  quick retries are exhausted. The caller retries later (Celery backoff), honouring ``retry_after``.
- ``FhirPermanentError``: any other 4xx (validation, not found, forbidden...). Retrying cannot
  help; the event goes to the dead-letter topic with ``operation_outcome``.

Nothing here logs or formats a request or response body: bodies hold patient data. Error messages
carry the HTTP status and the OperationOutcome's issue codes and diagnostics (server text about
structure) only.
"""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
AuthKind = Literal["none", "basic", "bearer", "client_credentials"]
Params = Mapping[str, Any] | Sequence[tuple[str, Any]]

# Refresh an OAuth2 token this long before the server says it expires, so a request never
# leaves with a token that dies in flight.
_TOKEN_EXPIRY_SKEW_S = 30.0
_DEFAULT_TOKEN_LIFETIME_S = 300.0
# A Retry-After longer than this is not slept through inside a request: the error is raised at
# once with ``retry_after`` so the caller (a Celery retry with countdown) waits without holding
# a worker process.
_MAX_INLINE_RETRY_AFTER_S = 30.0
_REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/([A-Za-z0-9\-.]{1,64}))?$")


class FhirError(Exception):
    """Base class of the errors this client raises."""


class FhirTransientError(FhirError):
    """A failure worth retrying later: 429, 5xx, 409, a timeout or a connection error."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        operation_outcome: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.operation_outcome = operation_outcome


class FhirPermanentError(FhirError):
    """The server refused the request for a reason a retry cannot fix (4xx other than 409/429)."""

    def __init__(
        self,
        status: int,
        operation_outcome: dict | None = None,
        *,
        operation: str = "request",
        detail: str = "",
    ) -> None:
        self.status = status
        self.operation_outcome = operation_outcome
        self.operation = operation
        self.detail = detail
        super().__init__(status, operation_outcome)

    def __str__(self) -> str:
        text = f"{self.operation} failed with HTTP {self.status}"
        if self.detail:
            text += f": {self.detail}"
        issues = outcome_summary(self.operation_outcome)
        return f"{text}: {issues}" if issues else text


def outcome_summary(outcome: dict | None, *, max_issues: int = 5, max_chars: int = 300) -> str:
    """``"[structure] Field required (Observation.code); ..."`` from an OperationOutcome."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    issues = [i for i in outcome.get("issue") or [] if isinstance(i, dict)]
    for issue in issues[:max_issues]:
        code = issue.get("code") or "unknown"
        diag = str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "")
        parts.append(f"[{code}] {diag[:max_chars]}".rstrip())
    if len(issues) > max_issues:
        parts.append(f"(+{len(issues) - max_issues} more issues)")
    return "; ".join(parts)


def entry_status(entry: Mapping[str, Any]) -> int:
    """The HTTP status of a transaction/batch-response entry: ``"201 Created"`` or ``"201"`` -> 201."""
    status = str((entry.get("response") or {}).get("status") or "").strip()
    match = re.match(r"^(\d{3})\b", status)
    if not match:
        raise ValueError(f"bundle entry response has no HTTP status code (got {status!r})")
    return int(match.group(1))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait per a ``Retry-After`` header (delta-seconds or HTTP date); None if absent/garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class FhirAuth:
    """How to authenticate to the FHIR server. Secrets are kept out of ``repr``.

    - ``none``; ``basic`` (username, password); ``bearer`` (token, a static access token);
    - ``client_credentials``: OAuth2 client credentials with a client secret (token_url, client_id,
      client_secret, optional scope); the client id and secret go in HTTP Basic
      (``client_secret_basic``) unless ``client_auth="post"`` puts them in the form body.
    """

    kind: AuthKind = "none"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    scope: str | None = None
    client_auth: Literal["basic", "post"] = "basic"

    def __post_init__(self) -> None:
        required: dict[str, tuple[str, ...]] = {
            "none": (),
            "basic": ("username", "password"),
            "bearer": ("token",),
            "client_credentials": ("token_url", "client_id", "client_secret"),
        }
        if self.kind not in required:
            raise ValueError(f"unknown FHIR auth kind {self.kind!r}; use one of {', '.join(required)}")
        missing = [name for name in required[self.kind] if not getattr(self, name)]
        if missing:
            env = ", ".join(f"EHRW_FHIR_{m.upper()}" for m in missing)
            raise ValueError(f"FHIR auth {self.kind!r} needs {', '.join(missing)} (set {env})")


class _TokenCache:
    """OAuth2 client-credentials access token, fetched lazily and reused until shortly before expiry."""

    def __init__(self, auth: FhirAuth) -> None:
        self._auth = auth
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def get(self, http: httpx.Client) -> str:
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._token, lifetime = self._fetch(http)
                self._expires_at = time.monotonic() + max(0.0, lifetime - _TOKEN_EXPIRY_SKEW_S)
            return self._token

    def _fetch(self, http: httpx.Client) -> tuple[str, float]:
        a = self._auth
        assert a.token_url and a.client_id and a.client_secret
        form = {"grant_type": "client_credentials"}
        if a.scope:
            form["scope"] = a.scope
        basic: httpx.BasicAuth | None = None
        if a.client_auth == "post":
            form.update(client_id=a.client_id, client_secret=a.client_secret)
        else:
            basic = httpx.BasicAuth(a.client_id, a.client_secret)
        try:
            resp = http.post(a.token_url, data=form, auth=basic, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise FhirTransientError(f"token request to {a.token_url} failed: {type(exc).__name__}") from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            raise FhirTransientError(
                f"token endpoint {a.token_url} answered {resp.status_code}",
                status=resp.status_code,
                retry_after=parse_retry_after(resp.headers.get("Retry-After")),
            )
        if resp.status_code != 200:
            # RFC 6749 error codes ("invalid_client") are safe to show; the body is not echoed.
            try:
                err = str(resp.json().get("error", ""))[:100]
            except ValueError:
                err = ""
            raise FhirPermanentError(
                resp.status_code,
                operation="OAuth2 token request",
                detail=f"{err or 'rejected'}; check EHRW_FHIR_CLIENT_ID, EHRW_FHIR_CLIENT_SECRET "
                "and EHRW_FHIR_TOKEN_URL",
            )
        try:
            body = resp.json()
            token = str(body["access_token"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FhirPermanentError(
                resp.status_code, operation="OAuth2 token request", detail="response has no access_token"
            ) from exc
        try:
            lifetime = float(body.get("expires_in", _DEFAULT_TOKEN_LIFETIME_S))
        except (TypeError, ValueError):
            lifetime = _DEFAULT_TOKEN_LIFETIME_S
        log.debug("obtained OAuth2 access token (expires in %.0fs)", lifetime)
        return token, lifetime


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
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"FHIR base URL must start with http:// or https:// (got {base_url!r})")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.auth = auth or FhirAuth()
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_pages = max_pages
        self._base = urlsplit(self.base_url)
        self._tokens = _TokenCache(self.auth) if self.auth.kind == "client_credentials" else None
        self._http = httpx.Client(
            timeout=timeout,
            transport=transport,
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
        result = self._request("POST", "", json=bundle, operation=f"{bundle['type']} Bundle")
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
        if not rid or not _REFERENCE.match(f"{rtype}/{rid}"):
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
        match = _REFERENCE.match(ref)
        if not match:
            raise ValueError(
                "not a FHIR reference like 'ServiceRequest/123' or 'ServiceRequest/123/_history/2': "
                f"{reference!r}"
            )
        return match.group(1), match.group(2), match.group(3)

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
                query = _param_items(params) or None
                resp = self._http.request(method, url, json=json, params=query, headers=req_headers)
            except httpx.TimeoutException as exc:
                failure = FhirTransientError(
                    f"{operation}: {type(exc).__name__} after {self.timeout}s at {log_path}"
                )
                # A request that may have reached the server is only retried when repeating it is harmless.
                retryable = idempotent or isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout))
            except httpx.TransportError as exc:
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
                if status == 401 and self._tokens is not None and not refreshed_token:
                    # The cached token was revoked or expired early: fetch a new one, once.
                    log.info("%s %s: 401, refreshing the OAuth2 token", method, log_path)
                    self._tokens.invalidate()
                    refreshed_token = True
                    continue
                if status not in (409, 429) and status < 500:
                    hint = "check EHRW_FHIR_AUTH and its credentials/scopes" if status in (401, 403) else ""
                    raise FhirPermanentError(status, outcome, operation=operation, detail=hint)
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


def _check_type(resource_type: object) -> str:
    if not isinstance(resource_type, str) or not re.fullmatch(r"[A-Z][A-Za-z]+", resource_type):
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
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None
