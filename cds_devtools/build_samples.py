"""Regenerate the demo DICOM studies in cds_service/samples/ from the shared data set.

    .venv/bin/python cds_devtools/build_samples.py [--data ../shared/data] [--repick]

What to build comes from cds_service/samples/manifest.json: a list of studies, each with its
`folder`, the patient, the series tags, the expected finding and `source_files` (paths relative
to the data folder). An entry whose `source_files` is empty, or every entry with --repick, gets its
files from its `pick` rule (the first `count` files of `folder` in sorted name order; with
`"split": "validation"` only those of the models' validation split).
To use other images, edit `source_files` and run the script again.

Output is deterministic: UIDs are derived from the study folder name and file position, dates
are fixed, so rebuilding from the same sources gives the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID, generate_uid

PROJECT = Path(__file__).resolve().parents[1]
HERE = PROJECT / "cds_service" / "samples"  # the sample studies and their manifest
DEFAULT_DATA = PROJECT.parent / "shared" / "data"
MANIFEST = HERE / "manifest.json"
UID_SEED = "cds-triage-samples-v1"
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")

sys.path.insert(0, str(PROJECT))  # run as a plain script from a source checkout
from cds_devtools.dicom_data import dicom_bytes, image_to_dicom, make_dataset  # noqa: E402


def uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[UID_SEED, *map(str, parts)])


def pick(data: Path, rule: dict, task_name: str) -> list[str]:
    """The first `count` files of `folder` in sorted name order. With `"split"` ("validation" or
    "test"), only files of that split of the shipped model's card (rebuilt with
    `datasets.build_split`, so never trained on); with `"where"` ({label: 0|1}), only files whose
    truth says so (for the RSNA labels.csv and the chest X-ray folders)."""
    folder = data / rule["folder"]
    files = sorted(p for p in folder.glob(rule.get("glob", "*")) if p.is_file())
    if rule.get("split") in ("validation", "test"):
        from cds_training.datasets import build_split, resolve_data_dir
        from cds_service.core.domain import TASK_LABELS, Task

        task = Task(task_name)
        card = json.loads((PROJECT / "weights" / f"{task.value}.json").read_text())
        card_dir = data if card["data"].get("layout") == "rsna_sources" else data / Path(card["data"]["dir"]).name
        task_dir = resolve_data_dir(task, card_dir)
        _, val, test = build_split(task, task_dir, card["data"]["split"])
        chosen = val if rule["split"] == "validation" else test
        labels = TASK_LABELS[task]
        where = rule.get("where", {})
        wanted = {(task_dir / s.rel).resolve() for s in chosen
                  if all(s.known[labels.index(k)] and int(s.targets[labels.index(k)] > 0.5) == v for k, v in where.items())}
        files = [p for p in files if p.resolve() in wanted]
    if len(files) < rule["count"]:
        raise SystemExit(f"{folder}: need {rule['count']} files, found {len(files)}")
    return [str(p.relative_to(data)) for p in files[: rule["count"]]]


def truth_labels(data: Path, task_name: str, files: list[str]) -> list[str]:
    """The labels positive on any of `files` (from the data's own labels), in the model's order."""
    from cds_training.datasets import discover_samples, resolve_data_dir
    from cds_service.core.domain import NEGATIVE_LABELS, TASK_LABELS, Task

    task = Task(task_name)
    task_dir = resolve_data_dir(task, data / Path(files[0]).parts[0])
    wanted = {(data / f).resolve() for f in files}
    samples = [s for s in discover_samples(task, task_dir) if s.path.resolve() in wanted]
    labels = TASK_LABELS[task]
    return [label for j, label in enumerate(labels)
            if label not in NEGATIVE_LABELS and any(s.known[j] and s.targets[j] > 0.5 for s in samples)]


SEX = {"male": "M", "female": "F", "other": "O"}


def dicom_patient(study: dict) -> dict:
    """Manifest patient ("Given Family", FHIR gender/birth date) in DICOM form."""
    given, _, family = study["patient_name"].partition(" ")
    return dict(
        patient_name=f"{family}^{given}" if family else given,
        patient_id=study["patient_id"],
        patient_birth_date=study.get("birth_date", "").replace("-", ""),
        patient_sex=SEX.get(study.get("gender", ""), ""),
    )


def common_tags(name: str, study: dict, when: datetime) -> dict:
    return dict(
        **dicom_patient(study),
        accession_number=study["accession_number"],
        study_description=study.get("study_description", ""),
        series_description=study["series_description"],
        body_part=study["body_part"],
        study_uid=study["study_instance_uid"],
        series_uid=study["series_instance_uid"],
        frame_of_reference_uid=uid(name, "frame"),
        study_datetime=when,
        institution="CDS Triage Demo Hospital",
        referring_physician="Referrer^Demo",
    )


def build_from_pictures(name: str, study: dict, data: Path, when: datetime) -> list[bytes]:
    """PNG/JPEG files wrapped as one series (CT: grey levels back to HU at the brain window)."""
    out = []
    for i, rel in enumerate(study["source_files"], start=1):
        out.append(
            image_to_dicom(
                data / rel,
                modality=study["modality"],
                window=tuple(study.get("window", (40, 80))),
                instance_number=i,
                sop_instance_uid=uid(name, "instance", i),
                transfer_syntax=study.get("transfer_syntax", "explicit"),
                pixel_spacing=tuple(study.get("pixel_spacing", (0.5, 0.5))),
                **common_tags(name, study, when),
            )
        )
    return out


def build_rsna(name: str, study: dict, data: Path, when: datetime) -> list[bytes]:
    """Real CT slices re-filed as one series: pixel data and its encoding stay untouched.

    Changed: Study/Series UIDs, patient, descriptions, dates, InstanceNumber; added SOPClassUID
    (missing in these files); SOPInstanceUID set to the file's own MediaStorageSOPInstanceUID,
    because the original value ("ID_…") is not a valid UID.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the invalid "ID_…" UIDs warn whenever they are touched
        return [_refile_rsna(name, study, data / rel, i, when) for i, rel in enumerate(study["source_files"], 1)]


def _refile_rsna(name: str, study: dict, path: Path, i: int, when: datetime) -> bytes:
    ds = pydicom.dcmread(path)
    pixel_bytes = ds.PixelData
    sop_uid = str(ds.file_meta.MediaStorageSOPInstanceUID)
    if not UID(sop_uid).is_valid:
        sop_uid = uid(name, "instance", i)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study["study_instance_uid"]
    ds.SeriesInstanceUID = study["series_instance_uid"]
    ds.FrameOfReferenceUID = uid(name, "frame")
    patient = dicom_patient(study)
    ds.PatientName = patient["patient_name"]
    ds.PatientID = patient["patient_id"]
    ds.PatientBirthDate = patient["patient_birth_date"]
    ds.PatientSex = patient["patient_sex"]
    ds.AccessionNumber = study["accession_number"]
    ds.StudyDescription = study.get("study_description", "")
    ds.SeriesDescription = study["series_description"]
    ds.BodyPartExamined = study["body_part"]
    ds.StudyDate = ds.SeriesDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = when.strftime("%H%M%S")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = i
    ds.ReferringPhysicianName = "Referrer^Demo"
    ds.InstitutionName = "CDS Triage Demo Hospital"
    assert ds.PixelData is pixel_bytes
    return dicom_bytes(ds)


def synthetic_chest(size: int = 512, seed: int = 7) -> np.ndarray:
    """A cartoon PA chest radiograph (12-bit), with SYNTHETIC burnt in. Not a patient image."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.full((size, size), 300.0)
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.58) / 0.55) ** 2 < 1
    img[body] = 2400
    for cx in (0.33, 0.67):  # lungs: dark
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img[lung] = 900 + 500 * np.clip((yy[lung] - 0.2), 0, 1)
    heart = ((xx - 0.55) / 0.12) ** 2 + ((yy - 0.62) / 0.13) ** 2 < 1
    img[heart] = 2600
    img[(np.abs(xx - 0.5) < 0.03) & body] = 3300  # spine
    for k in range(8):  # ribs: bright arcs
        y0 = 0.25 + k * 0.065
        rib = (np.abs(yy - (y0 + 0.08 * ((xx - 0.5) / 0.35) ** 2)) < 0.008) & body & (np.abs(xx - 0.5) > 0.04)
        img[rib] += 500
    rng = np.random.default_rng(seed)
    img += rng.normal(0, 25, img.shape)
    canvas = Image.fromarray(np.zeros((size, size), np.uint8))
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 10), "SYNTHETIC - NOT A PATIENT", fill=255)
    draw.text((size - 30, 10), "R", fill=255)
    img[np.asarray(canvas) > 0] = 4000
    return np.clip(img, 0, 4095).astype(np.uint16)


def build_synthetic(name: str, study: dict, data: Path, when: datetime) -> list[bytes]:
    ds = make_dataset(
        synthetic_chest(),
        modality=study["modality"],
        window_center=2048,
        window_width=4096,
        pixel_spacing=(0.7, 0.7),
        instance_number=1,
        sop_instance_uid=uid(name, "instance", 1),
        transfer_syntax=study.get("transfer_syntax", "explicit"),
        manufacturer="cds-triage build_samples.py (synthetic)",
        extra={"ViewPosition": "PA", "BurnedInAnnotation": "YES", "ImageType": ["DERIVED", "SECONDARY"]},
        **common_tags(name, study, when),
    )
    return [dicom_bytes(ds)]


BUILDERS = {
    "ct_from_png": build_from_pictures,
    "mr_from_jpg": build_from_pictures,
    "cr_from_png": build_from_pictures,
    "rsna_ct": build_rsna,
    "synthetic": build_synthetic,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"shared data folder (default {DEFAULT_DATA})")
    ap.add_argument("--repick", action="store_true", help="apply every study's pick rule again")
    ap.add_argument("--only", nargs="*", help="study folders to rebuild (default: all)")
    args = ap.parse_args(argv)
    manifest = json.loads(MANIFEST.read_text())
    data = args.data.resolve()
    base_time = datetime.fromisoformat(manifest.get("base_datetime", "2024-05-06T08:00:00"))
    total = 0
    for n, study in enumerate(manifest["studies"]):
        name = study["folder"]
        if args.only and name not in args.only:
            continue
        if study["kind"] != "synthetic" and (args.repick or not study.get("source_files")):
            study["source_files"] = pick(data, study["pick"], study["task"])
            if "where" in study["pick"]:  # the truth is the source images' labels, every slice's together
                study["expected_positive_labels"] = truth_labels(data, study["task"], study["source_files"])
        missing = [p for p in study.get("source_files", []) if not (data / p).exists()]
        if missing:
            raise SystemExit(f"{name}: missing source files under {data}: {missing}")
        study["study_instance_uid"] = uid(name, "study")
        study["series_instance_uid"] = uid(name, "series", 1)
        when = base_time + timedelta(hours=n)
        blobs = BUILDERS[study["kind"]](name, study, data, when)
        folder = HERE / name
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.dcm"):
            old.unlink()
        study["files"] = []
        for i, blob in enumerate(blobs, start=1):
            (folder / f"IM{i:04d}.dcm").write_bytes(blob)
            study["files"].append(f"IM{i:04d}.dcm")
            total += len(blob)
        print(f"{name}: {len(blobs)} file(s), {sum(map(len, blobs)) / 1e6:.2f} MB  ({study['kind']})")
    MANIFEST.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"total {total / 1e6:.2f} MB; manifest updated: {MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
