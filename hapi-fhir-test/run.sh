#!/usr/bin/env bash
# Test cds-triage against a real HAPI FHIR server: the same end-to-end tests CI runs against
# the local FHIR server, pointed at HAPI with CDS_FHIR_BASE_URL.
#
#   hapi-fhir-test/run.sh                 start HAPI + Orthanc (Docker), load the samples, run
#                                         tests/test_e2e.py against them, stop the containers
#   hapi-fhir-test/run.sh --keep          leave the containers running afterwards
#   hapi-fhir-test/run.sh --no-docker     no Docker: use the servers at CDS_FHIR_BASE_URL and
#                                         CDS_DICOMWEB_URL where set; otherwise build HAPI from
#                                         hapi-fhir-test/pom.xml (Maven, once: skipped while the jar
#                                         is newer than its sources), start it on a free loopback
#                                         port, and start Orthanc (Debian package) the same way
# Extra arguments go to pytest, e.g. `hapi-fhir-test/run.sh -k subscribe -x`.
#
# Needs: the project's .venv (`./run.sh test` creates it once), and either Linux with a Docker
# engine and compose v2 (host networking), or (--no-docker) a JDK 17+ and Maven 3.8+.
# See hapi-fhir-test/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

HERE=hapi-fhir-test
PYTHON=.venv/bin/python
COMPOSE=(docker compose --file "$HERE/compose.yaml")

docker=1
keep=0
servers_ready=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1; shift ;;
    --no-docker) docker=0; shift ;;
    --servers-ready) servers_ready=1; shift ;;  # internal: tests/hapi_support.py has started the servers
    *) break ;;
  esac
done

wait_for() {  # URL, what, seconds
  local deadline=$((SECONDS + $3))
  until "$PYTHON" -c "import sys, httpx; sys.exit(httpx.get('$1', timeout=5).status_code != 200)" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then echo "$2 did not answer at $1 within $3 s" >&2; return 1; fi
    sleep 3
  done
}

if [ $docker = 0 ] && [ $servers_ready = 0 ]; then
  # HAPI unless CDS_FHIR_BASE_URL is set, Orthanc unless CDS_DICOMWEB_URL is set; both stopped afterwards
  exec "$PYTHON" tests/hapi_support.py run -- "$HERE/run.sh" --no-docker --servers-ready "$@"
fi

export CDS_FHIR_BASE_URL="${CDS_FHIR_BASE_URL:-http://127.0.0.1:8080/fhir}"
export CDS_DICOMWEB_URL="${CDS_DICOMWEB_URL:-http://127.0.0.1:8042/dicom-web}"

if [ $docker = 1 ]; then
  echo "==> starting HAPI FHIR and Orthanc ($HERE/compose.yaml)"
  "${COMPOSE[@]}" up --detach
  if [ $keep = 0 ]; then trap '"${COMPOSE[@]}" down --volumes' EXIT; fi
fi
wait_for "$CDS_FHIR_BASE_URL/metadata" "HAPI FHIR" 300
wait_for "${CDS_DICOMWEB_URL%/dicom-web}/system" "Orthanc" 120

echo "==> loading the sample patients, orders and studies (with our Subscription)"
"$PYTHON" "$HERE/load_samples.py"

echo "==> the end-to-end tests, against $CDS_FHIR_BASE_URL"
"$PYTHON" -m pytest tests/test_e2e.py -ra "$@"
