"""Tests of the pure FHIR mapping: what one study's triage writes, and the small helpers.

No server: the R4B models validate structure; these tests check the clinical and
integration rules on top (idempotent identifiers, resolvable references, AI labelling,
untrained outputs withheld, the disclaimer in the conclusion).
"""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.subscription import Subscription
from PIL import Image

from cds_service.core.domain import (
         TASK_LABELS,
         Finding,
         Heatmap,
         ModelRef,
         OrderContext,
         Priority,
         Task,
         TriageResult,
         TriageStatus,
     )
from cds_service.core.errors import InvalidResourceError
from fhir_mappings import codes
from fhir_mappings.conventions import DEFAULT_CONVENTIONS as OURS
from fhir_mappings.builders import (
    AI_DISCLAIMER,
    SUBSCRIPTION_SECRET_HEADER,
    ai_priority_change,
    build_conclusion,
    build_device,
    build_observation,
    build_subscription,
    build_triage_transaction,
    device_identifier,
    finding_code,
    heatmap_source_instance,
    result_identifier,
    study_uid_from_imaging_study,
    with_priority,
)

ISSUED = datetime(2025, 3, 14, 9, 26, 53, tzinfo=timezone.utc)
STUDY_UID = "1.2.826.0.1.3680043.8.498.12345"
ICH_MODEL = ModelRef("head_ct_ich", "1.2.0")


# ---------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------


def tiny_png(width: int = 4, height: int = 3) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def ich_result(
    *,
    model: ModelRef = ICH_MODEL,
    study_uid: str = STUDY_UID,
    heatmap: bool = True,
    positive: bool = True,
) -> TriageResult:
    """A head-CT result as the service produces it: only `any` trained, subtypes not."""
    findings = (
        Finding("any", 0.93 if positive else 0.12, positive, 0.5),
        Finding("epidural", 0.04, False, 0.5, trained=False),
        Finding("intraparenchymal", 0.71, False, 0.5, trained=False),
        Finding("intraventricular", 0.02, False, 0.5, trained=False),
        Finding("subarachnoid", 0.10, False, 0.5, trained=False),
        Finding("subdural", 0.30, False, 0.5, trained=False),
    )
    return TriageResult(
        study_uid=study_uid,
        status=TriageStatus.DONE,
        task=Task.HEAD_CT_ICH,
        series_uid=study_uid + ".1",
        findings=findings,
        suggested_priority=Priority.STAT if positive else Priority.ROUTINE,
        model=model,
        heatmap=Heatmap(tiny_png(), "any", 4, 3, slice_index=17, sop_instance_uid=study_uid + ".1.17")
        if heatmap
        else None,
        slices_scored=32,
    )


def brain_result() -> TriageResult:
    return TriageResult(
        study_uid="1.2.3.4.5",
        status=TriageStatus.DONE,
        task=Task.BRAIN_MRI,
        findings=(
            Finding("glioma", 0.81, True, 0.4),
            Finding("meningioma", 0.55, True, 0.5),
            Finding("pituitary", 0.01, False, 0.5),
            Finding("no_tumor", 0.02, False, 0.5),
        ),
        model=ModelRef("brain_mri", "0.3.1"),
    )


def ctx(service_request_id: str | None = "sr-1", study_uid: str = STUDY_UID) -> OrderContext:
    return OrderContext(
        imaging_study_id="is-1",
        patient_id="pat-1",
        service_request_id=service_request_id,
        study_uid=study_uid,
    )


def as_json(bundle: Bundle) -> dict[str, Any]:
    return bundle.model_dump(mode="json", exclude_none=True)


