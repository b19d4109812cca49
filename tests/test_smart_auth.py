"""SMART Backend Services, outbound: unit tests of the pure parts, then for real against the
sekmet FHIR server started with SMART enabled (client-credentials + private_key_jwt, scopes
enforced). Keys are generated at test time."""

from __future__ import annotations

import gc
import shutil
import time
import warnings

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds_devtools import devservers
from cds_service.web.context import ServiceContext
from cds_service.core.errors import UpstreamError, UpstreamRejectedError
from cds_service.adapters.fhir_client import FhirClient
from cds_service.jobs.sqlite_store import JobStore
from cds_service.core.settings import Settings
from cds_service.adapters.smart_auth import (
             AccessToken,
             SmartAuthError,
             SmartBackendAuth,
             SmartClientConfig,
             client_assertion,
             fhir_auth,
             jwk_thumbprint,
             load_private_key,
             public_jwk,
             signing_algorithm,
         )
from conftest import require

pytestmark = pytest.mark.integration  # a sekmet FHIR server with SMART on, of this module's own

CLIENT_ID = "cds-triage-test"


def pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


# --- pure ------------------------------------------------------------------------------------------


def test_signing_algorithm_follows_the_key():
    assert signing_algorithm(rsa.generate_private_key(public_exponent=65537, key_size=2048)) == "RS384"
    assert signing_algorithm(ec.generate_private_key(ec.SECP384R1())) == "ES384"
    with pytest.raises(ValueError):
        signing_algorithm(ec.generate_private_key(ec.SECP256R1()))  # ES256 is not what we sign with


def test_client_assertion_claims_and_header():
    key = ec.generate_private_key(ec.SECP384R1())
    token = client_assertion("client-1", key, "kid-1", "https://auth.example/token", now=1_700_000_000, jti="j1")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES384", "kid": "kid-1", "typ": "JWT"}
    claims = jwt.decode(token, key.public_key(), algorithms=["ES384"], audience="https://auth.example/token",
                        options={"verify_exp": False})
    assert claims == {"iss": "client-1", "sub": "client-1", "aud": "https://auth.example/token",
                      "exp": 1_700_000_300, "iat": 1_700_000_000, "jti": "j1"}


def test_kid_defaults_to_the_rfc7638_thumbprint_as_another_implementation_computes_it():
    from sekmet.auth.keys import thumbprint  # the test FHIR server's own implementation

    for key in (rsa.generate_private_key(public_exponent=65537, key_size=2048), ec.generate_private_key(ec.SECP384R1())):
        jwk = public_jwk(key)
        assert jwk["kid"] == jwk_thumbprint(jwk) == thumbprint(jwk)
        assert "d" not in jwk  # public half only


def test_token_is_renewed_before_it_expires():
    token = AccessToken("t", issued_at=0, expires_at=3600)
    assert token.usable(0) and token.usable(3539) and not token.usable(3541)
    short = AccessToken("t", issued_at=0, expires_at=10)  # short-lived: renewed at half-life
    assert short.usable(4) and not short.usable(6)


def test_fhir_auth_needs_the_key_file_and_refuses_bad_keys(tmp_path):
    assert fhir_auth(Settings()) is None  # not configured: bearer token (or nothing)
    with pytest.raises(ValueError, match="PRIVATE_KEY_FILE"):
        fhir_auth(Settings(fhir_smart_client_id="x"))
    weak = tmp_path / "weak.pem"
    weak.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ValueError, match="P-384"):
        load_private_key(weak)


# --- against the real FHIR server with SMART on ------------------------------------------------------


@pytest.fixture(scope="module")
def our_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def smart_fhir(tmp_path_factory, our_key):
    """sekmet with SMART Backend Services only; our client registered with its public JWK and scopes."""
    require(devservers.find_sekmet(), "sekmet executable not found in this virtualenv (pip install sekmet-fhir==0.1.1)")
    workdir = tmp_path_factory.mktemp("smart-fhir")
    server = devservers.start_fhir_server(workdir, extra_settings={"server_auth": {
        "types": ["smart"],
        "token_lifetime": 4,  # short, so renewal can be seen without waiting an hour
        "smart_clients": [{"client_id": CLIENT_ID, "jwks": {"keys": [public_jwk(our_key)]},
                           "scopes": "system/*.rs system/*.cu"}],
    }})
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def smart(server, key, *, client_id: str = CLIENT_ID, scope: str = "system/*.rs system/*.cu",
          token_url: str = "") -> SmartBackendAuth:
    config = SmartClientConfig(client_id=client_id, private_key=key, key_id=public_jwk(key)["kid"], scope=scope,
                               fhir_base_url=server.url, token_url=token_url, timeout_s=10)
    auth = SmartBackendAuth(config)
    _OPENED.append(auth)
    return auth


_OPENED: list[SmartBackendAuth] = []  # closed after each test (their token clients hold sockets)


