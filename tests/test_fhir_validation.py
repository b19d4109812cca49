"""Every resource type we write, sent to a validating HAPI FHIR's `$validate`: zero errors.

The server is the strict one (tests/strict_hapi_support.py): HAPI FHIR's instance validator with
current HL7 Terminology and our own package (`cds-triage fhir-package`) loaded, request validation on.
Each resource declares our profile (meta.profile), so it is checked against R4 core and our profile
alike. Warnings are allowed only where docs/fhir.md lists and justifies them (KNOWN_WARNINGS, by id).

Also here, without a server: the package itself (every local code with its display, a profile per
resource type we write, the canonical base followed by every URL).
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import Finding, Heatmap, ModelRef, OrderContext, Priority, Task, TaskMode, TriageResult, TriageStatus
from cds_service.core.settings import Settings
from fhir_mappings import codes
from fhir_mappings.builders import build_subscription, build_triage_transaction, with_priority
from fhir_mappings.conventions import Conventions
from fhir_mappings.definitions import package_files
from fhir_mappings.imaging_study import build_imaging_study, build_patient_from_dicom
from test_fhir_mappings import brain_result, ctx, ich_result, tiny_png

ROOT = Path(__file__).resolve().parents[1]
ISSUED = datetime(2025, 3, 14, 9, 26, 53, tzinfo=timezone.utc)

#: The warnings HAPI may give on what we write, each listed and justified in docs/fhir.md under its id.
KNOWN_WARNINGS = {
    "W1-performer": (("Observation",), "all observations should have a performer"),
    "W2-loinc": (("DiagnosticReport",), "http://loinc.org"),
    "W3-radlex": (("Observation", "DiagnosticReport"), "CodeSystem is unknown and can't be validated: http://radlex.org"),
    "W4-no-effective": (("Observation",), "all observations should have an effective[x]"),
    "W5-order-narrative": (("ServiceRequest",), "dom-6"),
    "W6-dicom-valuesets": (("ImagingStudy",), "ValueSet 'http://dicom.nema.org/"),
}


def pneumothorax_result(**changes: Any) -> TriageResult:
    finding = Finding("pneumothorax", 0.88, True, 0.42, threshold_source="site thresholds 2025-03 (CDS_SITE_THRESHOLDS)")
    result = TriageResult("1.2.3.4.6", TriageStatus.DONE, Task.CHEST_PNEUMOTHORAX, findings=(finding,),
                          suggested_priority=Priority.STAT, model=ModelRef("chest_pneumothorax", "0.2.0"),
                          heatmap=Heatmap(tiny_png(), "pneumothorax", 4, 3, slice_index=0, sop_instance_uid="1.2.3.4.6.1.1"))
    return replace(result, **changes)


def written_resources() -> list[tuple[str, dict[str, Any]]]:
    """(what, resource) for every kind of resource the service writes, in each of its variants."""
    out: list[tuple[str, dict[str, Any]]] = []
    cases = [
        ("head CT, active, heatmap", ctx(), ich_result(), "2025-03-14T08:55:00+01:00"),
        ("brain MRI, several positives and a 'no tumor' label, no heatmap", ctx(study_uid="1.2.3.4.5"), brain_result(), "2025-03-14"),
        ("chest X-ray, shadow mode, site threshold", ctx(study_uid="1.2.3.4.6"), pneumothorax_result(mode=TaskMode.SHADOW), None),
    ]
    for what, order, result, effective in cases:
        bundle = build_triage_transaction(order, result, issued=ISSUED, effective=effective,
                                          worklist_url="https://cds.hospital.example/worklist")
        for entry in bundle.model_dump(mode="json", exclude_none=True)["entry"]:
            out.append((what, entry["resource"]))
    order = {"resourceType": "ServiceRequest", "id": "sr-1", "status": "active", "intent": "order", "priority": "routine",
             "subject": {"reference": "Patient/pat-1"}, "code": {"text": "CT head without contrast"}}
    out.append(("order raised by the AI", with_priority(order, Priority.STAT, note="Priority raised from routine to stat by "
                                                       "AI triage (any 93%; head_ct_ich 1.2.0). AI-generated, preliminary, not a diagnosis.")))
    out.append(("our Subscription", build_subscription("https://cds.hospital.example/fhir-notify", header_secret="s3cret")
                .model_dump(mode="json", exclude_none=True)))
    slices = [make_dataset(np.zeros((8, 8), np.uint16), modality="CT", body_part="HEAD", series_description="CT HEAD WO",
                           patient_birth_date="19600101", patient_sex="F", study_uid="1.2.3.9", series_uid="1.2.3.9.1",
                           instance_number=i + 1) for i in range(2)]
    for ds in slices:
        ds.StudyDate, ds.StudyTime, ds.TimezoneOffsetFromUTC = "20250314", "085500", "+0100"
    out.append(("ImagingStudy of the PACS-side trigger", build_imaging_study(slices, patient_id="pat-1", service_request_id="sr-1")
                .model_dump(mode="json", exclude_none=True)))
    out.append(("Patient of the PACS-side trigger", build_patient_from_dicom(slices[0], identifier_system="urn:oid:1.2.36.146.595.217.0.1")
                .model_dump(mode="json", exclude_none=True)))
    return out


def validate(base_url: str, resource: dict[str, Any]) -> list[dict[str, Any]]:
    """HAPI's `$validate` issues (error, warning; information left out) for one resource."""
    response = httpx.post(f"{base_url}/{resource['resourceType']}/$validate", json=resource, timeout=120,
                          headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
    outcome = response.json()
    assert outcome.get("resourceType") == "OperationOutcome", response.text[:500]
    return [issue for issue in outcome.get("issue") or [] if issue.get("severity") in ("fatal", "error", "warning")]


def known_warning(resource_type: str, issue: dict[str, Any]) -> str | None:
    text = issue.get("diagnostics") or ""
    return next((key for key, (kinds, fragment) in KNOWN_WARNINGS.items() if resource_type in kinds and fragment in text), None)


@pytest.mark.integration
def test_every_resource_we_write_validates_without_errors_on_a_validating_hapi(strict_hapi_server):
    counts: dict[str, dict[str, int]] = {}
    problems = []
    for what, resource in written_resources():
        issues = validate(strict_hapi_server.url, resource)
        kind = resource["resourceType"]
        tally = counts.setdefault(kind, {"resources": 0, "errors": 0, "warnings": 0})
        tally["resources"] += 1
        for issue in issues:
            where = f"{kind} ({what}) {(issue.get('expression') or [''])[0]}: {issue.get('diagnostics')}"
            if issue["severity"] in ("fatal", "error"):
                tally["errors"] += 1
                problems.append("ERROR " + where)
            else:
                tally["warnings"] += 1
                if known_warning(kind, issue) is None:
                    problems.append("UNLISTED WARNING " + where)
    print(f"$validate on HAPI FHIR {strict_hapi_server_version()}: {json.dumps(counts)}")  # the figures for docs/fhir.md
    assert problems == []
    assert set(counts) == {"Device", "Observation", "Media", "DiagnosticReport", "Provenance", "ServiceRequest",
                           "Subscription", "ImagingStudy", "Patient"}


def strict_hapi_server_version() -> str:
    import hapi_support

    return hapi_support.hapi_version()


@pytest.mark.integration
def test_the_validating_hapi_refuses_what_breaks_our_profile(strict_hapi_server):
    """The strict server really checks our profile: an Observation without the AI label, or with a
    finding code that is not ours, is refused on create (request validation) and flagged by $validate."""
    observation = next(r for _, r in written_resources() if r["resourceType"] == "Observation")
    unlabelled = json.loads(json.dumps(observation))
    del unlabelled["meta"]["security"]
    assert any(i["severity"] == "error" for i in validate(strict_hapi_server.url, unlabelled))
    wrong = json.loads(json.dumps(observation))
    wrong["code"]["coding"][-1]["code"] = "not-a-finding"
    assert any(i["severity"] == "error" for i in validate(strict_hapi_server.url, wrong))
    patient = httpx.put(f"{strict_hapi_server.url}/Patient/p-strict", json={"resourceType": "Patient", "id": "p-strict"},
                        headers={"Content-Type": "application/fhir+json"}, timeout=60)
    assert patient.status_code in (200, 201), patient.text[:300]
    unlabelled["subject"] = {"reference": "Patient/p-strict"}
    unlabelled.pop("basedOn", None)
    unlabelled.pop("derivedFrom", None)
    unlabelled["device"] = {"reference": "Device/none"}
    refused = httpx.post(f"{strict_hapi_server.url}/Observation", json=unlabelled, timeout=60,
                         headers={"Content-Type": "application/fhir+json"})
    assert refused.status_code == 422, refused.text[:500]


def test_docs_list_and_justify_every_known_warning():
    text = (ROOT / "docs" / "fhir.md").read_text()
    assert [key for key in KNOWN_WARNINGS if f"`{key}`" not in text] == []


# --- the package, without a server ------------------------------------------------------------------


def test_the_package_defines_every_local_code_with_its_display_and_a_profile_per_written_type():
    files = package_files(Conventions(), "1.0.0")
    assert files["package.json"]["name"] == "cds-triage.r4" and files["package.json"]["fhirVersions"] == ["4.0.1"]
    systems = {r["url"]: r for r in files.values() if r.get("resourceType") == "CodeSystem"}
    findings = systems["https://cds-triage.org/fhir/CodeSystem/triage-finding"]
    assert {c["code"]: c["display"] for c in findings["concept"]} == codes.FINDING_DISPLAY
    assert findings["content"] == "complete" and findings["count"] == len(codes.FINDING_DISPLAY)
    assert {c["code"] for c in systems["https://cds-triage.org/fhir/CodeSystem/triage-tag"]["concept"]} == set(codes.TAG_CODES)
    assert {c["code"] for c in systems["https://cds-triage.org/fhir/CodeSystem/triage-method"]["concept"]} == set(codes.METHOD_CODES)
    structures = {r["id"]: r for r in files.values() if r.get("resourceType") == "StructureDefinition"}
    profiles = {r["type"] for r in structures.values() if r["type"] != "Extension"}
    assert profiles == set(codes.PROFILED_TYPES)
    assert {"heatmap-source-instance", "ai-priority-change"} <= set(structures)
    aiast = [e for e in structures["cds-triage-observation"]["differential"]["element"] if e.get("patternCoding")]
    assert aiast == [{"id": "Observation.meta.security:aiAsserted", "path": "Observation.meta.security",
                      "sliceName": "aiAsserted", "min": 1, "max": "1",
                      "patternCoding": {"system": codes.SECURITY_OBSERVATION_VALUE_SYSTEM, "code": "AIAST"}}]
    index = files[".index.json"]["files"]
    assert sorted(f["filename"] for f in index) == sorted(name for name in files if name.endswith(".json")
                                                         and name not in ("package.json", ".index.json"))


def test_a_site_base_and_label_reach_every_url_and_the_profiles():
    site = Conventions.from_settings(Settings(fhir_canonical_base="https://fhir.hospital.example/ai",
                                              ai_security_label="https://fhir.hospital.example/sec|AI|AI asserted",
                                              ai_security_label_mode="replace"))
    text = json.dumps(package_files(site, "1.0.0"))
    assert "cds-triage.org" not in text and "AIAST" not in text
    assert '"patternCoding": {"system": "https://fhir.hospital.example/sec", "code": "AI"}' in text
    bundle = build_triage_transaction(ctx(), ich_result(), issued=ISSUED, conventions=site)
    written = json.dumps(bundle.model_dump(mode="json", exclude_none=True))
    assert "cds-triage.org" not in written and "AIAST" not in written
    assert {url for url in re.findall(r'https://fhir\.hospital\.example/ai/[A-Za-z]+/[a-z-]+', written)} >= {
        "https://fhir.hospital.example/ai/StructureDefinition/cds-triage-observation",
        "https://fhir.hospital.example/ai/CodeSystem/triage-finding",
        "https://fhir.hospital.example/ai/sid/triage-result",
        "https://fhir.hospital.example/ai/StructureDefinition/heatmap-source-instance"}


def test_the_cli_writes_the_package_as_a_tgz_and_as_a_folder(tmp_path, monkeypatch, capsys):
    from cds_service import cli

    monkeypatch.setenv("CDS_FHIR_CANONICAL_BASE", "https://fhir.hospital.example/ai")
    assert cli.main(["fhir-package", "--output", str(tmp_path / "p.tgz"), "--version", "2.0.0"]) == 0
    assert "https://fhir.hospital.example/ai" in capsys.readouterr().out
    with tarfile.open(tmp_path / "p.tgz") as archive:
        names = archive.getnames()
        manifest = json.load(archive.extractfile("package/package.json"))  # type: ignore[arg-type]
    assert "package/CodeSystem-triage-finding.json" in names and manifest["version"] == "2.0.0"
    assert manifest["canonical"] == "https://fhir.hospital.example/ai"
    assert cli.main(["fhir-package", "--output", str(tmp_path / "folder"), "--version", "2.0.0"]) == 0
    assert (tmp_path / "folder" / "package" / "StructureDefinition-cds-triage-diagnosticreport.json").is_file()


@pytest.mark.parametrize("value, problem", [("https://x.example/fhir/", "trailing slash"), ("ftp://x.example", "http(s)"),
                                            ("https://x.example/fhir?a=1", "query")])
def test_a_bad_canonical_base_is_refused_at_start_up_naming_the_setting(value, problem):
    from cds_service.core.settings import SettingsError

    with pytest.raises(SettingsError, match="CDS_FHIR_CANONICAL_BASE") as refused:
        Settings(fhir_canonical_base=value)
    assert problem.split()[0] in str(refused.value)


def test_a_bad_ai_security_label_is_refused_and_replace_needs_one():
    from cds_service.core.settings import SettingsError

    with pytest.raises(SettingsError, match="CDS_AI_SECURITY_LABEL="):
        Settings(ai_security_label="AI only")
    with pytest.raises(SettingsError, match="CDS_AI_SECURITY_LABEL_MODE=replace needs"):
        Settings(ai_security_label_mode="replace")
    added = Conventions.from_settings(Settings(ai_security_label="urn:oid:2.16.840.1.113883.5.25|AI"))
    assert [label.code for label in added.ai_labels] == ["AIAST", "AI"]


def test_effective_time_is_the_studys_and_a_malformed_one_is_refused():
    bundle = build_triage_transaction(ctx(), ich_result(), issued=ISSUED, effective="2025-03-14T08:55:00+01:00")
    resources = [e["resource"] for e in bundle.model_dump(mode="json", exclude_none=True)["entry"]]
    for resource in resources:
        if resource["resourceType"] in ("Observation", "DiagnosticReport"):
            assert resource["effectiveDateTime"] == "2025-03-14T08:55:00+01:00" and resource["issued"] == "2025-03-14T09:26:53Z"
    with pytest.raises(ValueError, match="not a FHIR dateTime"):
        build_triage_transaction(ctx(), ich_result(), issued=ISSUED, effective="14.03.2025 08:55")


def test_narratives_are_escaped_xhtml_saying_finding_probability_model_and_disclaimer():
    result = replace(ich_result(), model=ModelRef("head<ct>", "1.2.0 & co"))
    bundle = build_triage_transaction(OrderContext("is-1", "pat-1", "sr-1", result.study_uid), result, issued=ISSUED)
    for entry in bundle.model_dump(mode="json", exclude_none=True)["entry"]:
        resource = entry["resource"]
        text = resource["text"]
        assert text["status"] == "generated" and text["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">')
        if resource["resourceType"] in ("Observation", "Media", "DiagnosticReport"):
            div = text["div"]
            assert "head&lt;ct&gt; 1.2.0 &amp; co" in div and "AI-generated, preliminary, not a diagnosis." in div
            assert "Intracranial hemorrhage" in div and "0.93" in div


def test_dicom_dates_become_fhir_datetimes_with_a_time_only_where_the_zone_is_known():
    from cds_service.adapters.pacs import series_from_qido
    from fhir_mappings.imaging_study import dicom_datetime

    assert dicom_datetime("20250314", "085500.123", "+0100") == "2025-03-14T08:55:00+01:00"
    assert dicom_datetime("20250314", "0855", "-0500") == "2025-03-14T08:55:00-05:00"
    assert dicom_datetime("20250314", "085500") == "2025-03-14"  # no zone: FHIR wants one with a time
    assert dicom_datetime("20251399") is None and dicom_datetime("") is None and dicom_datetime("2025") is None
    series = {"0020000E": {"vr": "UI", "Value": ["1.2.3"]}, "00080020": {"vr": "DA", "Value": ["20250313"]},
              "00080021": {"vr": "DA", "Value": ["20250314"]}, "00080031": {"vr": "TM", "Value": ["0855"]},
              "00080201": {"vr": "SH", "Value": ["+0100"]}}
    assert series_from_qido(series).acquired == "2025-03-14T08:55:00+01:00"
    del series["00080021"]  # no series date: the study's
    assert series_from_qido(series).acquired == "2025-03-13"
    assert series_from_qido({"0020000E": {"vr": "UI", "Value": ["1.2.3"]}}).acquired == ""


def fhir_answering(handler) -> Any:
    from cds_service.adapters.fhir_client import FhirClient

    client = FhirClient("http://fhir.test/fhir")
    client.http = httpx.Client(base_url="http://fhir.test/fhir/", transport=httpx.MockTransport(handler))
    return client


def test_the_ai_label_check_says_known_not_known_or_could_not_check():
    from cds_service.adapters.terminology import check_ai_labels

    def answer(result: bool | None, status: int = 200):
        def handler(request: httpx.Request) -> httpx.Response:
            assert request.url.path == "/fhir/CodeSystem/$validate-code"
            assert request.url.params["url"] == codes.SECURITY_OBSERVATION_VALUE_SYSTEM and request.url.params["code"] == "AIAST"
            if status != 200:
                return httpx.Response(status, json={"resourceType": "OperationOutcome"})
            parameters = [{"name": "result", "valueBoolean": result}]
            if result is False:
                parameters.append({"name": "message", "valueString": "Unknown code 'AIAST'"})
            return httpx.Response(200, json={"resourceType": "Parameters", "parameter": parameters})
        return handler

    [known] = check_ai_labels(fhir_answering(answer(True)), Conventions())
    [unknown] = check_ai_labels(fhir_answering(answer(False)), Conventions())
    [unchecked] = check_ai_labels(fhir_answering(answer(None, 404)), Conventions())
    assert (known.known, unknown.known, unchecked.known) == (True, False, None)
    assert known.line().endswith("|AIAST: known to the FHIR server's terminology")
    assert "NOT known" in unknown.line() and "Unknown code 'AIAST'" in unknown.line() and "CDS_AI_SECURITY_LABEL" in unknown.line()
    assert unchecked.line().endswith("could not check (CodeSystem/$validate-code answered 404)")
    site = Conventions.from_settings(Settings(ai_security_label="https://h.example/sec|AI", ai_security_label_mode="replace"))
    assert [label.code for label in site.ai_labels] == ["AI"]