def resources(bundle_json: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [
        e["resource"] for e in bundle_json["entry"] if e["resource"]["resourceType"] == resource_type
    ]


def entries(bundle_json: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e for e in bundle_json["entry"] if e["resource"]["resourceType"] == resource_type]


def all_references(node: Any) -> Iterator[str]:
    """Every Reference.reference anywhere in a JSON tree."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node["reference"]
        for value in node.values():
            yield from all_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_references(item)


def business_ids(bundle_json: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (e["resource"]["resourceType"], e["fullUrl"], e["request"]["ifNoneExist"])
        for e in bundle_json["entry"]
    ]


# ---------------------------------------------------------------------------------------
# The transaction bundle
# ---------------------------------------------------------------------------------------


def test_bundle_is_a_valid_r4b_transaction_of_conditional_creates() -> None:
    data = as_json(build_triage_transaction(ctx(), ich_result(), issued=ISSUED))

    reparsed = Bundle.model_validate(data)  # full R4B validation of the serialised form
    assert reparsed.type == "transaction"
    types = [e["resource"]["resourceType"] for e in data["entry"]]
    assert types == ["Device", "Observation", "Media", "DiagnosticReport", "Provenance"]
    full_urls = [e["fullUrl"] for e in data["entry"]]
    assert len(set(full_urls)) == len(full_urls)
    for entry in data["entry"]:
        assert entry["fullUrl"].startswith("urn:uuid:")
        assert entry["request"]["method"] == "POST"
        assert entry["request"]["url"] == entry["resource"]["resourceType"]
        assert entry["request"]["ifNoneExist"]
        assert "id" not in entry["resource"]  # the server assigns ids


def test_if_none_exist_searches_each_resource_by_its_own_identifier() -> None:
    data = as_json(build_triage_transaction(ctx(), ich_result(), issued=ISSUED))
    for entry in data["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Provenance":
            tag = resource["meta"]["tag"][0]
            assert entry["request"]["ifNoneExist"] == f"_tag={tag['system']}|{tag['code']}"
            assert entry["fullUrl"] == tag["code"] and tag["code"].startswith("urn:uuid:")
            assert tag["system"] == "urn:ietf:rfc:3986"
        else:
            ident = resource["identifier"][0]
            assert entry["request"]["ifNoneExist"] == f"identifier={ident['system']}|{ident['value']}"
            assert entry["fullUrl"] == f"urn:uuid:{ident['value']}"


def test_identifiers_are_identical_across_two_builds_of_the_same_result() -> None:
    first = as_json(build_triage_transaction(ctx(), ich_result(), issued=ISSUED))
    # A retry an hour later, from a fresh but equal result, must produce the same keys.
    second = as_json(
        build_triage_transaction(ctx(), ich_result(), issued=ISSUED + timedelta(hours=1))
    )
    assert business_ids(first) == business_ids(second)


def test_identifiers_differ_for_another_model_version_and_another_study() -> None:
    base = dict((t, u) for t, u, _ in business_ids(
        as_json(build_triage_transaction(ctx(), ich_result(), issued=ISSUED))))
    new_version = dict((t, u) for t, u, _ in business_ids(as_json(build_triage_transaction(
        ctx(), ich_result(model=ModelRef("head_ct_ich", "1.3.0")), issued=ISSUED))))
    other_study = dict((t, u) for t, u, _ in business_ids(as_json(build_triage_transaction(
        ctx(study_uid="1.2.3.999"), ich_result(study_uid="1.2.3.999"), issued=ISSUED))))

    for resource_type in ("Observation", "Media", "DiagnosticReport", "Provenance", "Device"):
        assert new_version[resource_type] != base[resource_type], resource_type
    for resource_type in ("Observation", "Media", "DiagnosticReport", "Provenance"):
        assert other_study[resource_type] != base[resource_type], resource_type
    # ...but every study shares the one Device of a model version.
    assert other_study["Device"] == base["Device"]


def test_result_identifier_is_deterministic_and_kind_specific() -> None:
    a = result_identifier(STUDY_UID, Task.HEAD_CT_ICH, "1.2.0", "report")
    assert a == result_identifier(STUDY_UID, "head_ct_ich", "1.2.0", "report")
    assert a.system == OURS.result_identifier_system
    kinds = ["report", "media", "provenance", "observation-any", "observation-subdural"]
    values = {result_identifier(STUDY_UID, Task.HEAD_CT_ICH, "1.2.0", k).value for k in kinds}
    assert len(values) == len(kinds)
    with pytest.raises(ValueError):
        result_identifier(STUDY_UID, Task.HEAD_CT_ICH, "", "report")


def test_device_identifier_depends_on_name_and_version_only() -> None:
    assert device_identifier(ICH_MODEL) == device_identifier(ModelRef("head_ct_ich", "1.2.0"))
    assert device_identifier(ICH_MODEL) != device_identifier(ModelRef("head_ct_ich", "1.2.1"))
    assert device_identifier(ICH_MODEL) != device_identifier(ModelRef("other", "1.2.0"))
    device = build_device(ICH_MODEL, Task.HEAD_CT_ICH)
    assert device.deviceName[0].name == "head_ct_ich"
    assert device.version[0].value == "1.2.0"
    assert "head_ct_ich" in device.type.text


def test_untrained_labels_are_not_written_and_the_conclusion_says_so() -> None:
    data = as_json(build_triage_transaction(ctx(), ich_result(), issued=ISSUED))
    observations = resources(data, "Observation")
    local_codes = [
        c["code"] for o in observations for c in o["code"]["coding"]
        if c["system"] == OURS.finding_system
    ]
    assert local_codes == ["any"]
    conclusion = resources(data, "DiagnosticReport")[0]["conclusion"]
    assert "Untrained subtype outputs" in conclusion
    assert "not reported" in conclusion
    for label in ("epidural", "subdural", "intraparenchymal"):
        assert label in conclusion


def test_building_an_observation_for_an_untrained_label_is_refused() -> None:
    result = ich_result()
    untrained = next(f for f in result.findings if not f.trained)
    with pytest.raises(ValueError, match="not trained"):
        build_observation(ctx(), result, untrained, device_reference="urn:uuid:x", issued=ISSUED)


def test_every_intra_bundle_reference_resolves_to_a_full_url() -> None:
    data = as_json(build_triage_transaction(ctx(), ich_result(), issued=ISSUED))
    full_urls = {e["fullUrl"] for e in data["entry"]}
    refs = list(all_references(data))
    internal = [r for r in refs if r.startswith("urn:uuid:")]
    assert internal, "expected urn:uuid references between entries"
    assert set(internal) <= full_urls
    # Everything else points at resources that already exist on the server.
    external = {r for r in refs if not r.startswith("urn:uuid:")}
    assert external == {"Patient/pat-1", "ImagingStudy/is-1", "ServiceRequest/sr-1"}


def test_observation_content() -> None:
    data = as_json(build_triage_transaction(ctx(), ich_result(), issued=ISSUED))
    device_url = entries(data, "Device")[0]["fullUrl"]
    obs = resources(data, "Observation")[0]

    assert obs["status"] == "preliminary"
    assert obs["category"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
        "code": "imaging",
        "display": "Imaging",
    }
    assert obs["subject"] == {"reference": "Patient/pat-1"}
    assert obs["valueQuantity"] == {
        "value": 0.93, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1",
    }
    assert obs["interpretation"][0]["coding"][0]["code"] == "POS"
    assert obs["derivedFrom"] == [{"reference": "ImagingStudy/is-1"}]
    assert obs["device"]["reference"] == device_url
    assert obs["basedOn"] == [{"reference": "ServiceRequest/sr-1"}]
    threshold = obs["component"][0]
    assert threshold["code"]["coding"][0]["code"] == codes.COMPONENT_OPERATING_THRESHOLD
    assert threshold["valueQuantity"]["value"] == 0.5
    assert "0.50" in obs["note"][0]["text"]
    assert obs["issued"] == "2025-03-14T09:26:53Z"
    systems = [c["system"] for c in obs["code"]["coding"]]
    assert systems == [codes.SNOMED_SYSTEM, OURS.finding_system]


def test_negative_observation_is_neg_and_no_service_request_means_no_based_on() -> None:
    data = as_json(build_triage_transaction(
        ctx(service_request_id=None), ich_result(positive=False), issued=ISSUED))
    obs = resources(data, "Observation")[0]
    assert obs["interpretation"][0]["coding"][0]["code"] == "NEG"
    for resource in (e["resource"] for e in data["entry"]):
        assert "basedOn" not in resource
    assert "ServiceRequest/sr-1" not in set(all_references(data))


def test_no_tumor_label_gets_a_probability_but_no_interpretation() -> None:
    context = OrderContext("is-2", "pat-2", None, "1.2.3.4.5")
    data = as_json(build_triage_transaction(context, brain_result(), issued=ISSUED))
    by_label = {
        next(c["code"] for c in o["code"]["coding"] if c["system"] == OURS.finding_system): o
        for o in resources(data, "Observation")
    }
    assert set(by_label) == {"glioma", "meningioma", "pituitary", "no_tumor"}
    assert "interpretation" not in by_label["no_tumor"]
    assert by_label["no_tumor"]["valueQuantity"]["value"] == 0.02
    assert by_label["glioma"]["interpretation"][0]["coding"][0]["code"] == "POS"
    # No standard code was verified for the brain tumour labels: the local code is alone.
    assert [c["system"] for c in by_label["glioma"]["code"]["coding"]] == [OURS.finding_system]


def test_media_only_when_there_is_a_heatmap() -> None:
    without = as_json(build_triage_transaction(ctx(), ich_result(heatmap=False), issued=ISSUED))
    assert resources(without, "Media") == []
    assert "media" not in resources(without, "DiagnosticReport")[0]

    result = ich_result()
    data = as_json(build_triage_transaction(ctx(), result, issued=ISSUED))
    (media,) = resources(data, "Media")
    assert media["content"]["contentType"] == "image/png"
    assert base64.b64decode(media["content"]["data"]) == result.heatmap.png
    assert (media["width"], media["height"]) == (4, 3)
    assert media["subject"] == {"reference": "Patient/pat-1"}
    assert media["basedOn"] == [{"reference": "ServiceRequest/sr-1"}]
    assert media["device"]["reference"] == entries(data, "Device")[0]["fullUrl"]
    note = media["note"][0]["text"]
    assert "'any'" in note and "slice 17" in note
    assert media["extension"] == [{"url": OURS.heatmap_source_extension, "valueOid": f"urn:oid:{STUDY_UID}.1.17"}]
    assert heatmap_source_instance(media) == f"{STUDY_UID}.1.17"  # what the worklist reads back

    report = resources(data, "DiagnosticReport")[0]
    assert report["media"][0]["link"]["reference"] == entries(data, "Media")[0]["fullUrl"]
    assert report["media"][0]["comment"]


def test_a_heatmap_drawn_on_a_slab_says_so_in_the_media_and_report() -> None:
    """A thin-slice series is read as 5 mm slabs (core/slabs.py): the overlay's place is a slab, not a slice."""
    result = ich_result()
    assert result.heatmap is not None
    slab = replace(result, heatmap=replace(result.heatmap, averaged_slices=10, slab_mm=5.0))
    data = as_json(build_triage_transaction(ctx(), slab, issued=ISSUED))
    (media,) = resources(data, "Media")
    assert "slab 17 (5 mm, the mean of 10 thin slices) (SOP Instance UID" in media["note"][0]["text"]
    assert "its middle slice" in media["note"][0]["text"] and "slice 17" not in media["note"][0]["text"]
    assert "slab 17 (5 mm, the mean of 10 thin slices)" in resources(data, "DiagnosticReport")[0]["media"][0]["comment"]
    with pytest.raises(ValueError, match="averaged_slices"):
        replace(result.heatmap, averaged_slices=0)


def test_diagnostic_report_content() -> None:
    data = as_json(build_triage_transaction(
        ctx(), ich_result(), issued=ISSUED, worklist_url="https://cds.example.org/worklist/42"))
    report = resources(data, "DiagnosticReport")[0]

    assert report["status"] == "preliminary"
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["category"][0]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v2-0074"
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study",
    }
    assert report["subject"] == {"reference": "Patient/pat-1"}
    assert report["basedOn"] == [{"reference": "ServiceRequest/sr-1"}]
    # the study's UID beside the reference: a reader of the report alone can open it in a viewer (cards.AiReport.study_uid)
    assert report["imagingStudy"] == [{"reference": "ImagingStudy/is-1",
                                       "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}}]
    assert [r["reference"] for r in report["result"]] == [e["fullUrl"] for e in entries(data, "Observation")]
    assert report["issued"] == "2025-03-14T09:26:53Z"
    assert report["conclusionCode"][0]["coding"][-1]["code"] == "any"
    assert report["presentedForm"][0]["url"] == "https://cds.example.org/worklist/42"


def test_conclusion_names_top_finding_model_and_carries_the_disclaimer() -> None:
    conclusion = build_conclusion(ich_result())
    assert "Intracranial hemorrhage" in conclusion
    assert "0.93" in conclusion
    assert "head_ct_ich 1.2.0" in conclusion
    assert "Suggested priority: stat." in conclusion
    assert conclusion.endswith("AI-generated, preliminary, not a diagnosis.")
    assert AI_DISCLAIMER == "AI-generated, preliminary, not a diagnosis."


def test_conclusion_without_positive_finding() -> None:
    data = as_json(build_triage_transaction(ctx(), ich_result(positive=False), issued=ISSUED))
    report = resources(data, "DiagnosticReport")[0]
    assert "no finding above threshold" in report["conclusion"]
    assert "AI-generated, preliminary" in report["conclusion"]
    assert "conclusionCode" not in report


def test_conclusion_lists_every_positive_finding_most_probable_first() -> None:
    conclusion = build_conclusion(brain_result())
    assert conclusion.index("Glioma") < conclusion.index("Meningioma")
    assert "Also above threshold: Meningioma (0.55)." in conclusion


def test_ai_asserted_security_label_on_every_clinical_resource() -> None:
    data = as_json(build_triage_transaction(ctx(), ich_result(), issued=ISSUED))
    aiast = {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "AIAST",
        "display": "Artificial Intelligence asserted",
    }
    for resource_type in ("Observation", "Media", "DiagnosticReport"):
        for resource in resources(data, resource_type):
            assert aiast in resource["meta"]["security"], resource_type
    # Device (software description) and Provenance (written by us, about the AI) are not
    # AI assertions themselves.
    assert "security" not in resources(data, "Device")[0]["meta"]
    assert "security" not in resources(data, "Provenance")[0]["meta"]


def test_provenance_targets_all_results_with_the_device_as_agent() -> None:
    data = as_json(build_triage_transaction(ctx(), ich_result(), issued=ISSUED))
    provenance = resources(data, "Provenance")[0]
    results = [e["fullUrl"] for e in data["entry"]
               if e["resource"]["resourceType"] in ("Observation", "Media", "DiagnosticReport")]
    assert sorted(t["reference"] for t in provenance["target"]) == sorted(results)
    assert provenance["recorded"] == "2025-03-14T09:26:53Z"
    agent = provenance["agent"][0]
    assert agent["who"]["reference"] == entries(data, "Device")[0]["fullUrl"]
    assert agent["type"]["coding"][0]["code"] == "performer"
    assert provenance["entity"] == [{"role": "derivation", "what": {"reference": "ImagingStudy/is-1"}}]


@pytest.mark.parametrize("status", [TriageStatus.NOT_APPLICABLE, TriageStatus.MODEL_UNAVAILABLE])
def test_results_that_are_not_done_are_rejected(status: TriageStatus) -> None:
    result = TriageResult(study_uid=STUDY_UID, status=status, reason="no matching series")
    with pytest.raises(ValueError, match="only a done triage result"):
        build_triage_transaction(ctx(), result, issued=ISSUED)


def test_naive_issued_time_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone"):
        build_triage_transaction(ctx(), ich_result(), issued=datetime(2025, 3, 14, 9, 0))


def test_result_for_another_study_than_the_order_is_rejected() -> None:
    with pytest.raises(ValueError, match="order context is for study"):
        build_triage_transaction(ctx(study_uid="9.9.9"), ich_result(), issued=ISSUED)


def test_duplicate_labels_are_rejected() -> None:
    result = TriageResult(
        study_uid=STUDY_UID, status=TriageStatus.DONE, task=Task.CHEST_PNEUMOTHORAX,
        findings=(Finding("pneumothorax", 0.9, True, 0.5), Finding("pneumothorax", 0.8, True, 0.5)),
        model=ModelRef("chest_pneumothorax", "1.0"),
    )
    with pytest.raises(ValueError, match="duplicate"):
        build_triage_transaction(ctx(), result, issued=ISSUED)


# ---------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------


def test_every_task_label_has_a_display_and_a_local_code() -> None:
    for labels in TASK_LABELS.values():
        for label in labels:
            assert label in codes.FINDING_DISPLAY
            coding = finding_code(label).coding
            assert coding[-1].system == OURS.finding_system
            assert coding[-1].code == label
    all_labels = {label for labels in TASK_LABELS.values() for label in labels}
    assert set(codes.STANDARD_FINDING_CODES) <= all_labels


def test_pneumothorax_carries_snomed_radlex_and_local_codes() -> None:
    systems = [c.system for c in finding_code("pneumothorax").coding]
    assert systems == [codes.SNOMED_SYSTEM, codes.RADLEX_SYSTEM, OURS.finding_system]


# ---------------------------------------------------------------------------------------
# Subscription
# ---------------------------------------------------------------------------------------


def test_subscription_is_a_tagged_rest_hook_with_the_secret_header() -> None:
    sub = build_subscription("https://cds.example.org/fhir-hook", header_secret="s3cr3t")
    data = sub.model_dump(mode="json", exclude_none=True)
    Subscription.model_validate(data)

    assert data["status"] == "requested"
    assert data["criteria"] == "ImagingStudy?"
    assert data["reason"]
    assert data["channel"] == {
        "type": "rest-hook",
        "endpoint": "https://cds.example.org/fhir-hook",
        "payload": "application/fhir+json",
        "header": [f"{SUBSCRIPTION_SECRET_HEADER}: s3cr3t"],
    }
    assert data["meta"]["tag"] == [{"system": "https://cds-triage.org/fhir/CodeSystem/triage-tag",
                                    "code": "cds-triage-subscription", "display": codes.SUBSCRIPTION_TAG_DISPLAY}]
    tag = data["meta"]["tag"][0]
    assert OURS.subscription_tag_query == f"_tag={tag['system']}|{tag['code']}"


def test_subscription_without_secret_has_no_header_and_custom_criteria() -> None:
    sub = build_subscription(
        "http://localhost:8000/hook", header_secret=None, criteria="ImagingStudy?status=available"
    )
    assert sub.channel.header is None
    assert sub.criteria == "ImagingStudy?status=available"


@pytest.mark.parametrize("secret", ["", "  ", "abc\r\nX-Evil: 1", "line\nbreak"])
def test_subscription_rejects_unusable_secrets(secret: str) -> None:
    with pytest.raises(ValueError):
        build_subscription("https://cds.example.org/hook", header_secret=secret)


def test_subscription_rejects_non_http_endpoint() -> None:
    with pytest.raises(ValueError):
        build_subscription("ftp://cds.example.org/hook", header_secret=None)


def test_subscription_tag_is_not_shared_by_reference() -> None:
    sub = build_subscription("https://cds.example.org/hook", header_secret=None)
    sub.meta.tag[0].display = "changed"
    assert build_subscription("https://cds.example.org/hook", header_secret=None).meta.tag[0].display == \
        codes.SUBSCRIPTION_TAG_DISPLAY


# ---------------------------------------------------------------------------------------
# ImagingStudy -> Study Instance UID
# ---------------------------------------------------------------------------------------


def imaging_study(*identifiers: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": "is-1",
        "status": "available",
        "subject": {"reference": "Patient/pat-1"},
        "identifier": list(identifiers),
    }


def test_study_uid_from_urn_oid_identifier() -> None:
    resource = imaging_study(
        {"system": "http://hospital.example.org/accession", "value": "ACC-1"},
        {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"},
    )
    assert study_uid_from_imaging_study(resource) == STUDY_UID


def test_study_uid_accepts_a_bare_uid() -> None:
    resource = imaging_study({"system": "urn:dicom:uid", "value": STUDY_UID})
    assert study_uid_from_imaging_study(resource) == STUDY_UID


@pytest.mark.parametrize(
    "resource",
    [
        imaging_study(),
        imaging_study({"system": "http://hospital.example.org/accession", "value": "1.2.3"}),
        {"resourceType": "ImagingStudy", "id": "x", "status": "available"},
    ],
    ids=["no-identifiers", "no-dicom-identifier", "identifier-element-missing"],
)
def test_study_uid_missing(resource: dict[str, Any]) -> None:
    with pytest.raises(InvalidResourceError, match="urn:dicom:uid"):
        study_uid_from_imaging_study(resource)


@pytest.mark.parametrize(
    "value",
    ["urn:oid:", "urn:oid:1.2.abc", "urn:oid:01.2.3", "urn:oid:1..2", "urn:oid:1.2.", "1",
     "urn:oid:1." + "2" * 70, ""],
)
def test_study_uid_malformed(value: str) -> None:
    with pytest.raises(InvalidResourceError, match="malformed"):
        study_uid_from_imaging_study(imaging_study({"system": "urn:dicom:uid", "value": value}))


def test_study_uid_conflicting_identifiers_and_wrong_resource_type() -> None:
    with pytest.raises(InvalidResourceError, match="several"):
        study_uid_from_imaging_study(imaging_study(
            {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"},
            {"system": "urn:dicom:uid", "value": "urn:oid:1.2.4"},
        ))
    with pytest.raises(InvalidResourceError, match="ImagingStudy"):
        study_uid_from_imaging_study({"resourceType": "Patient", "id": "p"})


# ---------------------------------------------------------------------------------------
# ServiceRequest priority
# ---------------------------------------------------------------------------------------


def service_request(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": "sr-1",
        "meta": {"versionId": "3"},
        "status": "active",
        "intent": "order",
        "priority": "routine",
        "code": {"text": "CT head without contrast"},
        "subject": {"reference": "Patient/pat-1"},
        **extra,
    }


def test_with_priority_sets_priority_on_a_copy() -> None:
    original = service_request()
    updated = with_priority(original, Priority.STAT)
    assert updated["priority"] == "stat"
    assert original["priority"] == "routine"  # input untouched
    assert {k: v for k, v in updated.items() if k != "priority"} == {
        k: v for k, v in original.items() if k != "priority"
    }
    assert updated["meta"] is not original["meta"]  # deep copy


def test_with_priority_rejects_invalid_service_requests() -> None:
    with pytest.raises(InvalidResourceError, match="not valid R4B"):
        with_priority(service_request(unknownElement=True), Priority.URGENT)
    broken = service_request()
    del broken["subject"]
    with pytest.raises(InvalidResourceError, match="not valid R4B"):
        with_priority(broken, Priority.URGENT)
    with pytest.raises(InvalidResourceError):
        with_priority({"resourceType": "Patient", "id": "p"}, Priority.URGENT)


def test_with_priority_appends_a_note_and_keeps_existing_ones() -> None:
    original = {"resourceType": "ServiceRequest", "id": "sr", "status": "active", "intent": "order",
                "subject": {"reference": "Patient/p"}, "priority": "routine", "note": [{"text": "by hand"}]}
    updated = with_priority(original, Priority.STAT, note="raised by AI from routine")
    assert [n["text"] for n in updated["note"]] == ["by hand", "raised by AI from routine"]
    assert original["note"] == [{"text": "by hand"}]


def test_the_ai_priority_change_is_data_on_its_note() -> None:
    original = {"resourceType": "ServiceRequest", "id": "sr", "status": "active", "intent": "order",
                "subject": {"reference": "Patient/p"}, "priority": "urgent", "note": [{"text": "by hand"}]}
    assert ai_priority_change(original) is None
    updated = with_priority(original, Priority.STAT, note="Priority raised from urgent to stat by AI triage.")
    assert updated["note"][-1]["extension"] == [{"url": OURS.priority_change_extension, "extension": [
        {"url": "from", "valueCode": "urgent"}, {"url": "to", "valueCode": "stat"}]}]
    assert ai_priority_change(updated) == ("urgent", "stat")
    unset = with_priority({k: v for k, v in original.items() if k != "priority"}, Priority.ASAP, note="raised")
    assert ai_priority_change(unset) == (None, "asap")
    assert "extension" not in with_priority(original, Priority.STAT).get("note", [{}])[-1]  # no note, no change recorded
