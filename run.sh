#!/usr/bin/env bash
# One entry point for a fresh Debian machine: installs what is missing, then runs.
#   ./run.sh demo    local demo: Orthanc + FHIR server + the service, sample studies triaged
#   ./run.sh test    the whole test suite (what CI runs), under coverage: its total is printed at the end
#   ./run.sh test --quick   the pure-code loop: no server, no model run, no child process (under a minute)
# Needs root or sudo once, for `apt-get install` of Orthanc and its DICOMweb plugin (and, for the
# tests, a browser, dicom3tools, Redis, a JDK and Maven). It waits for another apt/dpkg run to finish (up to
# APT_LOCK_TIMEOUT seconds, default 300) instead of failing at once. Orthanc and Redis come as Debian
# packages that start a system service on install; the service and the tests start their own
# processes on loopback, so a service this script installs is stopped and disabled again (and it says so).
set -euo pipefail
cd "$(dirname "$0")"

DEMO_APT_PACKAGES=(orthanc orthanc-dicomweb python3-venv)
# the tests also build and run a HAPI FHIR JPA server (hapi-fhir-test/, Maven, Java 17): tests/hapi_support.py
TEST_APT_PACKAGES=("${DEMO_APT_PACKAGES[@]}" chromium dicom3tools redis-server openjdk-17-jdk-headless maven)
command -v npm >/dev/null || TEST_APT_PACKAGES+=(npm)  # hl7.terminology.r4 for the strict HAPI tests (tests/strict_hapi_support.py)
# package → the system service its install enables and starts
declare -A PACKAGE_SERVICES=([orthanc]=orthanc [redis-server]=redis-server)
APT_LOCK_TIMEOUT="${APT_LOCK_TIMEOUT:-300}"
VENV=.venv

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_get() { as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$APT_LOCK_TIMEOUT" "$@"; }

POLICY_RC_D=/usr/sbin/policy-rc.d
POLICY_MARK="written by cds-triage run.sh"
OWN_POLICY=""
# While we install, no package may start its service: policy-rc.d answers 101 (action forbidden) to
# invoke-rc.d and deb-systemd-invoke. A policy the machine already has is left as it is (one of ours
# that an interrupted run left behind is taken over).
forbid_service_starts() {
  if [ ! -e "$POLICY_RC_D" ] || grep -q "$POLICY_MARK" "$POLICY_RC_D" 2>/dev/null; then
    printf '#!/bin/sh\n# %s while it installs packages; removed afterwards\nexit 101\n' "$POLICY_MARK" \
      | as_root tee "$POLICY_RC_D" >/dev/null
    as_root chmod 755 "$POLICY_RC_D"
    OWN_POLICY=1
    trap allow_service_starts EXIT
  fi
}
allow_service_starts() {
  if [ -n "$OWN_POLICY" ]; then as_root rm -f "$POLICY_RC_D"; OWN_POLICY=""; fi
}

# The services of the packages just installed: stopped and disabled (the user did not ask for them).
disable_new_services() {
  local pkg service services=()
  for pkg in "$@"; do
    service="${PACKAGE_SERVICES[$pkg]:-}"
    if [ -n "$service" ]; then services+=("$service"); fi
  done
  [ "${#services[@]}" -gt 0 ] || return 0
  for service in "${services[@]}"; do
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
      as_root systemctl disable --now "$service" >/dev/null 2>&1 || true
    elif command -v update-rc.d >/dev/null; then
      as_root invoke-rc.d "$service" stop >/dev/null 2>&1 || true
      as_root update-rc.d "$service" disable >/dev/null 2>&1 || true
    fi
  done
  echo "==> the system services ${services[*]} that came with their packages are not left running or enabled:"
  echo "    cds-triage starts its own Orthanc and Redis on 127.0.0.1 (sudo systemctl enable --now <service> turns one back on)"
}

# $@: the Debian packages the command needs; the missing ones are installed.
install_system_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  echo "==> apt-get install ${missing[*]} (waiting up to ${APT_LOCK_TIMEOUT} s if another apt or dpkg is running)"
  forbid_service_starts
  apt_get update -qq
  apt_get install -y -qq --no-install-recommends "${missing[@]}"
  allow_service_starts
  disable_new_services "${missing[@]}"
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
    install_system_packages "${DEMO_APT_PACKAGES[@]}"
    install_python_packages "demo"
    shift
    exec "$VENV/bin/cds-triage" demo "$@"
    ;;
  test)
    shift
    if [ "${1:-}" = "--quick" ]; then  # needs no system package: no server, browser or JDK
      shift
      install_python_packages "demo,test,train"
      exec "$VENV/bin/python" -m pytest -q -m "not integration and not slow" "$@"
    fi
    install_system_packages "${TEST_APT_PACKAGES[@]}"
    install_python_packages "demo,test,train"
    # coverage of the pytest process (not of the servers and services it starts); configured in pyproject.toml
    status=0
    "$VENV/bin/python" -m coverage run -m pytest -ra "$@" || status=$?
    echo "==> coverage of cds_service, fhir_mappings, cds_training, cds_devtools (in-process): $("$VENV/bin/python" -m coverage report --format=total --precision=1)% (coverage report / coverage html for the details)"
    exit "$status"
    ;;
  *)
    echo "usage: $0 demo|test [args...]" >&2
    exit 2
    ;;
esac
