"""SMART Backend Services (``private_key_jwt``) against sekmet-fhir's real authorization server.

sekmet is started with SMART auth on: a registered client whose JWKS holds our RSA (RS384) and
P-384 (ES384) public keys, scopes limited so that some requests must be refused (issue 8, defect 11).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from connectors.embedded import free_port, start_sekmet
from connectors.fhir import FhirAuth, FhirClient, FhirConfigurationError

pytestmark = pytest.mark.services

CLIENT_ID = "ehr-worker-test"
GRANTED = "system/Patient.cruds system/Task.cu"
TOKEN_LIFETIME_S = 32  # the client refreshes 30 s early: a token is reused for about 2 s


def _write_key(key, path: Path) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    return path


def _jwk(key, kid: str, alg: str) -> dict:
    algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "alg": alg, "use": "sig"}


@pytest.fixture(scope="module")
def smart_server(tmp_path_factory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("smart")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # One registered client per key type: sekmet 0.1.1 tries every key of a client's JWKS and fails
    # with a 500 when an ES384 assertion meets an RSA key (it ignores ``kid``).
    clients = [
        {"client_id": f"{CLIENT_ID}-rsa", "jwks": {"keys": [_jwk(rsa_key, "rsa-1", "RS384")]}, "scopes": GRANTED},
        {"client_id": f"{CLIENT_ID}-ec", "jwks": {"keys": [_jwk(ec_key, "ec-1", "ES384")]}, "scopes": GRANTED},
    ]
    port = free_port()
    server_auth = {"types": ["smart"], "smart_clients": clients, "token_lifetime": TOKEN_LIFETIME_S}
    process = start_sekmet(port, work / "sekmet", extra_settings={"server_auth": server_auth})
    root = f"http://127.0.0.1:{port}"
    yield {
        "base": f"{root}/fhir",
        "token_url": f"{root}/auth/token",
        "rsa": _write_key(rsa_key, work / "rsa.pem"),
        "ec": _write_key(ec_key, work / "ec.pem"),
        "stranger": _write_key(stranger, work / "stranger.pem"),
    }
    process.stop()


def _client(server: dict, key: str, kid: str | None, scope: str = GRANTED, *, discover: bool = False) -> FhirClient:
    auth = FhirAuth(
        kind="smart_backend",
        token_url=None if discover else server["token_url"],
        client_id=f"{CLIENT_ID}-{'ec' if key == 'ec' else 'rsa'}",
        private_key_path=str(server[key]),
        key_id=kid,
        scope=scope,
    )
    return FhirClient(server["base"], auth, max_retries=0)


@pytest.mark.parametrize("key, kid", [("rsa", "rsa-1"), ("ec", "ec-1"), ("rsa", None)])
def test_private_key_jwt_gets_a_token_and_writes(smart_server, key, kid):
    with _client(smart_server, key, kid) as fhir:
        created = fhir.create({"resourceType": "Patient", "active": True})
        assert created["id"]


def test_token_endpoint_is_discovered_from_smart_configuration(smart_server):
    with _client(smart_server, "rsa", "rsa-1", discover=True) as fhir:
        assert fhir.create({"resourceType": "Patient"})["id"]
        assert fhir._tokens.token_url == smart_server["token_url"]


def test_token_is_cached_and_refreshed_before_expiry(smart_server):
    with _client(smart_server, "ec", "ec-1") as fhir:
        fhir.create({"resourceType": "Patient"})
        first = fhir._tokens._token
        fhir.create({"resourceType": "Patient"})
        assert fhir._tokens._token == first  # cached
        time.sleep(TOKEN_LIFETIME_S - 30 + 0.5)  # past the refresh point, before the server's expiry
        fhir.create({"resourceType": "Patient"})
        assert fhir._tokens._token != first


def test_a_missing_scope_is_a_configuration_error_naming_the_scope(smart_server):
    with _client(smart_server, "rsa", "rsa-1") as fhir, pytest.raises(FhirConfigurationError) as err:
        fhir.search("ServiceRequest")  # not granted: 403, a fresh token, 403 again
    assert err.value.status == 403 and "EHRW_FHIR_SCOPE" in str(err.value)


def test_an_unregistered_key_is_a_configuration_error(smart_server):
    with _client(smart_server, "stranger", "rsa-1") as fhir, pytest.raises(FhirConfigurationError) as err:
        fhir.create({"resourceType": "Patient"})
    assert err.value.status == 401 and "invalid_client" in str(err.value)
    assert "EHRW_FHIR_PRIVATE_KEY_PATH" in str(err.value)


def test_a_key_that_is_not_rs384_or_es384_is_refused(tmp_path):
    p256 = _write_key(ec.generate_private_key(ec.SECP256R1()), tmp_path / "p256.pem")
    auth = FhirAuth(kind="smart_backend", client_id="c", private_key_path=str(p256), scope="s")
    with pytest.raises(ValueError, match="RS384/ES384"):
        FhirClient("https://h/fhir", auth)


def test_the_assertion_names_its_key_and_audience(smart_server):
    import jwt

    from connectors.fhir_auth import _AssertionSigner

    auth = FhirAuth(
        kind="smart_backend",
        token_url=smart_server["token_url"],
        client_id="c1",
        private_key_path=str(smart_server["ec"]),
        key_id="ec-1",
        jku="https://ehr-worker.example/jwks.json",
        scope="system/Task.cu",
    )
    assertion = _AssertionSigner(auth).assertion(auth.token_url)
    header = jwt.get_unverified_header(assertion)
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert header["alg"] == "ES384" and header["kid"] == "ec-1" and header["jku"] == auth.jku
    assert claims["iss"] == claims["sub"] == "c1" and claims["aud"] == auth.token_url
    assert 0 < claims["exp"] - time.time() <= 300 and claims["jti"]
