"""A brief fuzz pass (hypothesis) over what outsiders send us: notification bodies, CDS Hooks
requests and DICOM bytes. Each parser must answer with its own error kind, never crash with
anything else (a 500 in the service). Bounded: a few hundred examples each, seconds in CI."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.web.api import imaging_study_ids
from cds_service.web.cds_hooks.calls import HookCallError, parse_hook_call
from cds_service.web.cds_hooks.services import SERVICES
from cds_service.core.errors import BadDicomError
from cds_service.core.preprocessing import PreprocessingSpec, dicom_to_image, read_dicom

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(["resourceType", "id", "entry", "resource", "fullUrl", "hook", "hookInstance", "context",
                        "prefetch", "fhirServer", "fhirAuthorization", "patientId", "imagingStudyId", "access_token"])
SHAPED = st.recursive(
    st.none() | st.text(max_size=12) | st.sampled_from(["ImagingStudy", "Bundle", "..", "imagingstudy-create"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=5)
    # resource-like dicts: a Bundle with entries is otherwise about 1 example in 5,000
    | st.fixed_dictionaries({"resourceType": st.sampled_from(["Bundle", "ImagingStudy"])},
                            optional={"entry": st.lists(children, max_size=3), "resource": children, "id": children,
                                      "fullUrl": children}),
    max_leaves=20,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=JSON | SHAPED, path=st.text(max_size=40))
def test_notification_parsing_only_ever_says_value_error(body, path) -> None:
    try:
        ids = imaging_study_ids(body, path)
    except ValueError:
        return
    assert ids is None or all(isinstance(i, str) for i in ids)


@FUZZ
@given(body=JSON | SHAPED, service=st.sampled_from(sorted(SERVICES)))
def test_hook_request_parsing_only_ever_says_hook_call_error(body, service) -> None:
    try:
        parse_hook_call(body, SERVICES[service])
    except HookCallError as exc:
        assert 400 <= exc.status < 500


@FUZZ
@given(data=st.binary(max_size=600))
def test_dicom_bytes_only_ever_say_bad_dicom(data) -> None:
    spec = PreprocessingSpec(kind="ct_windows", input_size=32, windows=((40.0, 80.0),) * 3)
    try:
        dicom_to_image(read_dicom(b"\0" * 128 + b"DICM" + data), spec)
    except BadDicomError:
        pass


@pytest.mark.parametrize("mutation", range(40))
def test_mutated_real_dicom_only_ever_says_bad_dicom(mutation: int) -> None:
    """A valid JPEG-LS CT slice with a few bytes changed: decoded, or refused clearly."""
    import numpy as np

    from cds_devtools.dicom_data import dicom_bytes, encoder_available, make_dataset

    if not encoder_available("jpegls"):
        pytest.skip("no JPEG-LS encoder")
    pixels = (np.arange(64 * 64).reshape(64, 64) % 3000).astype(np.uint16)
    blob = bytearray(dicom_bytes(make_dataset(pixels, modality="CT", transfer_syntax="jpegls", bits_stored=12)))
    rng = np.random.default_rng(mutation)
    for at in rng.integers(132, len(blob), 3):
        blob[at] = int(rng.integers(0, 256))
    spec = PreprocessingSpec(kind="ct_windows", input_size=32, windows=((40.0, 80.0),) * 3)
    try:
        dicom_to_image(read_dicom(bytes(blob)), spec)
    except BadDicomError:
        pass


def test_the_fuzz_strategies_reach_the_interesting_shapes() -> None:
    """The generators do produce Bundles with entries (else the fuzz tests would prove little).

    The search stops at the first one (shrinking it to the smallest such Bundle cost minutes and proved
    nothing more) and needs no example database (a fresh checkout has none)."""
    from hypothesis import Phase, find

    search = settings(max_examples=2000, database=None, phases=[Phase.generate])
    found = find(SHAPED, lambda x: isinstance(x, dict) and x.get("resourceType") == "Bundle" and bool(x.get("entry")),
                 settings=search)
    assert json.dumps(found)
