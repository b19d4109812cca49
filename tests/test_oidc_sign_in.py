"""Per-user sign-in with OpenID Connect (CDS_WORKLIST_AUTH=oidc), against a real provider through a real browser.

The provider is panva/oidc-provider (npm, tests/oidc_provider/), started on 127.0.0.1 with our service
registered as a client; the browser is Debian's Chromium driven by Playwright, as in test_browser.py. Our
`serve` and a worker triage a head CT stored in the real Orthanc and ordered in the real FHIR server, so the
study page has a key image and a heatmap. The test signs in as a radiologist at the provider's own login
page and looks, then checks what must be refused: a user without the required group, a replayed or forged
callback, an ID token that expired (the provider's token endpoint issuing with its clock two hours behind),
a provider that names another issuer, a session past its lifetime, a session cookie after sign-out.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from access_support import run_cli, start_serve
from browser_support import launched_chromium
from cds_devtools.demo import start_service
from cds_devtools.devservers import free_port
from cds_service.adapters.access_log import patient_key
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.domain import Task
from cds_service.core.settings import Settings
from fhir_mappings.conventions import Conventions
from hook_client import EhrSigner, hook_request
from oidc_support import OidcProvider, client, start_provider
from stack_support import NOTIFY_HEADERS, SECRET, ct_series, order_study, wait_until
from support import make_test_weights

pytestmark = pytest.mark.integration

ACCOUNTS = {"dr.grey": {"name": "Meredith Grey", "groups": ["radiologist", "staff"]},
            "dr.nogroup": {"name": "Nora Nogroup", "groups": ["cardiology"]}}
SESSION_SECRET = "a-long-random-session-secret-for-the-tests-only"
COOKIE = "cds-triage-session"  # on http://127.0.0.1; __Host-cds-triage with an https CDS_PUBLIC_URL


def oidc_settings(port: int, provider: OidcProvider, root: Path, **more: Any) -> Settings:
    return Settings(public_url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port, data_dir=root / "data",
                    weights_dir=root / "weights", http_timeout_s=10, worklist_auth="oidc", oidc_issuer=provider.issuer,
                    oidc_client_id=f"cds-triage-{port}", oidc_client_secret=f"secret-{port}",
                    oidc_scopes="openid profile email groups", oidc_required_group="radiologist",
                    oidc_session_secret=SESSION_SECRET, **more)


@pytest.fixture(scope="module")
def stack(orthanc, fhir_server, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The provider (with two of our services as clients), `serve` + worker with a triaged head CT, and a second
    `serve` whose sessions last 4 seconds."""
    root = tmp_path_factory.mktemp("oidc")
    port, short_port = free_port(), free_port()
    clients = [client(f"cds-triage-{p}", f"secret-{p}", f"http://127.0.0.1:{p}") for p in (port, short_port)]
    provider = start_provider(root / "logs", clients, ACCOUNTS)
    started: list[Any] = [provider]
    try:
        weights = make_test_weights(root / "weights", Task.HEAD_CT_ICH)
        ehr = EhrSigner()
        settings = oidc_settings(port, provider, root, fhir_base_url=fhir_server.url, dicomweb_url=orthanc.dicomweb_url,
                                 subscription_secret=SECRET, operator_token="op-token", job_retries=2,
                                 job_retry_delay_s=0.2, **ehr.hook_settings(root / "jwks.json"))
        assert settings.weights_dir == weights
        started.append(start_service(settings, root / "logs"))
        short = oidc_settings(short_port, provider, root / "short", fhir_base_url=fhir_server.url,
                              oidc_session_lifetime_s=4)
        started.append(start_serve(short, root / "short-logs"))

        fhir = FhirClient(fhir_server.url)
        ids = order_study(fhir, ct_series(3, seed=7), orthanc_url=orthanc.url)
        fhir.close()
        with httpx.Client(base_url=settings.public_url, timeout=30, trust_env=False,
                          headers={"Authorization": "Bearer op-token"}) as api:
            assert api.put(f"/fhir-notify/ImagingStudy/{ids['study']}", headers=NOTIFY_HEADERS).status_code == 200
            job = wait_until(lambda: next((j for j in api.get("/jobs", params={"imagingStudy": ids["study"]}).json()["jobs"]
                                           if j["status"] in ("done", "failed")), None), 240, "the head CT's triage")
        assert job["status"] == "done" and job["result"]["written"].get("Media"), job
        yield {"provider": provider, "settings": settings, "short": short, "ids": ids, "ehr": ehr}
    finally:
        for thing in reversed(started):
            thing.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launched_chromium()


