"""Helpers of the patient-data access tests (test_phi_access.py, test_oidc_sign_in.py): start our `serve` alone
(no worker: these tests only look), and put an imaging order with an AI result into the real FHIR server the
way the worker writes it (our own FHIR builders, one transaction), so a heatmap and a study page exist."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from cds_devtools.devservers import ManagedProcess, http_ok
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.domain import Finding, Heatmap, ModelRef, OrderContext, Priority, Task, TriageResult, TriageStatus
from cds_service.core.settings import Settings
from fhir_mappings.builders import build_triage_transaction, reference_id

REPO = Path(__file__).resolve().parents[1]


def start_serve(settings: Settings, logdir: Path, *, extra_env: dict[str, str] | None = None) -> ManagedProcess:
    """`cds-triage serve` with these settings; returns once /healthz answers."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **settings.to_env(), **(extra_env or {})}
    serve = ManagedProcess("cds-serve", [sys.executable, "-m", "cds_service.cli", "serve", "--http-workers", "1"],
                           url=settings.public_url, log_path=logdir / "serve.log", env=env).start()
    try:
        serve.wait_ready(lambda: http_ok(f"{settings.public_url}/healthz"), timeout=90)
    except BaseException:
        serve.stop()
        raise
    return serve


def run_cli(*args: str, settings: Settings | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`cds-triage <args>` in a child process, with these settings (and more variables)."""
    return subprocess.run([sys.executable, "-m", "cds_service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(settings.to_env() if settings else {}),
                               **(env or {})})


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def order_with_ai_result(fhir: FhirClient, name: str = "Jane Doe") -> dict[str, str]:
    """Patient, imaging ServiceRequest, ImagingStudy, and our DiagnosticReport with its Observation and heatmap
    Media (as the worker writes them). The ids: patient, order, study, media."""
    tag = uuid.uuid4().hex[:10]
    ids = {"patient": f"p-{tag}", "order": f"sr-{tag}", "study": f"is-{tag}"}
    given, _, family = name.partition(" ")
    uid = f"1.2.826.0.1.3680043.8.498.{int(tag, 16)}"
    fhir.update({"resourceType": "Patient", "id": ids["patient"], "name": [{"family": family, "given": [given]}],
                 "gender": "female", "birthDate": "1959-03-01"}, if_match=None)
    fhir.update({"resourceType": "ServiceRequest", "id": ids["order"], "status": "active", "intent": "order",
                 "priority": "routine", "subject": {"reference": f"Patient/{ids['patient']}"},
                 "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005"}]}],
                 "authoredOn": datetime.now(timezone.utc).isoformat(timespec="seconds")}, if_match=None)
    fhir.update({"resourceType": "ImagingStudy", "id": ids["study"], "status": "available",
                 "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
                 "subject": {"reference": f"Patient/{ids['patient']}"},
                 "basedOn": [{"reference": f"ServiceRequest/{ids['order']}"}],
                 "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]}, if_match=None)
    heatmap = Heatmap(png=_png(), label="any", width=32, height=32, slice_index=1, sop_instance_uid=f"{uid}.1.1")
    result = TriageResult(study_uid=uid, status=TriageStatus.DONE, task=Task.HEAD_CT_ICH, series_uid=f"{uid}.1",
                          findings=(Finding("any", 0.93, True, 0.5),), suggested_priority=Priority.STAT,
                          model=ModelRef("test-model", "0.0.1"), heatmap=heatmap, slices_scored=3)
    context = OrderContext(imaging_study_id=ids["study"], patient_id=ids["patient"], service_request_id=ids["order"],
                           study_uid=uid)
    bundle = build_triage_transaction(context, result, issued=datetime.now(timezone.utc))
    answer = fhir.transaction(bundle.model_dump(mode="json", exclude_none=True))
    ids["media"] = next(filter(None, (reference_id(e["response"]["location"], "Media") for e in answer["entry"])))
    return ids
