"""Patient data closed by default, proxies verified not believed, and the access log, on our real `serve`
over HTTP on loopback with the real FHIR server.

- `serve` and gunicorn refuse to listen on a network address while CDS_WORKLIST_AUTH=none (before binding:
  the addresses here are never bound), and the loopback demo keeps working, for direct calls only;
- proxy-header: only the configured proxy (the socket's peer; the tests connect from 127.0.0.2 as "the
  proxy" and from 127.0.0.1 as anyone else on the network) with its shared secret names the user;
- every view of a patient's data (worklist, study page, heatmap, CDS card) is in the access log with who,
  the hashed patient and when; `cds-triage audit` lists it by user or patient; old rows are pruned; the
  same on Redis.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
import subprocess
import sys
import time
from typing import Iterator

import httpx
import pytest

from access_support import REPO, order_with_ai_result, run_cli, start_serve
from cds_devtools.devservers import free_port
from cds_service.adapters.access_log import AccessRecorder, PhiView, RedisAccessLog, SqliteAccessLog, patient_key
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.settings import Settings
from hook_client import EhrSigner, hook_request

pytestmark = pytest.mark.integration

NOT_THIS_MACHINE = "192.0.2.10"  # TEST-NET-1: an address that is no one's, so nothing is ever bound to it
PROXY_ADDRESS = "127.0.0.2"  # the tests' "authenticating proxy": a loopback address other than 127.0.0.1
PROXY_SECRET = "proxy-secret-of-the-site"


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# --- closed by default ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["--host", "CDS_HOST"])
@pytest.mark.parametrize("host", [NOT_THIS_MACHINE, "0.0.0.0", "::"])
def test_serve_on_a_network_address_without_sign_in_refuses_to_start_naming_the_setting(host, how, tmp_path):
    port = str(free_port())
    args = ["serve", "--port", port] + (["--host", host] if how == "--host" else [])
    env = {"CDS_DATA_DIR": str(tmp_path)} | ({"CDS_HOST": host} if how == "CDS_HOST" else {})
    done = run_cli(*args, env=env, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_line(done.stderr)
    assert line.startswith(f"cds-triage serve: CDS_WORKLIST_AUTH=none would serve patient data without sign-in on {host}")


def test_with_sign_in_configured_serve_goes_on_to_listen(tmp_path):
    """The refusal is about CDS_WORKLIST_AUTH: with bearer it goes on (and here fails to bind an address that is no one's)."""
    done = run_cli("serve", "--host", NOT_THIS_MACHINE, "--port", str(free_port()), timeout=60,
                   env={"CDS_DATA_DIR": str(tmp_path), "CDS_WORKLIST_AUTH": "bearer", "CDS_WORKLIST_BEARER_TOKEN": "t"})
    assert done.returncode == 2 and "cannot listen on" in one_line(done.stderr), done.stderr


def test_gunicorn_with_our_config_refuses_a_network_bind_without_sign_in(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--config", str(REPO / "docker" / "gunicorn.conf.py"),
               "--bind", f"{NOT_THIS_MACHINE}:{port}", "cds_service.web.app:create_app()"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "CDS_DATA_DIR": str(tmp_path),
                               "CDS_HOST": "127.0.0.1", "WEB_CONCURRENCY": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"gunicorn: CDS_WORKLIST_AUTH=none would serve patient data without sign-in on {NOT_THIS_MACHINE}" in done.stderr


def test_the_opt_out_is_development_only_and_loud(caplog):
    from cds_service.web.access import exposure_problem

    assert exposure_problem(Settings(), ["127.0.0.1", "localhost", "::1", "unix:/run/cds.sock"]) is None
    assert "CDS_WORKLIST_AUTH=none" in exposure_problem(Settings(), ["0.0.0.0"])
    behind_a_proxy = exposure_problem(Settings(public_url="https://triage.hospital.example"), ["127.0.0.1"])
    assert behind_a_proxy and "on CDS_PUBLIC_URL=https://triage.hospital.example" in behind_a_proxy
    assert exposure_problem(Settings(worklist_auth="bearer", worklist_bearer_token="t"), ["0.0.0.0"]) is None
    with caplog.at_level("WARNING"):
        assert exposure_problem(Settings(worklist_open_to_network=True), ["0.0.0.0"]) is None
    assert "!!! CDS_WORKLIST_OPEN_TO_NETWORK=true" in caplog.text and "WITHOUT sign-in" in caplog.text


@pytest.fixture(scope="module")
def demo_service(fhir_server, tmp_path_factory) -> Iterator[Settings]:
    """The loopback demo's settings: CDS_WORKLIST_AUTH=none on 127.0.0.1."""
    root = tmp_path_factory.mktemp("demo-access")
    port = free_port()
    settings = Settings(fhir_base_url=fhir_server.url, public_url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port,
                        data_dir=root / "data", weights_dir=root / "weights", http_timeout_s=10)
    serve = start_serve(settings, root / "logs")
    yield settings
    serve.stop()


def test_the_loopback_demo_shows_patient_data_to_direct_calls_only(demo_service, fhir_server):
    fhir = FhirClient(fhir_server.url)
    try:
        ids = order_with_ai_result(fhir, "Dora Direct")
    finally:
        fhir.close()
    with httpx.Client(base_url=demo_service.public_url, timeout=30, trust_env=False) as browser:
        assert "Dora Direct" in browser.get("/worklist").text
        assert browser.get(f"/heatmaps/{ids['media']}.png").headers["Content-Type"] == "image/png"
        for header in ({"X-Forwarded-For": "203.0.113.7"}, {"X-Real-IP": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7"}):
            for path in ("/worklist", "/worklist/rows.json", f"/worklist/orders/{ids['order']}", f"/heatmaps/{ids['media']}.png"):
                relayed = browser.get(path, headers=header)
                assert relayed.status_code == 401, (path, header, relayed.text[:200])  # came through a proxy: not local
                assert "Dora" not in relayed.text


# --- proxy-header: believed from the trusted proxy only ------------------------------------------------------


@pytest.fixture(scope="module")
def proxied(fhir_server, tmp_path_factory) -> Iterator[tuple[Settings, dict[str, str], EhrSigner]]:
    """`serve` behind an authenticating proxy at 127.0.0.2 with a shared secret; an access log with a 400-day-old view."""
    root = tmp_path_factory.mktemp("proxied")
    port = free_port()
    ehr = EhrSigner()
    settings = Settings(fhir_base_url=fhir_server.url, public_url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port,
                        data_dir=root / "data", weights_dir=root / "weights", http_timeout_s=10,
                        worklist_auth="proxy-header", trusted_proxies=f"{PROXY_ADDRESS}/32", proxy_secret=PROXY_SECRET,
                        access_log_retention_days=365, subscription_secret="s", **ehr.hook_settings(root / "jwks.json"))
    old = time.time() - 400 * 86400
    SqliteAccessLog(settings.audit_db_path).record([PhiView("dr.long-gone", "study", patient_key("p-old"), {}, old)])
    fhir = FhirClient(fhir_server.url)
    try:
        ids = order_with_ai_result(fhir, "Petra Proxied")
    finally:
        fhir.close()
    serve = start_serve(settings, root / "logs")
    yield settings, ids, ehr
    serve.stop()


def through(settings: Settings, address: str) -> httpx.Client:
    """A client whose connections come from `address` (the peer address our service sees)."""
    return httpx.Client(base_url=settings.public_url, timeout=30, trust_env=False,
                        transport=httpx.HTTPTransport(local_address=address))


def test_the_proxy_header_is_believed_only_from_the_trusted_proxy_with_its_secret(proxied):
    settings, ids, _ = proxied
    user = {"X-Forwarded-User": "dr.mallory"}
    paths = ["/worklist", "/worklist/rows.json", f"/worklist/orders/{ids['order']}", f"/heatmaps/{ids['media']}.png"]
    with through(settings, "127.0.0.1") as anyone:  # reaches the port directly, names itself, claims to be the proxy
        for path in paths:
            for headers in (user, user | {"X-Forwarded-For": PROXY_ADDRESS}, user | {"X-CDS-Proxy-Secret": PROXY_SECRET}):
                refused = anyone.get(path, headers=headers)
                assert refused.status_code == 401, (path, headers, refused.text[:300])
                assert "Petra" not in refused.text and "did not come through" in refused.json()["issue"][0]["diagnostics"]
    with through(settings, PROXY_ADDRESS) as proxy:
        no_secret = proxy.get("/worklist/rows.json", headers=user)
        wrong_secret = proxy.get("/worklist/rows.json", headers=user | {"X-CDS-Proxy-Secret": "guess"})
        for refused in (no_secret, wrong_secret):
            assert refused.status_code == 401 and "shared secret" in refused.text, refused.text[:300]
        no_user = proxy.get("/worklist/rows.json", headers={"X-CDS-Proxy-Secret": PROXY_SECRET})
        assert no_user.status_code == 401 and "X-Forwarded-User" in no_user.text
        shown = proxy.get("/worklist/rows.json", headers=user | {"X-CDS-Proxy-Secret": PROXY_SECRET})
        assert shown.status_code == 200 and "Petra Proxied" in shown.text


def test_every_view_of_patient_data_is_in_the_access_log_and_audit_lists_it(proxied):
    settings, ids, ehr = proxied
    signed = {"X-Forwarded-User": "dr.alice", "X-CDS-Proxy-Secret": PROXY_SECRET}
    started = time.time()
    with through(settings, PROXY_ADDRESS) as proxy:
        assert proxy.get("/worklist", headers=signed).status_code == 200
        assert proxy.get("/worklist/rows.json", headers=signed).status_code == 200  # within 15 min: not again
        assert proxy.get(f"/worklist/orders/{ids['order']}", headers=signed).status_code == 200
        assert proxy.get(f"/heatmaps/{ids['media']}.png", headers=signed).status_code == 200
        assert proxy.get(f"/heatmaps/{ids['media']}.png", headers={**signed, "X-Forwarded-User": "dr.bob"}).status_code == 200
    hook_url = f"{settings.public_url}/cds-services/imagingstudy-create"
    body = hook_request("imagingstudy-create", {"patientId": ids["patient"], "imagingStudyId": ids["study"],
                                                "userId": "Practitioner/dr-carol"})
    with httpx.Client(timeout=30, trust_env=False) as ehr_client:
        card = ehr_client.post(hook_url, json=body, headers=ehr.auth(hook_url))
    assert card.status_code == 200 and card.json()["cards"], card.text

    patient = patient_key(ids["patient"])
    since = datetime.fromtimestamp(started, timezone.utc).isoformat()
    done = run_cli("audit", "--patient", f"Patient/{ids['patient']}", "--since", since, "--json", settings=settings)
    assert done.returncode == 0, done.stderr
    views = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(v["patient"] == patient and v["at"] >= started for v in views), views
    seen = sorted((v["who"], v["view"]) for v in views)
    assert seen == sorted([
        ("dr.alice", "worklist"), ("dr.alice", "study"), ("dr.alice", "heatmap"), ("dr.bob", "heatmap"),
        (f"{ehr.issuer} (tenant {patient_key('test-hospital')}) for Practitioner/dr-carol", "cds-card:imagingstudy-create"),
    ]), seen
    assert ids["patient"] not in done.stdout and "Petra" not in done.stdout  # hashed, never the id or the name
    assert all(v["detail"]["auth"] == "proxy-header" for v in views if v["who"].startswith("dr."))

    by_user = run_cli("audit", "--user", "dr.alice", settings=settings)
    assert by_user.returncode == 0, by_user.stderr
    lines = by_user.stdout.splitlines()
    assert lines[0].split()[:5] == ["WHEN", "(UTC)", "WHO", "VIEW", "PATIENT"]
    assert {line.split()[2] for line in lines[1:] if patient in line} == {"worklist", "study", "heatmap"}
    assert all(line.split()[1] == "dr.alice" for line in lines[1:])


def test_views_older_than_the_retention_are_pruned(proxied):
    settings, _, _ = proxied  # the first view recorded by `serve` pruned the view of 400 days ago (365 kept)
    with through(settings, PROXY_ADDRESS) as proxy:
        assert proxy.get("/worklist/rows.json", headers={"X-Forwarded-User": "dr.dave",
                                                         "X-CDS-Proxy-Secret": PROXY_SECRET}).status_code == 200
    done = run_cli("audit", "--user", "dr.long-gone", "--json", settings=settings)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr
    assert run_cli("audit", "--user", "dr.dave", "--json", settings=settings).stdout.strip()


# --- the same log on Redis ----------------------------------------------------------------------------------------


def test_the_access_log_on_redis_records_lists_and_prunes(redis_url, tmp_path):
    settings = Settings(queue_url=redis_url, data_dir=tmp_path)
    store = RedisAccessLog(redis_url, key=f"test:phi-view:{time.time_ns()}")
    store.record([PhiView("dr.old", "study", patient_key("p-1"), {}, time.time() - 400 * 86400)])
    assert [v.who for v in store.views()] == ["dr.old"]
    clock = [time.time()]
    recorder = AccessRecorder(store, retention_days=365, clock=lambda: clock[0])
    recorder.listed("dr.eve", ["p-1", "Patient/p-2", "p-1"])  # the first write prunes what is older than 365 days
    clock[0] += 1
    recorder.listed("dr.eve", ["p-1", "p-2"])  # within the interval: not again
    recorder.viewed("dr.eve", "heatmap", "p-2")
    assert sorted((v.who, v.view, v.patient) for v in store.views()) == sorted([
        ("dr.eve", "worklist", patient_key("p-1")), ("dr.eve", "worklist", patient_key("p-2")),
        ("dr.eve", "heatmap", patient_key("p-2"))])
    clock[0] += 15 * 60  # the interval passed: listed again
    recorder.listed("dr.eve", ["p-2"])
    assert [v.view for v in store.views(who="dr.eve", patient=patient_key("p-2"))] == ["worklist", "heatmap", "worklist"]
    assert store.views(who="dr.old") == []

    # `cds-triage audit` reads the log where the job store is (CDS_QUEUE_URL=redis://…)
    default = RedisAccessLog(redis_url)
    default.record([PhiView("dr.frank", "key-image", patient_key("p-9"), {"auth": "oidc"})])
    done = run_cli("audit", "--patient", "p-9", "--json", settings=settings)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["who"] for line in done.stdout.splitlines()] == ["dr.frank"]


def test_audit_says_in_one_line_when_the_log_cannot_be_read(tmp_path):
    done = run_cli("audit", env={"CDS_QUEUE_URL": f"redis://127.0.0.1:{free_port()}/0", "CDS_DATA_DIR": str(tmp_path),
                                 "CDS_HTTP_TIMEOUT_S": "2"})
    assert done.returncode == 2 and "access log unavailable" in one_line(done.stderr) and "CDS_QUEUE_URL" in done.stderr

