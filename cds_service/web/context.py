"""What request handlers and workers share: the settings, the job store and the queue (one per process).

No Flask here: the worker builds one too (for the arrival task) without the web app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import httpx

from cds_service.adapters.fhir_client import FhirClient
from cds_service.jobs.state import BaseJobStore, Job, TriageRequest
from cds_service.core.settings import Settings


@dataclass
class ServiceContext:
    """What request handlers need, built once per process and kept on the app."""

    settings: Settings
    store: BaseJobStore
    enqueue: Callable[[str], Any]
    model_set: str
    #: SMART Backend Services auth for our FHIR server, shared so its token cache serves every request.
    fhir_auth: httpx.Auth | None = None

    def __post_init__(self) -> None:
        if self.fhir_auth is None:
            from cds_service.adapters.smart_auth import fhir_auth

            self.fhir_auth = fhir_auth(self.settings)

    def fhir(self) -> FhirClient:
        return FhirClient(self.settings.fhir_base_url, timeout_s=self.settings.http_timeout_s, auth=self.fhir_auth,
                          bearer_token=self.settings.fhir_bearer_token)

    def submit(self, request: TriageRequest) -> tuple[Job, bool]:
        """Persist the job, then queue it; a duplicate trigger returns the existing job."""
        job, needs_queueing = self.store.submit(request, self.model_set)
        if needs_queueing:
            self.enqueue(job.id)
        return job, needs_queueing