class Visit:
    """A browser context that reaches 127.0.0.1 only (the provider's login page asks for a web font: refused),
    and remembers the requests it made."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(locale="en-GB", timezone_id="UTC")
        self.context.route("**/*", lambda route: route.continue_() if urlsplit(route.request.url).hostname == "127.0.0.1"
                           else route.abort())
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))

    def sign_in(self, provider: OidcProvider, user: str) -> None:
        """At the provider's login form (the page must be there), then its consent page."""
        page = self.page
        page.wait_for_url(re.compile(re.escape(provider.url) + r"/interaction/"), timeout=30_000)
        page.fill("input[name=login]", user)
        page.fill("input[name=password]", "not checked by the test provider")
        with page.expect_navigation(timeout=30_000):
            page.click("button[type=submit]")
        if page.url.startswith(provider.url + "/interaction/"):  # consent: share the scopes with our service
            with page.expect_navigation(timeout=30_000):
                page.click("button[type=submit]")

    def signed_in(self, service: Settings, provider: OidcProvider, user: str = "dr.grey") -> dict[str, Any] | None:
        """Open the worklist, sign in, be back there; the session cookie."""
        self.page.goto(f"{service.public_url}/worklist")
        self.sign_in(provider, user)
        self.page.wait_for_url(f"{service.public_url}/worklist", timeout=30_000)
        return self.session_cookie()

    def refused(self, service: Settings, provider: OidcProvider, user: str = "dr.grey") -> str:
        """Open the worklist, sign in, be refused at our callback; the message shown."""
        self.page.goto(f"{service.public_url}/worklist")
        self.sign_in(provider, user)
        self.page.wait_for_url(re.compile(re.escape(service.public_url) + "/auth/callback"), timeout=30_000)
        assert self.page.evaluate("document.title").startswith("Sign-in failed")
        return self.page.inner_text("#sign-in-message")

    def callbacks(self, service: Settings) -> list[str]:
        return [url for url in self.requests if url.startswith(f"{service.public_url}/auth/callback")]

    def session_cookie(self) -> dict[str, Any] | None:
        return next((c for c in self.context.cookies() if c["name"] == COOKIE), None)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser) -> Iterator[Visit]:
    v = Visit(browser)
    yield v
    v.close()


def audit(settings: Settings, *args: str) -> list[dict[str, Any]]:
    done = run_cli("audit", "--json", "--limit", "1000", *args, settings=settings)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def rows_with(cookie: dict[str, Any] | None, settings: Settings) -> httpx.Response:
    """/worklist/rows.json with (a copy of) a browser's session cookie, from another client."""
    cookies = {cookie["name"]: cookie["value"]} if cookie else {}
    with httpx.Client(base_url=settings.public_url, cookies=cookies, timeout=30, trust_env=False) as other:
        return other.get("/worklist/rows.json", headers={"Accept": "application/json"})


# --- the radiologist's day -----------------------------------------------------------------------------------


def test_a_radiologist_signs_in_at_the_provider_and_sees_the_study_the_link_named(stack, visit):
    settings, provider, ids = stack["settings"], stack["provider"], stack["ids"]
    started = time.time()
    study_url = f"{settings.public_url}/worklist/orders/{ids['order']}"
    visit.page.goto(study_url)  # a deep link (from the EHR, a card): first to the provider
    authorize = next(url for url in visit.requests if url.startswith(f"{provider.url}/auth?"))
    query = parse_qs(urlsplit(authorize).query)
    assert query["response_type"] == ["code"] and query["client_id"] == [settings.oidc_client_id]
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) >= 43  # PKCE
    assert len(query["state"][0]) >= 20 and len(query["nonce"][0]) >= 20
    assert "code_verifier" not in authorize and query["redirect_uri"] == [f"{settings.public_url}/auth/callback"]

    visit.sign_in(provider, "dr.grey")
    visit.page.wait_for_url(study_url, timeout=30_000)  # back where the link pointed
    visit.page.wait_for_function("document.getElementById('key-image').naturalWidth > 0 && "
                                 "document.getElementById('overlay').naturalWidth > 0", timeout=30_000)
    assert visit.page.inner_text("#signed-in-as") == "dr.grey"
    cookie = visit.session_cookie()
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert cookie["secure"] is False  # http://127.0.0.1 (tests, development); Secure and __Host- with https
    assert SESSION_SECRET not in cookie["value"] and "dr.grey" not in cookie["value"]  # only a session id, signed

    visit.page.goto(f"{settings.public_url}/worklist")
    visit.page.wait_for_selector(f'tr[data-order="{ids["order"]}"]')
    assert rows_with(cookie, settings).status_code == 200  # the cookie is the session (until sign-out)

    views = [v for v in audit(settings, "--user", "dr.grey") if v["at"] >= started]
    patient = patient_key(ids["patient"])
    assert {(v["view"], v["patient"]) for v in views} >= {("sign-in", ""), ("study", patient), ("key-image", patient),
                                                          ("heatmap", patient), ("worklist", patient)}, views
    assert all(v["detail"]["auth"] == "oidc" for v in views)


