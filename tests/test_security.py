"""Inbound CDS Hooks security with real tokens: ES384 and RS384 keys made at test time, signed
with PyJWT, checked by our service through Flask's test client. Every refusal is checked for
its status and its body (an OperationOutcome that says what is wrong). The JWKS-URL tests
serve the EHR's keys from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest

from cds_service.web.app import create_app
from cds_service.web.context import ServiceContext
from cds_devtools.devservers import free_port
from cds_service.jobs.sqlite_store import JobStore
from cds_service.adapters.security import KeyRing, ReplayCache, json_depth, parse_json_body
from cds_service.core.settings import Settings
from hook_client import EhrSigner, hook_request

PUBLIC = "http://127.0.0.1:8000"
DISCOVERY = f"{PUBLIC}/cds-services"
HOOK = f"{PUBLIC}/cds-services/imagingstudy-create"
EHR = EhrSigner()
INTRUDER = EhrSigner(issuer="https://intruder.example")  # its own keys, never trusted


def make_client(tmp_path: Path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_dir=tmp_path, weights_dir=tmp_path / "weights",
                        **(EHR.hook_settings(tmp_path / "jwks.json") | overrides))
    queued: list[str] = []
    context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=queued.append, model_set="m@1")
    client = create_app(settings, context).test_client()
    client.queued = queued
    return client


@pytest.fixture
def client(tmp_path):
    return make_client(tmp_path)


def study_call() -> dict:
    return hook_request("imagingstudy-create", {"patientId": "p1", "imagingStudyId": "s1"})


def refused(response, status: int, words: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.json
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == ("login" if status == 401 else "forbidden")
    assert words in body["issue"][0]["diagnostics"], body
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="cds-hooks"')


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_valid_tokens_of_both_algorithms_are_accepted(client, alg):
    assert client.get("/cds-services", headers=EHR.auth(DISCOVERY, alg=alg)).status_code == 200
    response = client.post("/cds-services/imagingstudy-create", json=study_call(), headers=EHR.auth(HOOK, alg=alg))
    assert response.status_code == 200 and response.json["cards"][0]["summary"] == "AI triage: analysis pending"
    assert len(client.queued) == 1


def test_aud_may_be_a_list_holding_our_url(client):
    assert client.get("/cds-services", headers=EHR.auth(["https://other.example/x", DISCOVERY])).status_code == 200


def test_missing_header_is_401(client):
    refused(client.get("/cds-services"), 401, "missing Authorization")
    refused(client.get("/cds-services", headers={"Authorization": "Basic dTpw"}), 401, "missing Authorization")
    refused(client.post("/cds-services/imagingstudy-create", json=study_call()), 401, "missing Authorization")
    assert client.queued == []


def test_expired_token_is_401(client):
    expired = EHR.token(DISCOVERY, claims={"exp": int(time.time()) - 120, "iat": int(time.time()) - 420})
    refused(client.get("/cds-services", headers={"Authorization": f"Bearer {expired}"}), 401, "expired")


def test_token_from_the_future_or_living_too_long_is_401(client):
    future = EHR.token(DISCOVERY, claims={"iat": int(time.time()) + 600, "exp": int(time.time()) + 900})
    refused(client.get("/cds-services", headers={"Authorization": f"Bearer {future}"}), 401, "issued in the future")
    long_lived = EHR.token(DISCOVERY, lifetime_s=24 * 3600)
    refused(client.get("/cds-services", headers={"Authorization": f"Bearer {long_lived}"}), 401, "lifetime too long")


def test_wrong_audience_is_403(client):
    refused(client.get("/cds-services", headers=EHR.auth("https://someone-else.example/cds-services")), 403, "aud")
    # a token for discovery is not a token for the hook
    refused(client.post("/cds-services/imagingstudy-create", json=study_call(), headers=EHR.auth(DISCOVERY)), 403, "aud")
    assert client.queued == []


def test_unknown_issuer_is_403_even_with_a_trusted_key(client):
    token = EHR.token(DISCOVERY, claims={"iss": "https://intruder.example"})
    refused(client.get("/cds-services", headers={"Authorization": f"Bearer {token}"}), 403, "not a trusted CDS client")


def test_unknown_kid_is_401(client):
    refused(client.get("/cds-services", headers=INTRUDER.auth(DISCOVERY, headers={"kid": "never-published"})), 401,
            "unknown signing key")
    # right kid name, wrong key: the signature does not verify
    refused(client.get("/cds-services", headers=INTRUDER.auth(DISCOVERY, claims={"iss": EHR.issuer},
                                                             headers={"kid": EHR.kid("ES384")})), 401, "signature")


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_alg_none_is_401(client):
    claims = jwt.decode(EHR.token(DISCOVERY), options={"verify_signature": False})
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': EHR.kid('ES384')})}.{_b64(claims)}."
    refused(client.get("/cds-services", headers={"Authorization": f"Bearer {unsigned}"}), 401, "alg 'none' is not accepted")


def test_hmac_is_401_even_with_the_public_key_as_secret(client):
    now = int(time.time())
    claims = {"iss": EHR.issuer, "aud": DISCOVERY, "exp": now + 60, "iat": now, "jti": "hs-1"}
    # the classic key-confusion attack: the EHR's *public* key used as an HMAC secret (signed by hand:
    # PyJWT itself refuses to do this)
    secret = json.dumps(EHR.jwks()["keys"][0]).encode()
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': EHR.kid('ES384')})}.{_b64(claims)}"
    signature = base64.urlsafe_b64encode(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()).rstrip(b"=")
    token = f"{signing_input}.{signature.decode()}"
    refused(client.get("/cds-services", headers={"Authorization": f"Bearer {token}"}), 401, "alg 'HS256' is not accepted")


def test_tampered_payload_is_401(client):
    header, payload, signature = EHR.token(DISCOVERY).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["tenant"] = "another-hospital"
    tampered = f"{header}.{_b64(claims)}.{signature}"
    refused(client.get("/cds-services", headers={"Authorization": f"Bearer {tampered}"}), 401, "signature does not verify")


def test_replayed_jti_is_401(client):
    token = EHR.token(HOOK)
    first = client.post("/cds-services/imagingstudy-create", json=study_call(), headers={"Authorization": f"Bearer {token}"})
    assert first.status_code == 200
    again = client.post("/cds-services/imagingstudy-create", json=study_call(), headers={"Authorization": f"Bearer {token}"})
    refused(again, 401, "already used")


def test_replay_cache_is_shared_through_sqlite(tmp_path):
    """Two gunicorn workers are two caches over one file: a replay to the other worker is still caught."""
    one, other = ReplayCache(tmp_path / "a.sqlite3"), ReplayCache(tmp_path / "a.sqlite3")
    now = time.time()
    assert one.first_use("iss", "jti-1", now + 60, now)
    assert not other.first_use("iss", "jti-1", now + 60, now)
    assert other.first_use("another-iss", "jti-1", now + 60, now)
    assert other.first_use("iss", "jti-1", now + 60, now + 3600)  # long expired entries are pruned


@pytest.mark.parametrize("header, words", [
    ({"typ": "at+jwt"}, "typ must be 'JWT'"),
    ({"kid": ""}, "no kid"),
])
def test_header_fields_are_required(client, header, words):
    refused(client.get("/cds-services", headers=EHR.auth(DISCOVERY, headers=header)), 401, words)


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "iat", "jti"])
def test_required_claims(client, claim):
    refused(client.get("/cds-services", headers=EHR.auth(DISCOVERY, drop=(claim,))), 401, repr(claim))


def test_jku_not_on_the_allow_list_is_403_and_never_fetched(client):
    refused(client.get("/cds-services", headers=EHR.auth(DISCOVERY, headers={"jku": "http://127.0.0.1:9/jwks.json"})),
            403, "allow-list")


# --- JWKS served over HTTP: allow-listed jku, caching, rotation ---------------------------------------


class JwksServer:
    """The EHR's JWKS endpoint on 127.0.0.1, counting how often it is fetched."""

    def __init__(self, jwks: dict) -> None:
        self.jwks, self.fetches = jwks, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.fetches += 1
                body = json.dumps(server.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server():
    server = JwksServer(EHR.jwks())
    yield server
    server.stop()


def test_allow_listed_jku_is_fetched_once_and_cached(tmp_path, jwks_server):
    client = make_client(tmp_path, cds_hooks_jwks_file="", cds_hooks_jku_allowlist=jwks_server.url)
    for alg in ("ES384", "RS384", "ES384"):
        response = client.get("/cds-services", headers=EHR.auth(DISCOVERY, alg=alg, headers={"jku": jwks_server.url}))
        assert response.status_code == 200
    # without jku the allow-listed URLs are the out-of-band key source
    assert client.get("/cds-services", headers=EHR.auth(DISCOVERY)).status_code == 200
    assert jwks_server.fetches == 1


def test_key_rotation_is_picked_up_without_restart(jwks_server):
    rotated = EhrSigner()  # the EHR's next keys, same kid names are NOT reused: new kids
    rotated.kid = lambda alg: f"ehr-2026-{alg.lower()}"  # type: ignore[method-assign]
    ring = KeyRing("", [jwks_server.url], cache_s=300)
    ring.clients[jwks_server.url].cooldown_duration = 0  # the production cooldown (30 s) would make this test wait
    assert ring.key_for(EHR.kid("ES384"), None) is not None
    assert ring.key_for(rotated.kid("ES384"), None) is None  # not published yet
    jwks_server.jwks = rotated.jwks()
    assert ring.key_for(rotated.kid("ES384"), jwks_server.url) is not None  # unseen kid: re-fetched
    assert jwks_server.fetches == 3


def test_unknown_kids_cannot_make_us_hammer_the_jwks_endpoint(jwks_server):
    ring = KeyRing("", [jwks_server.url], cache_s=300)
    for n in range(5):
        assert ring.key_for(f"bogus-{n}", None) is None
    assert jwks_server.fetches == 1  # one fetch, then the 30 s cooldown


def test_unreachable_allow_listed_jwks_is_503(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/jwks.json"
    client = make_client(tmp_path, cds_hooks_jwks_file="", cds_hooks_jku_allowlist=dead)
    response = client.get("/cds-services", headers=EHR.auth(DISCOVERY, headers={"jku": dead}))
    assert response.status_code == 503 and "could not be fetched" in response.json["issue"][0]["diagnostics"]


def test_jwks_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "keys.json"
    INTRUDER.write_jwks(path)
    ring = KeyRing(str(path), [], cache_s=300)
    assert ring.key_for(EHR.kid("ES384"), None).key.public_numbers() == INTRUDER.keys["ES384"].public_key().public_numbers()
    time.sleep(0.01)
    EHR.write_jwks(path)
    import os
    os.utime(path, (time.time() + 5, time.time() + 5))  # make sure the mtime moves even on coarse clocks
    assert ring.key_for(EHR.kid("ES384"), None).key.public_numbers() == EHR.keys["ES384"].public_key().public_numbers()


# --- limits ----------------------------------------------------------------------------------------


def test_rate_limit_per_client_answers_429(tmp_path):
    client = make_client(tmp_path, cds_hooks_rate_limit="3/minute")
    statuses = [client.get("/cds-services", headers=EHR.auth(DISCOVERY)).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    limited = client.get("/cds-services", headers=EHR.auth(DISCOVERY))
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert "too many" in limited.json["issue"][0]["diagnostics"]
    # another tenant of the same EHR has its own budget
    assert client.get("/cds-services", headers=EHR.auth(DISCOVERY, claims={"tenant": "other"})).status_code == 200


def test_deeply_nested_json_is_400(client):
    body = "[" * 200 + "]" * 200
    response = client.post("/cds-services/imagingstudy-create", data=body, content_type="application/json",
                           headers=EHR.auth(HOOK))
    assert response.status_code == 400 and "nested deeper" in response.json["issue"][0]["diagnostics"]
    very_deep = "[" * 100_000 + "]" * 100_000  # would blow Python's recursion limit
    response = client.post("/cds-services/imagingstudy-create", data=very_deep, content_type="application/json",
                           headers=EHR.auth(HOOK))
    assert response.status_code in (400, 413)


def test_json_depth():
    assert json_depth(1) == 0 and json_depth({}) == 1 and json_depth({"a": [{"b": 1}]}) == 3
    assert parse_json_body(b'{"a": [1]}', 2) == {"a": [1]}
    with pytest.raises(ValueError):
        parse_json_body(b'{"a": [[1]]}', 2)
    with pytest.raises(ValueError):
        parse_json_body(b"{nope", 10)


def test_oversized_hook_body_is_413(client):
    response = client.post("/cds-services/imagingstudy-create", data="x" * 3_000_000, content_type="application/json",
                           headers=EHR.auth(HOOK))
    assert response.status_code == 413


# --- CORS --------------------------------------------------------------------------------------------


def test_cors_only_for_configured_origins(tmp_path):
    client = make_client(tmp_path, cds_hooks_cors_origins="https://ehr-app.example, https://other.example")
    preflight = client.options("/cds-services/patient-view", headers={
        "Origin": "https://ehr-app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200  # no JWT on a preflight
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://ehr-app.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    ok = client.get("/cds-services", headers=EHR.auth(DISCOVERY) | {"Origin": "https://ehr-app.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://ehr-app.example"
    evil = client.get("/cds-services", headers=EHR.auth(DISCOVERY) | {"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in evil.headers
    assert "Access-Control-Allow-Origin" not in client.get("/healthz", headers={"Origin": "https://ehr-app.example"}).headers


def test_no_cors_headers_by_default(client):
    response = client.get("/cds-services", headers=EHR.auth(DISCOVERY) | {"Origin": "https://ehr-app.example"})
    assert response.status_code == 200 and "Access-Control-Allow-Origin" not in response.headers


# --- switching it off (development only) and secrets from files ---------------------------------------


def test_auth_off_works_on_loopback_only(tmp_path, caplog):
    client = make_client(tmp_path, cds_hooks_auth="off")
    assert "NOT authenticated" in caplog.text
    assert client.get("/cds-services").status_code == 200
    with pytest.raises(ValueError, match="loopback"):
        make_client(tmp_path / "public", cds_hooks_auth="off", public_url="https://triage.hospital.example",
                    worklist_auth="bearer", worklist_bearer_token="t")  # patient data closed: the hooks' own check speaks
    with pytest.raises(ValueError, match="jwt"):
        make_client(tmp_path / "typo", cds_hooks_auth="maybe")


def test_secrets_can_come_from_files_named_by_the_environment(tmp_path):
    secret = tmp_path / "subscription-secret"
    secret.write_text("from-a-file\n")
    settings = Settings.from_env({"CDS_SUBSCRIPTION_SECRET_FILE": str(secret), "CDS_HOOKS_ISSUERS": "a,b"})
    assert settings.subscription_secret == "from-a-file" and settings.cds_hooks_issuers == "a,b"
    assert Settings.from_env({"CDS_SUBSCRIPTION_SECRET": "env-wins", "CDS_SUBSCRIPTION_SECRET_FILE": str(secret)}).subscription_secret == "env-wins"


@pytest.mark.parametrize("claims", [{"iss": ["a", "b"]}, {"iss": {"x": 1}}, {"aud": [{"x": 1}]}])
def test_odd_iss_or_aud_types_are_a_401_not_a_500(client, claims):
    """Signed by a trusted key, but with claims of the wrong JSON type (PyJWT's encode refuses them,
    so the token is signed as raw JWS)."""
    import json as json_module
    import uuid

    import jwt as pyjwt

    now = int(time.time())
    payload = {"iss": EHR.issuer, "aud": DISCOVERY, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())} | claims
    token = pyjwt.api_jws.PyJWS().encode(json_module.dumps(payload).encode(), EHR.keys["ES384"], algorithm="ES384",
                                          headers={"kid": EHR.kid("ES384"), "typ": "JWT"})
    response = client.get("/cds-services", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401, response.get_data(as_text=True)
