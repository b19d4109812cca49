"""Load the sample studies into a FHIR server + PACS the way an EHR would, and check they get triaged.

    .venv/bin/python hapi-fhir-test/load_samples.py [--timeout 300]

The FHIR server and the PACS are the ones the settings name (CDS_FHIR_BASE_URL, CDS_DICOMWEB_URL;
Orthanc's REST API is taken to sit above /dicom-web). Steps:

1. start `cds-triage serve` and `cds-triage worker` on a free loopback port (data in a temp dir);
2. `cds-triage subscribe`: our rest-hook Subscription, then wait until the server activates it;
3. for each sample in cds_service/samples: store its images in the PACS (Orthanc REST), then
   PUT its Patient, ServiceRequest and ImagingStudy (the Subscription does the rest);
4. wait for every study's job, print what each became, then delete the Subscription and stop.

Exit status 0 when every job finished and none `failed`. Runs the same against HAPI in Docker
(hapi-fhir-test/run.sh) and against the local servers (tests/test_docker_files.py).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from cds_devtools.demo import SAMPLES_DIR, describe_outcome, ehr_order, load_manifest, start_service, wait_for_jobs
from cds_devtools.devservers import free_port, upload_dicom
from cds_service.adapters.fhir_client import FhirClient
from cds_service.core.settings import Settings


def wait_until_active(fhir: FhirClient, subscription_id: str, timeout_s: float = 120) -> None:
    """HAPI activates a new Subscription asynchronously; notifications before that are lost."""
    deadline = time.monotonic() + timeout_s
    while (status := fhir.read("Subscription", subscription_id)[0].get("status")) != "active":
        if status not in ("requested", None) or time.monotonic() > deadline:
            raise SystemExit(f"Subscription/{subscription_id} is {status!r}, not active")
        time.sleep(1)


def subscribe(settings: Settings) -> str:
    """Run `cds-triage subscribe` as an operator would; returns the Subscription id it prints."""
    env = {**os.environ, **settings.to_env()}
    done = subprocess.run([sys.executable, "-m", "cds_service.cli", "subscribe"], env=env, check=True,
                          capture_output=True, text=True)
    print("   " + done.stdout.strip())
    found = re.search(r"Subscription/([A-Za-z0-9\-.]{1,64})", done.stdout)
    if not found:
        raise SystemExit(f"cds-triage subscribe printed no Subscription id: {done.stdout!r}")
    return found.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for all jobs (default 300)")
    args = parser.parse_args(argv)

    base = Settings.from_env()
    orthanc_url = base.dicomweb_url.rstrip("/").removesuffix("/dicom-web")
    workdir = Path(tempfile.mkdtemp(prefix="cds-hapi-test-"))
    port = free_port()
    settings = replace(base, host="127.0.0.1", port=port, public_url=f"http://127.0.0.1:{port}", data_dir=workdir / "data",
                       subscription_secret=base.subscription_secret or secrets.token_urlsafe(24),
                       operator_open_on_loopback=True)  # this script reads its own service's /jobs
    print(f"==> FHIR {settings.fhir_base_url}   PACS {settings.dicomweb_url}   service {settings.public_url}")
    service = start_service(settings, workdir / "logs")
    fhir = FhirClient(settings.fhir_base_url, timeout_s=settings.http_timeout_s)
    subscription_id, status = None, 1
    try:
        subscription_id = subscribe(settings)
        wait_until_active(fhir, subscription_id)
        study_ids = []
        samples = load_manifest()
        for index, sample in enumerate(samples):
            files = sorted((SAMPLES_DIR / sample["folder"]).glob("*.dcm"))
            upload_dicom(orthanc_url, files)
            for resource in ehr_order(sample, index, files):
                fhir.update(resource, if_match=None)
            study_ids.append(f"demo-study-{index}")
        print(f"==> {len(samples)} samples stored in the PACS and ordered in the EHR; waiting for triage")
        finished = wait_for_jobs(settings, study_ids, timeout_s=args.timeout)
        for index, sample in enumerate(samples):
            print("   " + describe_outcome(sample, finished.get(study_ids[index])))
        failed = [s for s in study_ids if s not in finished or finished[s]["status"] == "failed"]
        if failed:
            print(f"==> not triaged: {', '.join(failed)} (logs kept in {workdir / 'logs'})", file=sys.stderr)
        status = 1 if failed else 0
        return status
    finally:
        if subscription_id:
            fhir.delete("Subscription", subscription_id)  # a stopped service must not keep being notified
        fhir.close()
        service.stop()
        if status == 0:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
