# Over 400 lines on purpose: every DICOMweb call and the multipart/related reader they stream through, with their
# error mapping in one place; to split next: the multipart reader (multipart_parts, require_complete_multipart).
"""The PACS adapter: QIDO-RS to find a study's series, WADO-RS to fetch one series.

A thin layer over `dicomweb-client` whose only job is to turn HTTP trouble into the
service's error kinds: down/5xx/timeouts are transient, 4xx are permanent.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Generator, Iterator, Sequence

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from fhir_mappings.imaging_study import dicom_datetime

from cds_service.core.domain import Series, Study
from cds_service.core.errors import (BadDicomError, PermanentError, StudyNotFoundError, StudyTooLargeError, TransientError, TriageError,
                                     UpstreamError, UpstreamRedirectError, UpstreamRejectedError, is_redirect_status, is_retryable_status)
from cds_service.core.decoding import known_position, positions_order, slice_position
from cds_service.adapters.metrics import count_upstream_error
from cds_service.core.preprocessing import decode_cost, instance_bytes
from cds_service.core.settings import Settings

MODALITY = "00080060"
SERIES_DESCRIPTION = "0008103E"
BODY_PART = "00180015"
SERIES_UID = "0020000E"
INSTANCES_IN_SERIES = "00201209"
PROTOCOL_NAME = "00181030"
STUDY_DESCRIPTION = "00081030"
REQUESTED_PROCEDURE = "00321060"
ANATOMIC_REGION = "00082218"
INSTANCE_NUMBER = "00200013"
IMAGE_POSITION = "00200032"
SOP_UID = "00080018"
ACQUIRED = (("00080021", "00080031", "00080201"), ("00080020", "00080030", "00080201"))  # Series/Study Date, Time, zone
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'  # WADO-RS, in the stored syntax
UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
# DICOM coding schemes of body parts, as FHIR systems
CODING_SCHEMES = {"SCT": "http://snomed.info/sct", "SRT": "http://snomed.info/sct", "LN": "http://loinc.org",
                  "RADLEX": "http://www.radlex.org"}


class StudyNotInPacsError(TransientError):
    """QIDO-RS finds no series: the images may still be on their way, so it is retried."""


__all__ = ["Pacs", "PacsConfig", "pacs_from_settings", "StudyNotInPacsError", "StudyTooLargeError", "instance_bytes",
           "positions_order", "slice_order", "sort_slices"]


def place_from_qido(attrs: dict[str, Any]) -> tuple[str, tuple[float, float] | None]:
    """One QIDO-RS instance result (DICOM JSON) as (SOP Instance UID, `decoding.known_position`): placed by
    the rule the decoded slices are ordered by; an unreadable position is no position."""
    try:
        ds = pydicom.Dataset.from_json({tag: attrs[tag] for tag in (SOP_UID, INSTANCE_NUMBER, IMAGE_POSITION) if tag in attrs})
        return str(getattr(ds, "SOPInstanceUID", "") or ""), known_position(ds)
    except (TypeError, ValueError, AttributeError, IndexError):
        return str(_value(attrs, SOP_UID)), None


@dataclass(frozen=True)
class PacsConfig:
    """Where the PACS is and how to authenticate (basic auth or bearer token)."""

    url: str
    username: str = ""
    password: str = ""
    bearer_token: str = ""
    timeout_s: float = 30.0
    max_series_bytes: int = 0  # 0: no limit


def refuse_redirects(response: requests.Response, *args: Any, base_url: str = "", **kwargs: Any) -> requests.Response:
    """A requests hook: a 3xx is never followed (its Location is taken off, so requests does not follow it with our
    credentials) and its `raise_for_status` raises UpstreamRedirectError (errors.is_redirect_status), which every
    call makes after dicomweb-client's own retry loop (that one retries any exception, five times over 30 s)."""
    if is_redirect_status(response.status_code):
        error = UpstreamRedirectError(f"PACS {response.request.method} {response.url.split('?')[0]}", response.status_code,
                                      response.headers.pop("Location", ""), server="pacs", url=base_url)
        count_upstream_error("pacs", f"http_{response.status_code}")

        def raise_for_status() -> None:
            raise error

        response.raise_for_status = raise_for_status  # type: ignore[method-assign]
    return response


