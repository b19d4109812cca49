"""The helpers every blueprint uses: the process's ServiceContext, and FHIR-style error answers.

The blueprints import these from here, not from app.py, which imports the blueprints."""

from __future__ import annotations

from typing import Any

from flask import current_app, jsonify

from cds_service.adapters.access_log import AccessRecorder
from cds_service.web.context import ServiceContext


def ctx() -> ServiceContext:
    return current_app.extensions["cds_triage"]


def access_log() -> AccessRecorder:
    """The access log of patient data (adapters/access_log.py), one per process."""
    return current_app.extensions["cds_access_log"]


def operation_outcome(status: int, message: str, code: str = "processing") -> tuple[Any, int]:
    """An OperationOutcome body: what FHIR-speaking callers expect for an error."""
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": message}],
    }
    response = jsonify(body)
    response.mimetype = "application/fhir+json"
    return response, status
