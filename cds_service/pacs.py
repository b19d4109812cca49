"""The PACS adapter: QIDO-RS to find a study's series, WADO-RS to fetch one series.

A thin layer over `dicomweb-client` whose only job is to turn HTTP trouble into the
service's error kinds: down/5xx/timeouts are transient, 4xx are permanent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from .domain import Series, Study
from .errors import PermanentError, TransientError, UpstreamError, UpstreamRejectedError

MODALITY = "00080060"
SERIES_DESCRIPTION = "0008103E"
BODY_PART = "00180015"
SERIES_UID = "0020000E"
INSTANCES_IN_SERIES = "00201209"


class StudyNotInPacsError(TransientError):
    """QIDO-RS finds no series: the images may still be on their way, so it is retried."""


class StudyTooLargeError(PermanentError):
    """More instances than the configured limit: refused before anything is downloaded."""


@dataclass(frozen=True)
class PacsConfig:
    """Where the PACS is and how to authenticate (basic auth or bearer token)."""

    url: str
    username: str = ""
    password: str = ""
    bearer_token: str = ""
    timeout_s: float = 30.0


def _value(attrs: dict[str, Any], tag: str, default: Any = "") -> Any:
    values = attrs.get(tag, {}).get("Value") or [default]
    return values[0]


def series_from_qido(attrs: dict[str, Any]) -> Series:
    """One QIDO-RS series result (DICOM JSON) as a Series."""
    return Series(
        uid=str(_value(attrs, SERIES_UID)),
        modality=str(_value(attrs, MODALITY)),
        body_part=str(_value(attrs, BODY_PART)),
        description=str(_value(attrs, SERIES_DESCRIPTION)),
        number_of_instances=int(_value(attrs, INSTANCES_IN_SERIES, 0) or 0),
    )


class Pacs:
    """A DICOMweb PACS (Orthanc, dcm4chee, a cloud archive…)."""

    def __init__(self, config: PacsConfig) -> None:
        session = requests.Session()
        if config.username:
            session.auth = (config.username, config.password)
        if config.bearer_token:
            session.headers["Authorization"] = f"Bearer {config.bearer_token}"
        self.config = config
        self.client = DICOMwebClient(url=config.url.rstrip("/"), session=session, timeout=config.timeout_s)

    def find_study(self, study_uid: str) -> Study:
        """The study's series from QIDO-RS; StudyNotInPacsError when there are none."""
        fields = [MODALITY, SERIES_DESCRIPTION, BODY_PART, INSTANCES_IN_SERIES]
        results = self._call(lambda: self.client.search_for_series(study_uid, fields=fields), study_uid)
        if not results:
            raise StudyNotInPacsError(f"study not found in the PACS at {self.config.url}")
        return Study(uid=study_uid, series=tuple(series_from_qido(attrs) for attrs in results))

    def retrieve_series(self, study_uid: str, series: Series, max_instances: int) -> list[pydicom.Dataset]:
        """Every instance of one series over WADO-RS, in the stored transfer syntax."""
        if series.number_of_instances > max_instances:
            raise StudyTooLargeError(
                f"series has {series.number_of_instances} instances, above the limit of {max_instances}"
            )
        datasets = self._call(
            lambda: self.client.retrieve_series(study_uid, series.uid, media_types=(("application/dicom", "*"),)),
            study_uid,
        )
        if len(datasets) > max_instances:
            raise StudyTooLargeError(f"series has {len(datasets)} instances, above the limit of {max_instances}")
        if not datasets:
            raise StudyNotInPacsError("series has no instances in the PACS")
        return datasets

    def _call(self, request: Any, study_uid: str) -> Any:
        try:
            return request()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 404:
                raise StudyNotInPacsError(f"PACS answered 404 for the study at {self.config.url}") from exc
            if status in (408, 429) or status >= 500:
                raise UpstreamError(f"PACS answered {status}") from exc
            raise UpstreamRejectedError(f"PACS refused the request with {status}", status) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise UpstreamError(f"PACS unreachable at {self.config.url}: {type(exc).__name__}") from exc
        except (ValueError, pydicom.errors.InvalidDicomError) as exc:
            raise PermanentError(f"PACS sent data that could not be parsed: {exc}") from exc


def sort_slices(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Slices in anatomical order (ImagePositionPatient z, else InstanceNumber)."""

    def key(ds: pydicom.Dataset) -> tuple[float, float]:
        position = getattr(ds, "ImagePositionPatient", None)
        z = float(position[2]) if position is not None and len(position) == 3 else 0.0
        return (z, float(getattr(ds, "InstanceNumber", 0) or 0))

    return sorted(datasets, key=key)