def require_complete_multipart(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
    """A requests hook: a multipart body that ends before its closing boundary is an error.

    Orthanc (and others) end a WADO-RS answer by closing the connection, with no length,
    so a PACS that stops mid-transfer looks like a shorter answer; dicomweb-client would
    then hand over the series minus its tail. Raising ChunkedEncodingError makes it a
    transient fault (retried), like any other broken transfer.
    """
    media_type, _, params = response.headers.get("Content-Type", "").partition(";")
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in params.split(";")
                     if p.strip().lower().startswith("boundary=")), "")
    if media_type.strip().lower() != "multipart/related" or not boundary:
        return response
    closing_delimiter = b"--" + boundary.encode() + b"--"
    stream: Callable[..., Iterator[bytes]] = response.iter_content  # read as bytes: the tail below is bytes

    def checked(chunk_size: int | None = 1, decode_unicode: bool = False) -> Any:
        tail = b""
        for chunk in stream(chunk_size, decode_unicode):
            tail = (tail + chunk)[-(len(closing_delimiter) + 1024):]
            yield chunk
        if closing_delimiter not in tail:
            raise requests.exceptions.ChunkedEncodingError("multipart answer ended before its closing boundary")

    response.iter_content = checked  # type: ignore[method-assign]
    return response


def _value(attrs: dict[str, Any], tag: str, default: Any = "") -> Any:
    values = attrs.get(tag, {}).get("Value") or [default]
    return values[0]


def _region_codes(items: Sequence[Any]) -> tuple[tuple[tuple[str, str], ...], str]:
    """AnatomicRegionSequence items (DICOM JSON dicts or pydicom Datasets) as codings and text."""
    codings, meanings = [], []
    for item in items:
        if isinstance(item, dict):
            scheme, code, meaning = (str(_value(item, tag)) for tag in ("00080102", "00080100", "00080104"))
        else:
            scheme, code, meaning = (str(getattr(item, name, "") or "") for name in
                                     ("CodingSchemeDesignator", "CodeValue", "CodeMeaning"))
        if code:
            codings.append((CODING_SCHEMES.get(scheme.upper(), scheme), code))
        meanings.append(meaning)
    return tuple(codings), " ".join(m for m in meanings if m)


def series_from_qido(attrs: dict[str, Any]) -> Series:
    """One QIDO-RS series result (DICOM JSON) as a Series."""
    region, region_text = _region_codes(attrs.get(ANATOMIC_REGION, {}).get("Value") or [])
    return Series(
        uid=str(_value(attrs, SERIES_UID)),
        modality=str(_value(attrs, MODALITY)),
        body_part=str(_value(attrs, BODY_PART)),
        description=str(_value(attrs, SERIES_DESCRIPTION)),
        number_of_instances=int(_value(attrs, INSTANCES_IN_SERIES, 0) or 0),
        protocol=str(_value(attrs, PROTOCOL_NAME)),
        study_description=str(_value(attrs, STUDY_DESCRIPTION)),
        requested_procedure=str(_value(attrs, REQUESTED_PROCEDURE)),
        anatomic_region=region,
        anatomic_region_text=region_text,
        acquired=next(filter(None, (dicom_datetime(*(str(_value(attrs, tag)) for tag in tags)) for tags in ACQUIRED)), ""),
    )


def series_from_dataset(ds: pydicom.Dataset, count: int = 0, fallback_uid: str = "") -> Series:
    """The same description of a series from one of its instances (local files, `cds-triage triage`)."""
    region, region_text = _region_codes(list(ds.get("AnatomicRegionSequence") or []))
    return Series(
        uid=str(getattr(ds, "SeriesInstanceUID", "") or fallback_uid),
        modality=str(getattr(ds, "Modality", "") or ""),
        body_part=str(getattr(ds, "BodyPartExamined", "") or ""),
        description=str(getattr(ds, "SeriesDescription", "") or ""),
        number_of_instances=count,
        protocol=str(getattr(ds, "ProtocolName", "") or ""),
        study_description=str(getattr(ds, "StudyDescription", "") or ""),
        requested_procedure=str(getattr(ds, "RequestedProcedureDescription", "") or ""),
        anatomic_region=region,
        anatomic_region_text=region_text,
    )


def pacs_from_settings(settings: Settings, url: str = "") -> "Pacs":
    """The PACS at `url` (default CDS_DICOMWEB_URL) with the settings' credentials, timeout and series size
    limit: every caller builds its Pacs here, so none drops a limit."""
    return Pacs(PacsConfig(url=url or settings.dicomweb_url, username=settings.dicomweb_username,
                           password=settings.dicomweb_password, bearer_token=settings.dicomweb_bearer_token,
                           timeout_s=settings.http_timeout_s, max_series_bytes=settings.max_series_bytes))


