"""What the trial reads, and from where: standard FHIR R4 searches, paged, and the CDS Hooks audit log.

Every search asks for `_count` resources a page and follows the Bundle's `next` links on the FHIR
base's own origin only (`FhirClient.iter_pages`: a link elsewhere is refused, our token would go with
it). Searches are sent with `Prefer: handling=strict`, and a searchset that carries an
OperationOutcome warning or error (a server that ignored a parameter it does not know, as sekmet does
without strict handling, or an `_include` it does not support) is refused like a 400 answer: a search
that was not run as asked would give figures on the wrong studies. Both are a `SearchRefusedError`
naming the search and the server's words.

The searches (all in R4's list of DiagnosticReport, ImagingStudy, ServiceRequest and Device parameters):
- our AI reports: `DiagnosticReport?identifier=<our result system>|&issued=ge<since>&issued=lt<until>
  &_include=DiagnosticReport:result`;
- the models: `Device?_id=…` (the Observations' devices; sekmet has no `_include` of Observation:device);
- the final reports of the same patients: `DiagnosticReport?subject=Patient/a,Patient/b,…
  &status=final,amended&issued=ge<since>` (R4 has no DiagnosticReport search by ImagingStudy; the
  report is tied to its study or order afterwards, in `studies.py`);
- the orders and studies, for when the wait began: `ServiceRequest?_id=…`, `ImagingStudy?_id=…`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fhir_mappings.conventions import DEFAULT_CONVENTIONS, Conventions

from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.errors import PermanentError, StudyNotFoundError, UpstreamRejectedError

STRICT = {"Prefer": "handling=strict"}
ID_BATCH = 50  # ids per `_id=` / `subject=` search: keeps the URL short for every server and proxy


class SearchRefusedError(PermanentError):
    """The FHIR server refused a search, or did not run it as asked (it lacks a parameter)."""


def _shown(params: Mapping[str, str | Sequence[str]]) -> str:
    """A search's parameters for a message: long id lists as their count."""
    parts = []
    for name, value in params.items():
        for one in [value] if isinstance(value, str) else value:
            items = one.split(",")
            parts.append(f"{name}={one}" if len(items) <= 3 else f"{name}=<{len(items)} values>")
    return "&".join(parts)


def _outcome_problems(bundle: Mapping[str, Any]) -> list[str]:
    """The warnings and errors a searchset carries (OperationOutcome entries)."""
    found = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "OperationOutcome":
            found += [str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code"))
                      for i in resource.get("issue") or [] if isinstance(i, dict)
                      and i.get("severity") in ("warning", "error", "fatal")]
    return found


class TrialReader:
    """The trial's searches on one FHIR server, with a progress bar on a terminal."""

    def __init__(self, fhir: FhirClient, *, page_size: int = 100, progress: bool = False,
                 conventions: Conventions = DEFAULT_CONVENTIONS) -> None:
        self.fhir = fhir
        self.conventions = conventions  # CDS_FHIR_CANONICAL_BASE: the identifier system of our reports
        self.page_size = page_size
        self.progress = progress
        self.searches: list[dict[str, Any]] = []  # what was asked: query, pages, resources

    def search(self, resource_type: str, params: Mapping[str, str | Sequence[str]], what: str) -> list[dict[str, Any]]:
        """Every resource of every page (matches and includes); SearchRefusedError as the module says."""
        from tqdm import tqdm

        params = {**params, "_count": str(self.page_size)}
        query = f"{resource_type}?{_shown(params)}"
        found: list[dict[str, Any]] = []
        pages = 0
        bar = tqdm(desc=f"trial: {what}", unit=" resources", disable=not self.progress, file=sys.stderr, leave=False)
        try:
            for bundle in self.fhir.iter_pages(resource_type, params, headers=STRICT):
                pages += 1
                if pages == 1 and isinstance(bundle.get("total"), int):
                    bar.total = bundle["total"]
                problems = _outcome_problems(bundle)
                if problems:
                    said = " ".join("; ".join(problems).split())
                    raise SearchRefusedError(f"the FHIR server did not run the search {query} as asked: {said[:300]}"
                                             f"{'…' if len(said) > 300 else ''}", server="fhir", url=self.fhir.base_url)
                for entry in bundle.get("entry") or []:
                    resource = entry.get("resource") if isinstance(entry, dict) else None
                    if isinstance(resource, dict) and resource.get("resourceType") != "OperationOutcome":
                        found.append(resource)
                        bar.update(1)
        except (UpstreamRejectedError, StudyNotFoundError) as exc:
            if isinstance(exc, UpstreamRejectedError) and exc.status_code in (401, 403):
                raise  # who we are, not what we asked: `cli.main` names the credential settings
            said = " ".join(str(exc).split())
            raise SearchRefusedError(f"the FHIR server refused the search {query}: {said[:300]}{'…' if len(said) > 300 else ''}",
                                     server="fhir", url=self.fhir.base_url) from None
        finally:
            bar.close()
        self.searches.append({"search": query, "pages": pages, "resources": len(found)})
        return found

    def ai_reports(self, since: str, until: str | None) -> list[dict[str, Any]]:
        """Our AI DiagnosticReports issued in the period, with their Observations."""
        issued = [f"ge{since}"] + ([f"lt{until}"] if until else [])
        return self.search("DiagnosticReport", {"identifier": f"{self.conventions.result_identifier_system}|", "issued": issued,
                                                "_include": "DiagnosticReport:result"}, "AI reports")

    def final_reports(self, patient_ids: Iterable[str], since: str) -> list[dict[str, Any]]:
        """The final and amended DiagnosticReports of these patients issued since the period began."""
        ids = sorted(set(patient_ids))
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), ID_BATCH):
            batch = ids[start:start + ID_BATCH]
            found += self.search("DiagnosticReport", {"subject": ",".join(f"Patient/{i}" for i in batch),
                                                      "status": "final,amended", "issued": f"ge{since}"}, "final reports")
        return found

    def by_ids(self, resource_type: str, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Resources by id (`_id=a,b,…`), as {id: resource}; ids the server does not have are simply absent."""
        wanted = sorted(set(ids))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(wanted), ID_BATCH):
            batch = wanted[start:start + ID_BATCH]
            for resource in self.search(resource_type, {"_id": ",".join(batch)}, f"{resource_type} resources"):
                if resource.get("resourceType") == resource_type and resource.get("id"):
                    found[str(resource["id"])] = resource
        return found


def read_feedback(data_dir: Path, study_ids: Iterable[str]) -> tuple[list[dict[str, Any]], str]:
    """The CDS Hooks feedback on cards that showed these studies' AI results, from this machine's audit
    log (`<CDS_DATA_DIR>/audit.sqlite3`), and a sentence saying where it came from."""
    from cds_service.adapters.audit import AuditLog

    path = data_dir / "audit.sqlite3"
    if not path.exists():
        return [], f"no CDS Hooks audit log at {path} (CDS_DATA_DIR): no feedback used"
    rows = AuditLog(path).feedback_on_studies(study_ids)
    return rows, f"{len(rows)} CDS Hooks feedback items on these studies' cards, from {path}"

