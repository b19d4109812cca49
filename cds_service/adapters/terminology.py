"""Does the FHIR server's terminology know our AI security label? (`cds-triage subscribe`, /readyz)

HAPI FHIR 8.8.0 bundles a 2018 copy of HL7's v3-ObservationValue, which lacks AIAST: a server that
validates writes refuses every result we write until its terminology is current (or the site adds or
substitutes its own label, CDS_AI_SECURITY_LABEL). We keep writing AIAST (the standard), and say
whether the server knows it: `GET CodeSystem/$validate-code?url=<system>&code=<code>` for each
label. A server without the operation (sekmet answers 404) gives "could not check", not a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir_mappings.conventions import Conventions, SecurityLabel

from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.errors import StudyNotFoundError, TriageError, UpstreamRejectedError

ADVICE = ("a server that validates writes will refuse our results: load current HL7 terminology "
          "(hl7.terminology.r4) into its validator, or add or substitute a label it knows with "
          "CDS_AI_SECURITY_LABEL (docs/fhir.md)")


@dataclass(frozen=True)
class LabelCheck:
    """What the server said about one AI security label: known True/False, None when it could not tell."""

    label: SecurityLabel
    known: bool | None
    detail: str

    def line(self) -> str:
        name = f"{self.label.system}|{self.label.code}"
        if self.known:
            return f"AI security label {name}: known to the FHIR server's terminology"
        if self.known is False:
            return f"AI security label {name}: NOT known to the FHIR server's terminology ({self.detail}); {ADVICE}"
        return f"AI security label {name}: could not check ({self.detail})"

    def to_json(self) -> dict[str, Any]:
        return {"system": self.label.system, "code": self.label.code, "known": self.known, "detail": self.detail}


def _parameter(parameters: dict[str, Any], name: str) -> Any:
    for parameter in parameters.get("parameter") or []:
        if isinstance(parameter, dict) and parameter.get("name") == name:
            return next((v for k, v in parameter.items() if k.startswith("value")), None)
    return None


def check_label(fhir: FhirClient, label: SecurityLabel) -> LabelCheck:
    """Ask the server's `CodeSystem/$validate-code` whether it knows `label`."""
    try:
        answer = fhir.operation("CodeSystem/$validate-code", {"url": label.system, "code": label.code})
    except StudyNotFoundError:  # 404 (sekmet): no such operation
        return LabelCheck(label, None, "CodeSystem/$validate-code answered 404")
    except UpstreamRejectedError as exc:  # 400, 405, 501: no such operation, or not for this system
        return LabelCheck(label, None, f"CodeSystem/$validate-code answered {exc.status_code}")
    except TriageError as exc:  # unreachable, timed out, 5xx
        return LabelCheck(label, None, str(exc)[:200])
    result = _parameter(answer, "result") if answer.get("resourceType") == "Parameters" else None
    if not isinstance(result, bool):
        return LabelCheck(label, None, f"CodeSystem/$validate-code gave no result ({answer.get('resourceType')})")
    message = _parameter(answer, "message")
    return LabelCheck(label, result, str(message)[:200] if message else "$validate-code: " + str(result).lower())


def check_ai_labels(fhir: FhirClient, conventions: Conventions) -> list[LabelCheck]:
    """Each AI security label we write, checked against the server's terminology."""
    return [check_label(fhir, label) for label in conventions.ai_labels]