class Pacs:
    """A DICOMweb PACS (Orthanc, dcm4chee, a cloud archive…)."""

    def __init__(self, config: PacsConfig) -> None:
        session = requests.Session()
        # Uncompressed transfers: requests asks for gzip by default, and Orthanc then deflates
        # every instance on the fly. Measured on loopback: one 2,048² X-ray (8 MB) took 0.50 s
        # instead of 0.04 s; DICOM pixel data gains little from gzip for that much CPU.
        session.headers["Accept-Encoding"] = "identity"
        session.hooks["response"].append(partial(refuse_redirects, base_url=config.url))
        session.hooks["response"].append(require_complete_multipart)
        if config.username:
            session.auth = (config.username, config.password)
        if config.bearer_token:
            session.headers["Authorization"] = f"Bearer {config.bearer_token}"
        self.config = config
        self.session = session
        self.client = DICOMwebClient(url=config.url.rstrip("/"), session=session, timeout=config.timeout_s)
        # One retry rule: a transient fault ends this attempt and the job is retried with backoff
        # (errors.is_retryable_status, jobs/queue.py). dicomweb-client's own loop would try every request
        # five times over 30 s first, for any exception: a PACS that is down held each attempt 30 s.
        self.client.set_http_retry_params(retry=False)

    @property
    def _where(self) -> dict[str, Any]:
        """The structured fields of every error about this PACS (errors.TriageError)."""
        return {"server": "pacs", "url": self.config.url}

    def find_study(self, study_uid: str) -> Study:
        """The study's series from QIDO-RS; StudyNotInPacsError when there are none."""
        fields = [MODALITY, SERIES_DESCRIPTION, BODY_PART, INSTANCES_IN_SERIES, PROTOCOL_NAME, STUDY_DESCRIPTION,
                  REQUESTED_PROCEDURE, ANATOMIC_REGION, *{tag for tags in ACQUIRED for tag in tags}]
        results = self._call(lambda: self.client.search_for_series(study_uid, fields=fields), study_uid)
        if not results:
            raise StudyNotInPacsError(f"study not found in the PACS at {self.config.url}", **self._where)
        return Study(uid=study_uid, series=tuple(series_from_qido(attrs) for attrs in results))

    def middle_instance(self, study_uid: str, series: Series) -> pydicom.Dataset:
        """One instance from the middle of a series (by InstanceNumber): a cheap look at its pixels
        when neither the DICOM header nor the EHR says what the series shows."""
        found = self._call(lambda: self.client.search_for_instances(study_uid, series.uid,
                                                                    fields=[INSTANCE_NUMBER]), study_uid)
        if not found:
            raise StudyNotInPacsError("series has no instances in the PACS", **self._where)

        def number(attrs: dict[str, Any]) -> tuple[int, str]:
            try:
                return int(_value(attrs, INSTANCE_NUMBER, 0) or 0), str(_value(attrs, SOP_UID))
            except (TypeError, ValueError):
                return 0, str(_value(attrs, SOP_UID))

        middle = sorted(found, key=number)[len(found) // 2]
        ds = self._call(lambda: self.client.retrieve_instance(study_uid, series.uid, str(_value(middle, SOP_UID))),
                        study_uid)
        if self.config.max_series_bytes and max(instance_bytes(ds), decode_cost(ds)) > self.config.max_series_bytes:
            raise StudyTooLargeError(f"an instance is larger than the limit of {self.config.max_series_bytes} bytes "
                                     "(CDS_MAX_SERIES_BYTES)")
        return ds

    def instance_places(self, study_uid: str, series_uid: str) -> list[tuple[str, tuple[float, float] | None]]:
        """The series' instances as (SOP Instance UID, position or None) from QIDO-RS, ImagePositionPatient
        and InstanceNumber asked for: the slab plan is made before any pixel is fetched. Orthanc answers
        from its index (both are main instance tags); a PACS that leaves the position out: no slabs."""
        found = self._call(lambda: self.client.search_for_instances(
            study_uid, series_uid, fields=[INSTANCE_NUMBER, IMAGE_POSITION]), study_uid)
        return [place_from_qido(attrs) for attrs in found or []]

    def iter_series_parts(self, study_uid: str, series: Series, max_instances: int) -> Iterator[bytes]:
        """The series' instances as WADO-RS delivers them, each as its Part-10 bytes in the stored transfer
        syntax, unparsed (the pipeline's decoder processes parse them), so the caller can work on each
        while the next is on its way. Stops with StudyTooLargeError as soon as the instance limit is
        passed; transfer faults are mapped like every other call."""
        if series.number_of_instances > max_instances:
            raise StudyTooLargeError(
                f"series has {series.number_of_instances} instances, above the limit of {max_instances}"
            )
        parts = self._parts("studies", study_uid, "series", series.uid)
        count = 0
        while (part := self._call(lambda: next(parts, None), study_uid)) is not None:
            count += 1
            if count > max_instances:
                parts.close()
                raise StudyTooLargeError(f"series has more than {max_instances} instances, above the limit")
            yield part
        if not count:
            raise StudyNotInPacsError("series has no instances in the PACS", **self._where)

    def iter_series(self, study_uid: str, series: Series, max_instances: int) -> Iterator[pydicom.Dataset]:
        """`iter_series_parts`, each instance parsed; also stops when the series passes CDS_MAX_SERIES_BYTES."""
        total = 0
        for count, part in enumerate(self.iter_series_parts(study_uid, series, max_instances), start=1):
            ds = self._call(lambda part=part: pydicom.dcmread(io.BytesIO(part)), study_uid)
            total += instance_bytes(ds)
            self.check_series_bytes(total, count)
            yield ds

    def check_series_bytes(self, total: int, count: int) -> None:
        """StudyTooLargeError once the first `count` instances weigh more than CDS_MAX_SERIES_BYTES."""
        if self.config.max_series_bytes and total > self.config.max_series_bytes:
            raise StudyTooLargeError(f"series is larger than the limit of {self.config.max_series_bytes} bytes "
                                     f"(CDS_MAX_SERIES_BYTES) after {count} instances")

    def series_instances(self, study_uid: str, series_uid: str) -> list[tuple[str, str]]:
        """The series' instances as (SOP Class UID, SOP Instance UID), from QIDO-RS: a report's evidence."""
        found = self._call(lambda: self.client.search_for_instances(study_uid, series_uid), study_uid)
        return [(str(_value(a, "00080016")), str(_value(a, SOP_UID))) for a in found or [] if _value(a, SOP_UID)]  # SOP Class

    def retrieve_part(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> bytes:
        """One instance's Part-10 bytes in its stored transfer syntax (a slice fetched again: the few the
        input check and the explanation need after a series was streamed and forgotten)."""
        parts = self._parts("studies", study_uid, "series", series_uid, "instances", sop_instance_uid)
        try:
            part = self._call(lambda: next(parts, None), study_uid)
        finally:
            parts.close()
        if part is None:
            raise StudyNotInPacsError("instance not in the PACS any more", **self._where)
        return part

    def study_metadata(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's instances' headers as DICOM JSON (WADO-RS metadata); StudyNotFoundError when the PACS
        lacks the study (404, 410 or an empty answer)."""
        try:
            items = self.client.retrieve_study_metadata(study_uid)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (404, 410):
                raise StudyNotFoundError(f"study not found in the PACS at {self.config.url}", **self._where) from exc
            if is_retryable_status(status):
                raise UpstreamError(f"PACS answered {status} to WADO-RS metadata", **self._where) from exc
            raise UpstreamRejectedError(f"PACS refused WADO-RS metadata with {status}", status, **self._where) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise UpstreamError(f"PACS unreachable at {self.config.url}: {type(exc).__name__}", **self._where) from exc
        if not items:
            raise StudyNotFoundError(f"study not found in the PACS at {self.config.url}", **self._where)
        return list(items)

    def store(self, dataset: pydicom.Dataset) -> None:
        """STOW-RS one instance into its study; UpstreamError / UpstreamRejectedError when the PACS says no
        (an answer that lists the instance as failed is a refusal, 409)."""
        try:
            response = self.client.store_instances(datasets=[dataset], study_instance_uid=str(dataset.StudyInstanceUID))
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if is_retryable_status(status):
                raise UpstreamError(f"PACS answered {status} to STOW-RS", **self._where) from exc
            raise UpstreamRejectedError(f"PACS refused the instance with {status}", status, **self._where) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise UpstreamError(f"PACS unreachable for STOW-RS: {type(exc).__name__}", **self._where) from exc
        failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
        if failed:
            reason = getattr(failed[0], "FailureReason", "?")
            raise UpstreamRejectedError(f"PACS did not store the instance (failure reason {reason})", 409, **self._where)

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> pydicom.Dataset:
        """One instance, parsed (WADO-RS); HTTP trouble is left as requests raises it (the worklist answers 502)."""
        return self.client.retrieve_instance(study_uid, series_uid, sop_instance_uid)

    def series_of_instance(self, study_uid: str, sop_instance_uid: str) -> str | None:
        """The series UID of one instance, from QIDO-RS; None when the PACS does not list it."""
        found = self.client.search_for_instances(study_uid, search_filters={"SOPInstanceUID": sop_instance_uid})
        values = [((item.get(SERIES_UID) or {}).get("Value") or [None])[0] for item in found or []]
        return next((str(v) for v in values if v), None)

    def _parts(self, *path: str) -> Generator[bytes, None, None]:
        """GET a WADO-RS resource as stored; its multipart body's parts, as they arrive (a generator:
        nothing is sent before the first `next`)."""
        for uid in path[1::2]:
            if not UID_PATTERN.fullmatch(uid) or len(uid) > 64:
                raise PermanentError(f"not a DICOM UID: {uid[:80]!r}")
        url = "/".join([self.config.url.rstrip("/"), *path])
        response = self.session.get(url, headers={"Accept": AS_STORED}, stream=True, timeout=self.config.timeout_s)
        with response:
            response.raise_for_status()
            yield from multipart_parts(response)

    def _call(self, request: Any, study_uid: str) -> Any:
        try:
            return request()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            count_upstream_error("pacs", f"http_{status}")
            if status == 404:
                raise StudyNotInPacsError(f"PACS answered 404 for the study at {self.config.url}", **self._where) from exc
            if is_retryable_status(status):
                raise UpstreamError(f"PACS answered {status}", **self._where) from exc
            raise UpstreamRejectedError(f"PACS refused the request with {status}", status, **self._where) from exc
        except requests.Timeout as exc:
            count_upstream_error("pacs", "timeout")
            raise UpstreamError(f"PACS timed out at {self.config.url}: {type(exc).__name__}", **self._where) from exc
        except requests.exceptions.ChunkedEncodingError as exc:
            count_upstream_error("pacs", "cut_short")
            raise UpstreamError(f"PACS transfer was cut short at {self.config.url}: {exc}", **self._where) from exc
        except requests.RequestException as exc:  # refused, reset
            count_upstream_error("pacs", "unreachable")
            raise UpstreamError(f"PACS unreachable at {self.config.url}: {type(exc).__name__}", **self._where) from exc
        except TriageError:
            raise
        except (ValueError, pydicom.errors.InvalidDicomError) as exc:
            raise PermanentError(f"PACS sent data that could not be parsed: {exc}") from exc
        except Exception as exc:  # pydicom raises many kinds on a malformed object
            raise BadDicomError(f"PACS sent a DICOM object that could not be read: {type(exc).__name__}: {exc}") from exc


def multipart_parts(response: requests.Response, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The bodies of a multipart/related answer's parts, each as soon as its closing delimiter arrived
    (a non-multipart application/dicom answer, which some servers send for one instance: its body)."""
    media_type, _, params = response.headers.get("Content-Type", "").partition(";")
    media_type = media_type.strip().lower()
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in params.split(";")
                     if p.strip().lower().startswith("boundary=")), "")
    if media_type == "application/dicom":
        yield response.content
        return
    if media_type != "multipart/related" or not boundary:
        raise ValueError(f"expected a multipart/related answer, got {media_type or 'no content type'}")
    delimiter = b"\r\n--" + boundary.encode()
    data = bytearray(b"\r\n")  # so the opening boundary reads like every other delimiter
    search = 0
    for chunk in response.iter_content(chunk_size=chunk_size):
        data += chunk
        start = 0
        while (end := data.find(delimiter, search)) >= 0:
            part = data[start:end]
            start = search = end + len(delimiter)
            header_end = part.find(b"\r\n\r\n")
            if header_end >= 0:  # the preamble and the closing "--" carry no headers
                yield bytes(part[header_end + 4:])
        if start:
            del data[:start]
        search = max(0, len(data) - len(delimiter) + 1)


def slice_order(datasets: Sequence[pydicom.Dataset]) -> list[int]:
    """Indices of the slices in anatomical order (ImagePositionPatient z, else InstanceNumber)."""
    return positions_order([slice_position(ds) for ds in datasets])


def sort_slices(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Slices in anatomical order (see slice_order)."""
    return [datasets[index] for index in slice_order(datasets)]
