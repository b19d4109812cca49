#!/usr/bin/env python
"""CDS Hooks answer time: does a hook call come back well under 500 ms, with real JWTs?

    .venv/bin/python bench/hooks_bench.py              # 200 calls per hook
    .venv/bin/python bench/hooks_bench.py --calls 20   # smoke run

Starts a real FHIR server (sekmet) and our service (`serve` + a worker) on loopback, with an
EHR whose ES384 key our service trusts (tests/hook_client.py). Each call carries a freshly
signed JWT (new jti), as an EHR sends it. Measured, one call at a time, from the client:

- `imagingstudy-create` for a new study each time: verify the JWT, record the jti, queue the
  job, answer the "analysis pending" card (inference never runs inside the call);
- `patient-view` without prefetch: the service reads the patient's AI reports from the FHIR
  server itself (the slower, common case).

Prints p50/p95/max and the ratio of p95 to the 500 ms target; writes
bench/results/hooks_bench.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import httpx  # noqa: E402

from cds_devtools.demo import start_service  # noqa: E402
from cds_devtools.devservers import free_port, start_fhir_server, stopped_like_ctrl_c  # noqa: E402
from cds_service.core.domain import Task  # noqa: E402
from cds_service.adapters.fhir_client import FhirClient  # noqa: E402
from cds_service.core.settings import Settings  # noqa: E402
from hook_client import EhrSigner, hook_request  # noqa: E402
from support import make_test_weights  # noqa: E402

TARGET_S = 0.5
# the EHR's token for its FHIR server (this sekmet runs without auth, so any token passes)
FHIR_AUTH = {"access_token": "bench-token", "token_type": "Bearer", "expires_in": 3600,
             "scope": "patient/*.read", "subject": "cds-triage"}


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(samples: list[float]) -> dict[str, Any]:
    p95 = percentile(samples, 95)
    return {"n": len(samples), "p50_ms": round(1000 * statistics.median(samples), 1), "p95_ms": round(1000 * p95, 1),
            "max_ms": round(1000 * max(samples), 1), "p95_over_target": round(p95 / TARGET_S, 3)}


def timed_calls(http: httpx.Client, ehr: EhrSigner, base: str, service: str, bodies: list[dict]) -> list[float]:
    url = f"{base}/cds-services/{service}"
    samples = []
    for body in bodies:
        headers = ehr.auth(url)  # signing is the EHR's cost, not ours: outside the clock
        started = time.perf_counter()
        response = http.post(f"/cds-services/{service}", json=body, headers=headers)
        samples.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise SystemExit(f"{service}: HTTP {response.status_code}: {response.text[:300]}")
    return samples


def run(calls: int, out: Path) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="cds-hooks-bench-"))
    ehr = EhrSigner()
    try:
        with start_fhir_server(workdir / "fhir") as fhir_server:
            port = free_port()
            settings = Settings(
                operator_open_on_loopback=True,  # tests call /jobs directly
                fhir_base_url=fhir_server.url, public_url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port,
                data_dir=workdir / "service", weights_dir=make_test_weights(workdir / "weights", Task.HEAD_CT_ICH),
                log_level="WARNING", cds_hooks_rate_limit="100000/minute",  # the bench is one busy client
                **ehr.hook_settings(workdir / "ehr-jwks.json"))
            fhir = FhirClient(fhir_server.url)
            fhir.update({"resourceType": "Patient", "id": "bench-patient"}, if_match=None)
            processes = start_service(settings, workdir / "logs")
            try:
                base = settings.public_url
                with httpx.Client(base_url=base, timeout=10) as http:
                    warm = [hook_request("patient-view", {"patientId": "bench-patient", "userId": "Practitioner/r1"},
                                         fhirServer=fhir_server.url, fhirAuthorization=FHIR_AUTH) for _ in range(5)]
                    timed_calls(http, ehr, base, "patient-view", warm)
                    create = [hook_request("imagingstudy-create", {"patientId": "bench-patient",
                                                                   "imagingStudyId": f"ImagingStudy/bench-{i}"})
                              for i in range(calls)]
                    view = [hook_request("patient-view", {"patientId": "bench-patient", "userId": "Practitioner/r1"},
                                         fhirServer=fhir_server.url, fhirAuthorization=FHIR_AUTH) for _ in range(calls)]
                    results = {
                        "imagingstudy-create": summary(timed_calls(http, ehr, base, "imagingstudy-create", create)),
                        "patient-view (no prefetch, reads FHIR)": summary(timed_calls(http, ehr, base, "patient-view", view)),
                    }
            finally:
                processes.stop()
            fhir.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "target_ms": 1000 * TARGET_S,
           "calls": calls, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "hooks_bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per hook (default 200)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    with stopped_like_ctrl_c():  # killed (SIGTERM), it still stops the servers it started
        doc = run(args.calls, args.out)
    print(f"{'hook':42} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  p95 / 500 ms")
    for name, s in doc["results"].items():
        print(f"{name:42} {s['p50_ms']:8.1f} {s['p95_ms']:8.1f} {s['max_ms']:8.1f}  {s['p95_over_target']:.3f}")
    print(f"\nresults: {args.out / 'hooks_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
