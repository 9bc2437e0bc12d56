"""How the worker authenticates to the FHIR server: settings, and OAuth2 access tokens.

Two OAuth2 client-credentials flavours are supported, both with a token cached until shortly
before it expires and fetched again once when the server answers 401:

- ``client_credentials``: a client secret (``client_secret_basic``, or ``post`` in the body);
- ``smart_backend``: SMART Backend Services, the client authenticates with a signed JWT
  (``private_key_jwt``, RS384 or ES384) instead of a shared secret; the hospital registers the
  public key (a JWKS, or the ``jku`` URL serving it) and only the private key file stays here.

A refused token request is the deployment's problem (wrong client id, key not registered,
scope not allowed), never an event's: it raises :class:`FhirConfigurationError` naming the
variables to check.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from connectors.fhir_errors import FhirConfigurationError, FhirTransientError, parse_retry_after

log = logging.getLogger(__name__)

AuthKind = Literal["none", "basic", "bearer", "client_credentials", "smart_backend"]
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SIGNING_ALGORITHMS = ("RS384", "ES384")  # the two SMART Backend Services requires servers to accept

# Refresh an access token this long before the server says it expires, so a request never leaves
# with a token that dies in flight.
TOKEN_EXPIRY_SKEW_S = 30.0
_DEFAULT_TOKEN_LIFETIME_S = 300.0
_ASSERTION_LIFETIME_S = 240  # SMART: exp at most 5 minutes ahead
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class FhirAuth:
    """How to authenticate to the FHIR server. Secrets are kept out of ``repr``.

    - ``none``; ``basic`` (username, password); ``bearer`` (token, a static access token);
    - ``client_credentials``: OAuth2 client credentials with a client secret (token_url, client_id,
      client_secret, optional scope); the client id and secret go in HTTP Basic
      (``client_secret_basic``) unless ``client_auth="post"`` puts them in the form body;
    - ``smart_backend``: SMART Backend Services (client_id, private_key_path, scope such as
      ``system/ServiceRequest.rs system/Task.cu``; optional key_id (``kid``), jku, algorithm, and
      token_url, found in ``[base]/.well-known/smart-configuration`` when not set).
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
    private_key_path: str | None = None
    key_id: str | None = None
    jku: str | None = None
    algorithm: Literal["RS384", "ES384"] | None = None  # None: from the key type

    def __post_init__(self) -> None:
        required: dict[str, tuple[str, ...]] = {
            "none": (),
            "basic": ("username", "password"),
            "bearer": ("token",),
            "client_credentials": ("token_url", "client_id", "client_secret"),
            "smart_backend": ("client_id", "private_key_path", "scope"),
        }
        if self.kind not in required:
            raise ValueError(f"unknown FHIR auth kind {self.kind!r}; use one of {', '.join(required)}")
        missing = [name for name in required[self.kind] if not getattr(self, name)]
        if missing:
            env = ", ".join(f"EHRW_FHIR_{m.upper()}" for m in missing)
            raise ValueError(f"FHIR auth {self.kind!r} needs {', '.join(missing)} (set {env})")
        if self.algorithm is not None and self.algorithm not in SIGNING_ALGORITHMS:
            raise ValueError(f"EHRW_FHIR_ALGORITHM must be one of {', '.join(SIGNING_ALGORITHMS)}")

    @property
    def sends_credentials(self) -> bool:
        return self.kind != "none"


def check_transport(base_url: str, auth: FhirAuth, *, allow_insecure_http: bool = False) -> None:
    """Refuse to send credentials over plain ``http://`` to anything but this machine.

    Loopback stays allowed so the local demo (sekmet on 127.0.0.1) works; any other host needs
    ``https://`` or an explicit ``EHRW_FHIR_ALLOW_INSECURE_HTTP=true`` (e.g. a TLS-terminating
    sidecar on a private network).
    """
    urls = [("EHRW_FHIR_BASE_URL", base_url)]
    if auth.token_url:
        urls.append(("EHRW_FHIR_TOKEN_URL", auth.token_url))
    for variable, url in urls:
        _check_url(variable, url, auth, allow_insecure_http)


def _check_url(variable: str, url: str, auth: FhirAuth, allow_insecure_http: bool) -> None:
    parts = urlsplit(url)
    remote = (parts.hostname or "") not in _LOCAL_HOSTS
    if parts.scheme == "http" and remote and auth.sends_credentials and not allow_insecure_http:
        raise ValueError(
            f"{variable} is http:// and FHIR auth {auth.kind!r} would send credentials in clear "
            f"to {parts.hostname}; use https:// or set EHRW_FHIR_ALLOW_INSECURE_HTTP=true"
        )


