"""What HAPI FHIR does differently from sekmet, and how the service copes: the unit-level half.

The other half runs against both real servers in tests/test_e2e.py (parametrized `[sekmet]` /
`[hapi]`). Here, without servers:

- a stale If-Match is a version conflict whether the server answers 412 (sekmet, the HTTP rule)
  or 409 Conflict (HAPI-0989);
- `/fhir-notify` answers a FHIR client (HAPI's rest-hook sends `Accept: application/fhir+json`)
  with an OperationOutcome as application/fhir+json: HAPI parses the answer as FHIR and counts a
  plain JSON body as a failed delivery, retried for a minute; a rest-hook DELETE is acknowledged;
- `cds-triage subscribe` waits until the server has activated the Subscription (HAPI: requested,
  then active, asynchronously) and says so;
- the HAPI version hapi-fhir-test/ builds is the one both compose files pin.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest
import yaml

import hapi_support
from cds_service import cli
from cds_service.adapters import subscribe
from cds_service.web.app import create_app
from cds_service.web.context import ServiceContext
from cds_service.core.errors import UpstreamRejectedError
from cds_service.adapters.fhir_client import FhirClient, VersionConflictError
from cds_service.jobs.sqlite_store import JobStore
from cds_service.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
#: The Accept header HAPI FHIR's rest-hook client sends with each notification (seen on 8.8.0).
HAPI_ACCEPT = "application/fhir+json;q=1.0, application/json+fhir;q=0.9"
SECRET = {"X-CDS-Subscription-Secret": "s3cret"}


def fhir_answering(status: int, body: dict | None = None) -> FhirClient:
    """A FhirClient whose server answers every request with `status` and `body`."""
    client = FhirClient("http://fhir.test/fhir")
    client.http = httpx.Client(base_url="http://fhir.test/fhir/", transport=httpx.MockTransport(
        lambda request: httpx.Response(status, json=body or {}, headers={"Content-Type": "application/fhir+json"})))
    return client


HAPI_0989 = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing", "diagnostics":
             "HAPI-0550: HAPI-0989: Trying to update ServiceRequest/sr-1/_history/1 but this is not the current version"}]}


@pytest.mark.parametrize("status", [409, 412])
def test_a_stale_if_match_is_a_version_conflict_on_either_status(status):
    fhir = fhir_answering(status, HAPI_0989 if status == 409 else None)
    with pytest.raises(VersionConflictError) as conflict:
        fhir.update({"resourceType": "ServiceRequest", "id": "sr-1"}, if_match="1")
    assert conflict.value.status_code == status
    assert f"answered {status}" in str(conflict.value)


def test_other_refusals_are_not_version_conflicts():
    with pytest.raises(UpstreamRejectedError) as refused:
        fhir_answering(400).update({"resourceType": "ServiceRequest", "id": "sr-1"}, if_match="1")
    assert not isinstance(refused.value, VersionConflictError)


# --- /fhir-notify as HAPI's rest-hook client calls it ---------------------------------------------


@pytest.fixture
def client(tmp_path):
    settings = Settings(operator_open_on_loopback=True, data_dir=tmp_path, weights_dir=tmp_path / "weights",
                        subscription_secret="s3cret")
    queued: list[str] = []
    context = ServiceContext(settings=settings, store=JobStore(settings.job_db_path), enqueue=queued.append, model_set="m@1")
    client = create_app(settings, context).test_client()
    client.queued = queued
    return client


def test_a_fhir_client_is_answered_with_an_operation_outcome(client):
    study = {"resourceType": "ImagingStudy", "id": "is-1", "status": "available"}
    response = client.put("/fhir-notify/ImagingStudy/is-1", data=json.dumps(study),
                          headers=SECRET | {"Accept": HAPI_ACCEPT, "Content-Type": "application/fhir+json"})
    assert response.status_code == 200 and response.mimetype == "application/fhir+json"
    outcome = response.json
    assert outcome["resourceType"] == "OperationOutcome" and set(outcome) == {"resourceType", "issue"}
    [issue] = outcome["issue"]
    assert issue["severity"] == "information" and issue["code"] == "informational"
    assert issue["diagnostics"].startswith("ImagingStudy/is-1: triage job ") and client.queued
    # the same notification again (HAPI re-delivers, or an update): the same job, nothing queued twice
    again = client.put("/fhir-notify/ImagingStudy/is-1", headers=SECRET | {"Accept": HAPI_ACCEPT})
    assert again.json["issue"][0]["diagnostics"] == issue["diagnostics"] and len(client.queued) == 1


def test_a_plain_json_caller_still_gets_the_jobs(client):
    response = client.put("/fhir-notify/ImagingStudy/is-2", headers=SECRET | {"Accept": "*/*"})
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.json["jobs"][0]["imagingStudy"] == "ImagingStudy/is-2"


def test_a_rest_hook_delete_is_acknowledged_and_queues_nothing(client):
    response = client.delete("/fhir-notify/ImagingStudy/is-3", headers=SECRET | {"Accept": HAPI_ACCEPT})
    assert response.status_code == 200 and response.mimetype == "application/fhir+json"
    assert response.json["resourceType"] == "OperationOutcome" and "deleted" in response.json["issue"][0]["diagnostics"]
    assert client.queued == []
    assert client.delete("/fhir-notify/ImagingStudy/is-3", headers={"X-CDS-Subscription-Secret": "no"}).status_code == 401
    assert client.delete("/fhir-notify/Patient/p-1", headers=SECRET).status_code == 400
    assert client.delete("/fhir-notify/ImagingStudy/..", headers=SECRET).status_code in (400, 404)
    assert client.queued == []


# --- cds-triage subscribe waits for `active` --------------------------------------------------------


class StatusSequence:
    """Stands in for the FHIR client of subscribe.py: Subscription/<id> reads through `statuses`."""

    def __init__(self, *statuses: str, error: str | None = None) -> None:
        self.statuses = list(statuses)
        self.error = error
        self.reads = 0

    def read(self, resource_type: str, resource_id: str):
        assert resource_type == "Subscription"
        status = self.statuses[min(self.reads, len(self.statuses) - 1)]
        self.reads += 1
        subscription = {"resourceType": "Subscription", "id": resource_id, "status": status}
        if self.error and status == "error":
            subscription["error"] = self.error
        return subscription, "1"

    def operation(self, path: str, params: dict[str, str]):
        """Like sekmet: no CodeSystem/$validate-code (404), so the AI label cannot be checked."""
        assert path == "CodeSystem/$validate-code" and params["code"] == "AIAST"
        raise UpstreamRejectedError("FHIR GET CodeSystem/$validate-code answered 404", 404, "")

    def close(self) -> None:
        pass


@pytest.fixture
def fake_fhir(monkeypatch):
    def install(fake: StatusSequence) -> StatusSequence:
        monkeypatch.setattr(subscribe, "fhir_client", lambda settings, auth: fake)
        monkeypatch.setattr(subscribe, "fhir_auth", lambda settings: None)
        return fake
    return install


def test_wait_until_active_polls_until_hapi_activates_it(fake_fhir):
    fake = fake_fhir(StatusSequence("requested", "requested", "active"))
    waited = subscribe.wait_until_active(Settings(), "1000", timeout_s=5, interval_s=0.01)
    assert fake.reads == 3 and 0 <= waited < 5


def test_wait_until_active_reports_an_error_status_with_the_servers_words(fake_fhir):
    fake_fhir(StatusSequence("requested", "error", error="endpoint refused the handshake"))
    with pytest.raises(subscribe.SubscriptionNotActiveError, match="'error': endpoint refused the handshake") as failed:
        subscribe.wait_until_active(Settings(), "1000", timeout_s=5, interval_s=0.01)
    assert failed.value.status == "error"


def test_wait_until_active_gives_up_after_the_timeout(fake_fhir):
    fake_fhir(StatusSequence("requested"))
    started = time.monotonic()
    with pytest.raises(subscribe.SubscriptionNotActiveError, match="still 'requested' after"):
        subscribe.wait_until_active(Settings(), "1000", timeout_s=0.2, interval_s=0.05)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("statuses, code, said", [
    (("requested", "active"), 0, "active: Subscription/1000"),
    (("requested", "off"), 1, "not active: Subscription/1000 is 'off'"),
])
def test_subscribe_command_waits_for_active_and_says_so(monkeypatch, fake_fhir, capsys, statuses, code, said):
    fake_fhir(StatusSequence(*statuses))
    monkeypatch.setattr(subscribe, "ensure_subscription", lambda settings, endpoint: ("1000", True))
    monkeypatch.setattr(subscribe.time, "sleep", lambda s: None)
    assert cli.main(["subscribe", "--endpoint", "http://127.0.0.1:8000/fhir-notify", "--wait", "30"]) == code
    out = capsys.readouterr()
    assert "created: Subscription/1000 → http://127.0.0.1:8000/fhir-notify" in out.out
    assert "waiting up to 30 s for the FHIR server to activate it" in out.out
    assert said in out.out + out.err
    assert ("AI security label http://terminology.hl7.org/CodeSystem/v3-ObservationValue|AIAST: could not check "
            "(CodeSystem/$validate-code answered 404)") in out.out


def test_subscribe_command_without_waiting(monkeypatch, fake_fhir, capsys):
    fake = fake_fhir(StatusSequence("requested"))
    monkeypatch.setattr(subscribe, "ensure_subscription", lambda settings, endpoint: ("1000", False))
    assert cli.main(["subscribe", "--wait", "0"]) == 0
    assert "already present: Subscription/1000" in capsys.readouterr().out and fake.reads == 0


# --- hapi-fhir-test/ --------------------------------------------------------------------------------


def test_the_hapi_version_built_is_the_one_both_compose_files_pin():
    version = hapi_support.hapi_version()
    images = {yaml.safe_load((ROOT / path).read_text())["services"]["hapi"]["image"]
              for path in ("hapi-fhir-test/compose.yaml", "docker/compose.yaml")}
    assert len(images) == 1, images
    [image] = images
    # the image's tag is the HAPI version and the starter's build number (v8.8.0-1)
    assert re.fullmatch(rf"hapiproject/hapi:v{re.escape(version)}(-\d+)?", image), (image, version)


def test_the_jar_is_rebuilt_only_when_a_source_is_newer(tmp_path, monkeypatch):
    pom, source = tmp_path / "pom.xml", tmp_path / "src" / "main" / "java" / "A.java"
    source.parent.mkdir(parents=True)
    jar = tmp_path / "target" / "hapi-fhir-test.jar"
    (tmp_path / "target" / "lib").mkdir(parents=True)
    for path in (pom, source, jar):
        path.write_text("x")
    monkeypatch.setattr(hapi_support, "HAPI_DIR", tmp_path)
    monkeypatch.setattr(hapi_support, "POM", pom)
    monkeypatch.setattr(hapi_support, "JAR", jar)
    monkeypatch.setattr(hapi_support, "TARGET", tmp_path / "target")
    now = time.time()
    os.utime(pom, (now - 20, now - 20))
    os.utime(source, (now - 20, now - 20))
    os.utime(jar, (now - 10, now - 10))
    assert hapi_support.jar_is_fresh()
    os.utime(source, (now, now))
    assert not hapi_support.jar_is_fresh()
    os.utime(jar, (now + 1, now + 1))
    assert hapi_support.jar_is_fresh()
    monkeypatch.setattr(hapi_support, "find_maven", lambda: "/nonexistent/mvn")
    assert hapi_support.build() == jar  # fresh: Maven is not even started


def test_missing_java_or_maven_is_named(monkeypatch):
    monkeypatch.setattr(hapi_support, "find_java", lambda: None)
    monkeypatch.setattr(hapi_support, "find_maven", lambda: "/usr/bin/mvn")
    assert hapi_support.missing_tools().startswith("java not found")
    monkeypatch.setattr(hapi_support, "find_maven", lambda: None)
    assert hapi_support.missing_tools().startswith("java and mvn not found")