def test_the_heatmap_link_a_cds_card_hands_out_needs_a_sign_in(stack, visit):
    settings, provider, ids, ehr = stack["settings"], stack["provider"], stack["ids"], stack["ehr"]
    fhir = FhirClient(settings.fhir_base_url)
    try:  # the prefetch an EHR sends to patient-view: our reports of the patient with their Observations
        reports = fhir.search("DiagnosticReport", {"patient": ids["patient"], "identifier": f"{Conventions.from_settings(settings).result_identifier_system}|",
                                                   "_include": "DiagnosticReport:result"})
    finally:
        fhir.close()
    hook = f"{settings.public_url}/cds-services/patient-view"
    body = hook_request("patient-view", {"patientId": ids["patient"], "userId": "Practitioner/dr-who"},
                        prefetch={"aiReports": {"resourceType": "Bundle", "type": "searchset",
                                                "entry": [{"resource": r} for r in reports]}})
    with httpx.Client(timeout=30, trust_env=False) as ehr_client:
        answer = ehr_client.post(hook, json=body, headers=ehr.auth(hook))
    assert answer.status_code == 200, answer.text
    links = [link["url"] for card in answer.json()["cards"] for link in card.get("links", [])]
    heatmap = next(url for url in links if "/heatmaps/" in url)
    assert heatmap.startswith(f"{settings.public_url}/heatmaps/")

    with httpx.Client(timeout=30, trust_env=False) as anyone:
        anonymous = anyone.get(heatmap)
    assert anonymous.status_code == 302 and anonymous.headers["Location"].startswith("/auth/login?next=/heatmaps/")
    assert not anonymous.content.startswith(b"\x89PNG")
    shown = visit.page.goto(heatmap)  # an EHR user clicks it: signs in, then sees it
    visit.sign_in(provider, "dr.grey")
    visit.page.wait_for_url(heatmap, timeout=30_000)
    shown = visit.page.goto(heatmap)
    assert shown.status == 200 and shown.headers["content-type"] == "image/png"
    cards = [v for v in audit(settings, "--patient", ids["patient"]) if v["view"] == "cds-card:patient-view"]
    assert cards and cards[0]["who"].endswith("for Practitioner/dr-who"), cards


def test_sign_out_ends_the_session_here_and_at_the_provider(stack, visit):
    settings, provider = stack["settings"], stack["provider"]
    cookie = visit.signed_in(settings, provider)
    assert rows_with(cookie, settings).status_code == 200

    visit.page.click("#sign-out")
    visit.page.wait_for_url(re.compile(re.escape(provider.url) + "/session/end"), timeout=30_000)
    visit.page.click("button[value=yes]")  # the provider asks: sign out there too
    visit.page.wait_for_url(re.compile(re.escape(f"{settings.public_url}/auth/signed-out")), timeout=30_000)
    assert "You are signed out" in visit.page.inner_text("#sign-in-message")
    copied = rows_with(cookie, settings)  # the cookie as it was before: its session is gone
    assert copied.status_code == 401 and "not signed in" in copied.text
    visit.page.goto(f"{settings.public_url}/worklist")  # and the provider asks for the password again
    visit.page.wait_for_url(re.compile(re.escape(provider.url) + r"/interaction/"), timeout=30_000)
    assert visit.page.locator("input[name=password]").count() == 1
    assert any(v["view"] == "sign-out" for v in audit(settings, "--user", "dr.grey"))


def test_a_session_ends_after_its_lifetime(stack, visit):
    short, provider = stack["short"], stack["provider"]
    cookie = visit.signed_in(short, provider)
    assert rows_with(cookie, short).status_code == 200
    time.sleep(short.oidc_session_lifetime_s + 1)
    assert rows_with(cookie, short).status_code == 401
    assert len(visit.callbacks(short)) == 1
    visit.page.goto(f"{short.public_url}/worklist")  # sent to sign in again (the provider's own session still holds)
    visit.page.wait_for_url(f"{short.public_url}/worklist", timeout=30_000)
    assert len(visit.callbacks(short)) == 2 and visit.session_cookie()["value"] != cookie["value"]