@pytest.fixture(autouse=True)
def _close_token_clients():
    yield
    while _OPENED:
        _OPENED.pop().close()
    # One connection of the FHIR client in the SMART flow is dropped unclosed by httpx (not found why yet,
    # issue #19): collected here, quietly, so its ResourceWarning does not fail whichever test GC runs in.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_without_a_token_the_server_refuses(smart_fhir):
    client = FhirClient(smart_fhir.url, timeout_s=10)
    with pytest.raises(UpstreamRejectedError) as refused:
        client.search("Patient")
    client.close()
    assert refused.value.status_code == 401


def test_backend_services_token_is_obtained_once_and_reused(smart_fhir, our_key):
    auth = smart(smart_fhir, our_key)  # token endpoint discovered from .well-known/smart-configuration
    client = FhirClient(smart_fhir.url, timeout_s=10, auth=auth)
    created = client.create({"resourceType": "Patient", "name": [{"family": "Smart"}]})
    read, _ = client.read("Patient", created["id"])
    assert read["name"][0]["family"] == "Smart"
    assert any(p["id"] == created["id"] for p in client.search("Patient", {"_count": "50"}))
    assert auth.tokens_issued == 1
    assert auth.token_url() == f"{smart_fhir.root_url}/auth/token"
    client.close()


@pytest.mark.parametrize("alg_key", ["ES384"])
def test_es384_client_keys_work_too(tmp_path_factory, alg_key):
    require(devservers.find_sekmet(), "sekmet executable not found")
    key = ec.generate_private_key(ec.SECP384R1())
    workdir = tmp_path_factory.mktemp("smart-es384")
    server = devservers.start_fhir_server(workdir, extra_settings={"server_auth": {
        "types": ["smart"], "smart_clients": [{"client_id": "es-client", "jwks": {"keys": [public_jwk(key)]}}]}})
    try:
        client = FhirClient(server.url, timeout_s=10, auth=smart(server, key, client_id="es-client"))
        assert client.search("Patient") == []
        client.close()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_token_is_refreshed_when_it_nears_expiry(smart_fhir, our_key):
    auth = smart(smart_fhir, our_key)
    client = FhirClient(smart_fhir.url, timeout_s=10, auth=auth)
    client.search("Patient")
    first = auth.access_token()
    time.sleep(2.2)  # the server's tokens live 4 s; a short-lived token is renewed at half-life
    client.search("Patient")
    assert auth.tokens_issued == 2 and auth.access_token() != first
    client.close()


def test_a_rejected_token_is_replaced_once_and_the_request_repeated(smart_fhir, our_key):
    auth = smart(smart_fhir, our_key)
    client = FhirClient(smart_fhir.url, timeout_s=10, auth=auth)
    client.search("Patient")
    auth._token = AccessToken("revoked-or-forgotten", time.time(), time.time() + 3600)  # what a server restart does
    assert client.search("Patient", {"_count": "1"}) is not None
    assert auth.tokens_issued == 2
    client.close()


def test_scopes_are_enforced_by_the_server(smart_fhir, our_key):
    read_only = FhirClient(smart_fhir.url, timeout_s=10, auth=smart(smart_fhir, our_key, scope="system/*.rs"))
    assert read_only.search("Patient", {"_count": "1"}) is not None
    with pytest.raises(UpstreamRejectedError) as refused:
        read_only.create({"resourceType": "Patient"})
    assert refused.value.status_code == 403
    read_only.close()


def test_unknown_client_or_wrong_key_is_a_clear_permanent_error(smart_fhir, our_key):
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for auth in (smart(smart_fhir, our_key, client_id="nobody"), smart(smart_fhir, stranger)):
        client = FhirClient(smart_fhir.url, timeout_s=10, auth=auth)
        with pytest.raises(SmartAuthError, match="invalid_client"):
            client.search("Patient")
        client.close()


def test_unreachable_token_endpoint_is_transient(smart_fhir, our_key):
    dead = f"http://127.0.0.1:{devservers.free_port()}/auth/token"
    client = FhirClient(smart_fhir.url, timeout_s=10, auth=smart(smart_fhir, our_key, token_url=dead))
    with pytest.raises(UpstreamError, match="unreachable"):
        client.search("Patient")
    client.close()


def test_plain_http_token_endpoint_off_loopback_is_refused(smart_fhir, our_key):
    auth = smart(smart_fhir, our_key, token_url="http://auth.hospital.example/token")
    with pytest.raises(SmartAuthError, match="https"):
        auth.access_token()


def test_the_service_context_uses_smart_from_settings(smart_fhir, our_key, tmp_path):
    key_file = tmp_path / "cds-triage.pem"
    key_file.write_bytes(pem(our_key))
    settings = Settings(fhir_base_url=smart_fhir.url, data_dir=tmp_path, weights_dir=tmp_path / "w",
                        fhir_smart_client_id=CLIENT_ID, fhir_smart_private_key_file=str(key_file))
    context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=lambda _: None, model_set="m")
    for _ in range(3):  # one FhirClient per request, one token for all of them
        fhir = context.fhir()
        assert isinstance(fhir.search("Patient", {"_count": "1"}), list)
        fhir.close()
    assert isinstance(context.fhir_auth, SmartBackendAuth) and context.fhir_auth.tokens_issued == 1
    context.fhir_auth.close()