class TokenCache:
    """An OAuth2 access token, fetched lazily and reused until shortly before expiry.

    ``base_url``: the FHIR base, where SMART discovery finds the token endpoint when
    ``auth.token_url`` is not set.
    """

    def __init__(self, auth: FhirAuth, base_url: str = "", *, allow_insecure_http: bool = False) -> None:
        if auth.kind not in ("client_credentials", "smart_backend"):
            raise ValueError(f"no access tokens for FHIR auth {auth.kind!r}")
        if auth.token_url is None and not base_url:
            raise ValueError("FHIR auth needs EHRW_FHIR_TOKEN_URL (or a base URL to discover it)")
        self._auth = auth
        self._base_url = base_url.rstrip("/")
        self._allow_insecure_http = allow_insecure_http
        self.token_url = auth.token_url
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self._signer = _AssertionSigner(auth) if auth.kind == "smart_backend" else None

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    def get(self, http: httpx.Client) -> str:
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._token, lifetime = self._fetch(http)
                self._expires_at = time.monotonic() + max(0.0, lifetime - TOKEN_EXPIRY_SKEW_S)
            return self._token

    def _discover(self, http: httpx.Client) -> str:
        """The token endpoint from ``[base]/.well-known/smart-configuration`` (SMART App Launch 2)."""
        url = f"{self._base_url}/.well-known/smart-configuration"
        try:
            resp = http.get(url, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise FhirTransientError(f"SMART discovery at {url} failed: {type(exc).__name__}") from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            raise FhirTransientError(f"SMART discovery at {url} answered {resp.status_code}", status=resp.status_code)
        try:
            endpoint = resp.json()["token_endpoint"] if resp.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            endpoint = None
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            raise FhirConfigurationError(
                f"{url} gives no token_endpoint (HTTP {resp.status_code})", resp.status_code, "EHRW_FHIR_TOKEN_URL"
            )
        _check_url("the discovered token_endpoint", endpoint, self._auth, self._allow_insecure_http)
        return endpoint

    def _fetch(self, http: httpx.Client) -> tuple[str, float]:
        a = self._auth
        if self.token_url is None:
            self.token_url = self._discover(http)
        token_url = self.token_url
        assert a.client_id
        form = {"grant_type": "client_credentials"}
        if a.scope:
            form["scope"] = a.scope
        basic: httpx.BasicAuth | None = None
        if self._signer is not None:
            form.update(client_assertion_type=CLIENT_ASSERTION_TYPE, client_assertion=self._signer.assertion(token_url))
            variables = "EHRW_FHIR_CLIENT_ID, EHRW_FHIR_PRIVATE_KEY_PATH (its public key registered?), EHRW_FHIR_SCOPE"
        else:
            assert a.client_secret
            if a.client_auth == "post":
                form.update(client_id=a.client_id, client_secret=a.client_secret)
            else:
                basic = httpx.BasicAuth(a.client_id, a.client_secret)
            variables = "EHRW_FHIR_CLIENT_ID, EHRW_FHIR_CLIENT_SECRET, EHRW_FHIR_SCOPE"
        variables += " and EHRW_FHIR_TOKEN_URL"
        try:
            # auth=None: no Authorization header (the client id and secret are in the form); httpx types omit None
            resp = http.post(token_url, data=form, auth=basic,  # type: ignore[arg-type]
                             headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise FhirTransientError(f"token request to {token_url} failed: {type(exc).__name__}") from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            raise FhirTransientError(
                f"token endpoint {token_url} answered {resp.status_code}",
                status=resp.status_code,
                retry_after=parse_retry_after(resp.headers.get("Retry-After")),
            )
        if resp.status_code != 200:
            # RFC 6749 error codes ("invalid_client") are safe to show; the description is not echoed.
            raise FhirConfigurationError(
                f"OAuth2 token request refused with HTTP {resp.status_code} ({_oauth_error(resp) or 'rejected'})",
                status=resp.status_code,
                variable=variables,
            )
        try:
            body = resp.json()
            token = str(body["access_token"])
        except (ValueError, KeyError, TypeError):
            raise FhirConfigurationError(
                "OAuth2 token response has no access_token: EHRW_FHIR_TOKEN_URL is not a token endpoint?",
                status=resp.status_code,
                variable="EHRW_FHIR_TOKEN_URL",
            ) from None
        try:
            lifetime = float(body.get("expires_in", _DEFAULT_TOKEN_LIFETIME_S))
        except (TypeError, ValueError):
            lifetime = _DEFAULT_TOKEN_LIFETIME_S
        log.debug("obtained OAuth2 access token (expires in %.0fs)", lifetime)
        return token, lifetime


class _AssertionSigner:
    """Signs SMART Backend Services client assertions (RFC 7523) with the configured private key."""

    def __init__(self, auth: FhirAuth) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        assert auth.private_key_path and auth.client_id
        path = Path(auth.private_key_path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(
                f"EHRW_FHIR_PRIVATE_KEY_PATH={path} is not a readable unencrypted PEM private key "
                f"({type(exc).__name__})"
            ) from None
        if isinstance(key, rsa.RSAPrivateKey):
            algorithm = "RS384"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
            algorithm = "ES384"
        else:
            raise ValueError("EHRW_FHIR_PRIVATE_KEY_PATH must hold an RSA or P-384 EC key (RS384/ES384)")
        if auth.algorithm and auth.algorithm != algorithm:
            raise ValueError(f"EHRW_FHIR_ALGORITHM={auth.algorithm} does not fit the key ({algorithm})")
        self._key: Any = key
        self._auth = auth
        self.algorithm = algorithm

    def assertion(self, token_url: str) -> str:
        """A fresh signed assertion for the token endpoint ``token_url`` (its ``aud``)."""
        import jwt

        a = self._auth
        now = int(time.time())
        claims = {
            "iss": a.client_id,
            "sub": a.client_id,
            "aud": token_url,
            "exp": now + _ASSERTION_LIFETIME_S,
            "iat": now,
            "jti": uuid.uuid4().hex,  # one use only: servers refuse a replayed assertion
        }
        headers = {"typ": "JWT", **({"kid": a.key_id} if a.key_id else {}), **({"jku": a.jku} if a.jku else {})}
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)


def _oauth_error(resp: httpx.Response) -> str:
    try:
        error = resp.json().get("error", "")
    except (ValueError, AttributeError):
        return ""
    return error if isinstance(error, str) and error.replace("_", "").isalnum() and len(error) < 64 else ""
