"""The PACS adapter against a real Orthanc: a series streams instance by instance, within limits."""

from __future__ import annotations

import http.server
import threading

import numpy as np
import pydicom
import pytest

from cds_devtools.devservers import upload_dicom
from cds_devtools.dicom_data import make_dataset
from cds_service.core.domain import Series
from cds_devtools.devservers import free_port
from cds_service.adapters.pacs import Pacs, PacsConfig, StudyNotInPacsError, StudyTooLargeError, slice_order, sort_slices
from cds_service.core.errors import UpstreamError

pytestmark = pytest.mark.integration


def stored_series(orthanc, count: int) -> tuple[str, str, list[pydicom.Dataset]]:
    """`count` CT slices uploaded in reverse anatomical order (the PACS need not sort them)."""
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    rng = np.random.default_rng(count)
    datasets = [make_dataset(rng.integers(0, 2000, (32, 32)).astype(np.uint16), modality="CT", body_part="HEAD",
                             study_uid=study_uid, series_uid=series_uid, instance_number=count - index,
                             rescale_slope=1, rescale_intercept=-1024)
                for index in range(count)]
    upload_dicom(orthanc.url, datasets)
    return study_uid, series_uid, datasets


def series(uid: str, count: int = 0) -> Series:
    return Series(uid=uid, modality="CT", body_part="HEAD", description="", number_of_instances=count)


def test_a_series_streams_every_instance_and_sorts_anatomically(orthanc):
    study_uid, series_uid, uploaded = stored_series(orthanc, 5)
    pacs = Pacs(PacsConfig(url=orthanc.dicomweb_url))
    streamed = list(pacs.iter_series(study_uid, series(series_uid, 5), max_instances=5))
    assert sorted(ds.SOPInstanceUID for ds in streamed) == sorted(ds.SOPInstanceUID for ds in uploaded)
    ordered = sort_slices(streamed)
    assert [int(ds.InstanceNumber) for ds in ordered] == [1, 2, 3, 4, 5]
    assert [streamed[index] for index in slice_order(streamed)] == ordered


def test_limits_stop_the_stream(orthanc):
    study_uid, series_uid, _ = stored_series(orthanc, 4)
    pacs = Pacs(PacsConfig(url=orthanc.dicomweb_url))
    with pytest.raises(StudyTooLargeError, match="4 instances"):  # QIDO's count: refused before any transfer
        next(pacs.iter_series(study_uid, series(series_uid, 4), max_instances=3))
    stream = pacs.iter_series(study_uid, series(series_uid, 0), max_instances=3)  # count unknown: stops at the 4th
    assert len([next(stream) for _ in range(3)]) == 3
    with pytest.raises(StudyTooLargeError, match="more than 3 instances"):
        next(stream)
    small = Pacs(PacsConfig(url=orthanc.dicomweb_url, max_series_bytes=3 * 32 * 32 * 2))
    with pytest.raises(StudyTooLargeError, match="CDS_MAX_SERIES_BYTES"):
        list(small.iter_series(study_uid, series(series_uid, 4), max_instances=10))


def test_a_series_the_pacs_does_not_have(orthanc):
    study_uid, _, _ = stored_series(orthanc, 1)
    pacs = Pacs(PacsConfig(url=orthanc.dicomweb_url))
    with pytest.raises(StudyNotInPacsError):
        list(pacs.iter_series(study_uid, series(pydicom.uid.generate_uid()), max_instances=10))


def test_a_pacs_fault_ends_the_attempt_at_once_and_the_job_retries_it():
    """503, then a PACS that is down: one request each, an UpstreamError (retryable: the job retries with backoff),
    never dicomweb-client's own five tries over 30 s."""
    requests_seen: list[str] = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            requests_seen.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pacs = Pacs(PacsConfig(url=f"http://127.0.0.1:{server.server_address[1]}/dicom-web"))
        with pytest.raises(UpstreamError, match="503"):
            pacs.find_study("1.2.3")
        assert len(requests_seen) == 1
    finally:
        server.shutdown()
        server.server_close()
    down = Pacs(PacsConfig(url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=5))
    with pytest.raises(UpstreamError, match="unreachable"):
        down.find_study("1.2.3")
