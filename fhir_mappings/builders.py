"""Pure builders: one study's TriageResult becomes FHIR R4B resources and one transaction.

This module is the facade: the names other code imports (`from fhir_mappings.builders import ...`).
The code is split per resource type, each module on its own:

| module | what |
|---|---|
| `conventions.py` | the canonical base (CDS_FHIR_CANONICAL_BASE) and AI security label: every URL we mint |
| `common.py` | shared pieces: references, the AI security label, the narrative, the probability quantity, checks |
| `identifiers.py` | the deterministic identifiers that make a repeated job create nothing |
| `device.py`, `observation.py`, `media.py`, `diagnostic_report.py`, `provenance.py` | one resource each |
| `transaction.py` | all of one study's results as one transaction of conditional creates |
| `subscription.py` | the rest-hook Subscription of `cds-triage subscribe` |
| `service_request.py` | raising ServiceRequest.priority, and reading back what the AI changed |
| `reading.py` | FHIR ids, references, dateTimes and the Study Instance UID of an ImagingStudy |

No I/O and no HTTP anywhere here: every function takes plain values and returns `fhir.resources`
R4B models, which validate themselves on construction.
"""

from __future__ import annotations

from .common import AI_DISCLAIMER, SHADOW_SENTENCE, UNFAMILIAR_SENTENCE, finding_code, is_shadow, is_unfamiliar
from .device import build_device
from .diagnostic_report import build_conclusion, build_diagnostic_report
from .identifiers import device_identifier, full_url, identifier_query, result_identifier
from .media import build_media, heatmap_source_instance
from .observation import build_observation
from .provenance import build_provenance
from .reading import is_fhir_id, parse_fhir_datetime, reference_id, study_uid_from_imaging_study
from .service_request import ai_priority_change, with_priority
from .subscription import DEFAULT_SUBSCRIPTION_REASON, SUBSCRIPTION_SECRET_HEADER, build_subscription, is_our_subscription
from .transaction import build_triage_transaction

__all__ = [
    "AI_DISCLAIMER", "DEFAULT_SUBSCRIPTION_REASON", "SHADOW_SENTENCE", "UNFAMILIAR_SENTENCE", "SUBSCRIPTION_SECRET_HEADER", "ai_priority_change", "build_conclusion", "build_device", "build_diagnostic_report",
    "build_media", "build_observation", "build_provenance", "build_subscription", "build_triage_transaction",
    "device_identifier", "finding_code", "full_url", "heatmap_source_instance", "identifier_query", "is_fhir_id",
    "is_our_subscription", "is_shadow", "is_unfamiliar", "parse_fhir_datetime", "reference_id", "result_identifier", "study_uid_from_imaging_study",
    "with_priority",
]
