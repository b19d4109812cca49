"""Helpers of the silent-trial tests: FHIR resources as our write-back and a radiology system write them."""

from __future__ import annotations

import zlib
from datetime import datetime, timedelta, timezone
from typing import Any

from cds_service.core.domain import Finding, ModelRef, OrderContext, Task, TaskMode, TriageResult, TriageStatus
from fhir_mappings import codes
from fhir_mappings.builders import build_triage_transaction

MODEL = ModelRef("test-model", "1.0.0")
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)  # when every order here was placed
SNOMED_ICH = f"{codes.SNOMED_SYSTEM}|1386000"
SNOMED_NORMAL = f"{codes.SNOMED_SYSTEM}|281900007"


def stored_transaction(bundle: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """The resources a FHIR server keeps of our transaction: ids given, urn:uuid references resolved."""
    ids = {entry["fullUrl"]: f"{entry['resource']['resourceType']}/{prefix}-{n}" for n, entry in enumerate(bundle["entry"])}

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ids.get(v, v) if k == "reference" else resolve(v) for k, v in value.items()}
        return [resolve(v) for v in value] if isinstance(value, list) else value

    return [resolve(entry["resource"]) | {"id": ids[entry["fullUrl"]].split("/")[1]} for entry in bundle["entry"]]


def ai_report(study: str, findings: list[tuple[str, float, bool]], *, task: Task = Task.HEAD_CT_ICH,
              mode: TaskMode = TaskMode.SHADOW, patient: str | None = None, order: str | None = "same",
              issued: datetime = T0 + timedelta(minutes=5), model: ModelRef = MODEL, threshold: float = 0.5,
              prefix: str = "ai") -> list[dict[str, Any]]:
    """Our DiagnosticReport, Observations, Device … for one study, as stored (ids prefixed by the study)."""
    result = TriageResult(study_uid=f"1.2.{zlib.crc32(study.encode())}", status=TriageStatus.DONE, task=task, series_uid="1.2.3",
                          findings=tuple(Finding(label, p, positive, threshold) for label, p, positive in findings),
                          model=model, mode=mode)
    ctx = OrderContext(imaging_study_id=study, patient_id=patient or f"p-{study}",
                       service_request_id=f"sr-{study}" if order == "same" else order, study_uid=result.study_uid)
    bundle = build_triage_transaction(ctx, result, issued=issued).model_dump(mode="json", exclude_none=True)
    return stored_transaction(bundle, f"{prefix}-{study}")


def final_report(report_id: str, *, study: str | None = None, order: str | None = None, patient: str,
                 codes_: list[str] | None = None, issued: datetime | None = None, status: str = "final") -> dict[str, Any]:
    """A radiologist's report as a RIS writes it: coded conclusion (`system|code`) or none."""
    report: dict[str, Any] = {"resourceType": "DiagnosticReport", "id": report_id, "status": status,
                              "code": {"text": "CT head"}, "subject": {"reference": f"Patient/{patient}"},
                              "conclusion": "Free text the trial never reads: hemorrhage? no hemorrhage?"}
    if study:
        report["imagingStudy"] = [{"reference": f"ImagingStudy/{study}"}]
    if order:
        report["basedOn"] = [{"reference": f"ServiceRequest/{order}"}]
    if codes_:
        report["conclusionCode"] = [{"coding": [{"system": c.split("|")[0], "code": c.split("|")[1]}]} for c in codes_]
    if issued:
        report["issued"] = issued.strftime("%Y-%m-%dT%H:%M:%SZ")
    return report


def order(order_id: str, patient: str, authored: datetime | None = T0) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "ServiceRequest", "id": order_id, "status": "active", "intent": "order",
                                "subject": {"reference": f"Patient/{patient}"}}
    if authored:
        resource["authoredOn"] = authored.strftime("%Y-%m-%dT%H:%M:%SZ")
    return resource
