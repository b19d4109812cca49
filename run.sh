#!/usr/bin/env bash
# One entry point for a fresh Debian machine: installs what is missing, then runs.
#   ./run.sh demo    local demo: Orthanc + FHIR server + the service, sample studies triaged
#   ./run.sh test    the whole test suite (what CI runs)
# Needs root or sudo once, for `apt-get install` of Orthanc and its DICOMweb plugin.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(orthanc orthanc-dicomweb python3-venv chromium dicom3tools redis-server)
VENV=.venv

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_system_packages() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> apt-get install ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# $1: the extras: "demo" is the runtime (no torch: the models run from the ONNX graphs in weights/)
# and the demo's FHIR server; the tests add torch.
# A venv installed with more extras (the tests') serves the demo as it is.
install_python_packages() {
  local extras="$1" want stamp
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  for stamp in "$VENV/.installed-$extras" "$VENV/.installed-demo,test,train"; do
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  done
  case "$extras" in
    demo) echo "==> creating $VENV and installing the runtime and the demo's FHIR server (no torch: about 0.8 GB)" ;;
    *) echo "==> creating $VENV and installing the project with [$extras] (torch for the tests: a few GB, minutes)" ;;
  esac
  [ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".${extras:+[$extras]}"
  echo "$want" > "$VENV/.installed-$extras"
}
cmd="${1:-}"
case "$cmd" in
  demo)
    install_system_packages
    install_python_packages "demo"
    shift
    exec "$VENV/bin/cds-triage" demo "$@"
    ;;
  test)
    install_system_packages
    install_python_packages "demo,test,train"
    shift
    exec "$VENV/bin/python" -m pytest -ra "$@"
    ;;
  *)
    echo "usage: $0 demo|test [args...]" >&2
    exit 2
    ;;
esac