# --- what is refused ---------------------------------------------------------------------------------------------


def test_a_user_without_the_required_group_is_refused(stack, visit):
    settings, provider = stack["settings"], stack["provider"]
    message = visit.refused(settings, provider, "dr.nogroup")
    assert "dr.nogroup" in message and "'radiologist'" in message and "CDS_OIDC_REQUIRED_GROUP" in message
    assert rows_with(visit.session_cookie(), settings).status_code == 401
    refused = audit(settings, "--user", "dr.nogroup")
    assert [v["view"] for v in refused] == ["sign-in-refused"] and not any(v["view"] == "sign-in" for v in refused)


def test_a_replayed_or_forged_callback_is_refused(stack, visit, browser):
    settings, provider = stack["settings"], stack["provider"]
    visit.signed_in(settings, provider)
    [callback] = visit.callbacks(settings)
    again = visit.page.goto(callback)  # the same state (and code) a second time, in the same browser
    assert again.status == 400 and "already used" in visit.page.inner_text("#sign-in-message")
    other = Visit(browser)
    try:  # someone else's browser with the captured callback URL
        stolen = other.page.goto(callback)
        assert stolen.status == 400 and other.session_cookie() is None
        forged = other.page.goto(re.sub(r"state=[^&]+", f"state={uuid.uuid4().hex}", callback))
        assert forged.status == 400
        assert rows_with(other.session_cookie(), settings).status_code == 401
    finally:
        other.close()


def test_an_expired_id_token_is_refused(stack, visit):
    settings, provider = stack["settings"], stack["provider"]
    provider.set_clock_skew(-7200)  # its token endpoint issues ID tokens that expired an hour ago
    try:
        message = visit.refused(settings, provider)
    finally:
        provider.set_clock_skew(0)
    assert "ID token was refused" in message and "expired" in message.lower(), message
    assert rows_with(visit.session_cookie(), settings).status_code == 401


def test_a_provider_that_names_another_issuer_is_refused(stack, visit, tmp_path):
    """A provider whose discovery document (and so its tokens) names another issuer than CDS_OIDC_ISSUER."""
    port = free_port()
    impostor_port = free_port()
    impostor = start_provider(tmp_path / "logs", [client(f"cds-triage-{port}", f"secret-{port}", f"http://127.0.0.1:{port}")],
                              ACCOUNTS, port=impostor_port, issuer=f"http://127.0.0.1:{impostor_port}/realms/other")
    try:
        configured = OidcProvider(impostor.process, impostor_port, f"http://127.0.0.1:{impostor_port}")
        settings = oidc_settings(port, configured, tmp_path, fhir_base_url=stack["settings"].fhir_base_url)
        serve = start_serve(settings, tmp_path / "logs")
        try:
            shown = visit.page.goto(f"{settings.public_url}/worklist")
            assert urlsplit(visit.page.url).netloc == f"127.0.0.1:{port}"  # never sent to that provider
            assert shown.status == 502
            message = visit.page.inner_text("#sign-in-message")
            assert f"issuer is 'http://127.0.0.1:{impostor_port}/realms/other'" in message and "CDS_OIDC_ISSUER" in message
            assert not any(url.startswith(f"{impostor.url}/auth") for url in visit.requests)
        finally:
            serve.stop()
    finally:
        impostor.stop()


def test_https_public_url_makes_the_cookie_secure_with_the_host_prefix(tmp_path):
    from cds_service.jobs.sqlite_store import JobStore
    from cds_service.web.app import create_app
    from cds_service.web.context import ServiceContext

    settings = Settings(data_dir=tmp_path, weights_dir=tmp_path, worklist_auth="oidc", public_url="https://triage.example",
                        oidc_issuer="https://idp.example/realms/hospital", oidc_client_id="c",
                        oidc_session_secret=SESSION_SECRET)
    context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=lambda _: None, model_set="m")
    app = create_app(settings, context)
    assert app.config["SESSION_COOKIE_SECURE"] is True and app.config["SESSION_COOKIE_NAME"] == "__Host-cds-triage"
    assert app.config["SESSION_COOKIE_HTTPONLY"] is True and app.config["SESSION_COOKIE_SAMESITE"] == "Lax"
    page = app.test_client().get("/worklist", headers={"Accept": "text/html"})
    assert page.status_code == 302 and page.headers["Location"] == "/auth/login?next=/worklist"
    api = app.test_client().get("/worklist/rows.json", headers={"Accept": "application/json"})
    assert api.status_code == 401 and api.json["issue"][0]["code"] == "login"
