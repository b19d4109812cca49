"""`run.sh`: what it installs for each command, and how (never runs apt: apt-get, dpkg and root are stubs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN_SH = REPO / "run.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="run.sh is a bash script")


def run_functions(snippet: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """run.sh's definitions (everything before its `cmd=` dispatch), with root and apt stubbed, then `snippet`."""
    text = RUN_SH.read_text()
    definitions = text[: text.index("\ncmd=")]
    stubs = f"""
POLICY_RC_D={tmp_path}/policy-rc.d
as_root() {{   # logs each command; writes the policy file for real (in tmp_path), runs nothing else
  printf '%s\\n' "$*" >> {tmp_path}/root.log
  case "$1" in
    tee|chmod|rm) "$@" ;;
    *) if [ -x "$POLICY_RC_D" ]; then s=0; "$POLICY_RC_D" orthanc start || s=$?; echo "policy-rc.d says $s"; fi \\
         >> {tmp_path}/root.log ;;
  esac
}}
dpkg-query() {{ return 1; }}   # nothing is installed yet
"""
    script = tmp_path / "script.sh"
    script.write_text(definitions + "\n" + stubs + "\n" + snippet + "\n")
    return subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "APT_LOCK_TIMEOUT": "300"})


def test_run_sh_parses_and_is_executable():
    assert subprocess.run(["bash", "-n", str(RUN_SH)], capture_output=True).returncode == 0
    assert os.access(RUN_SH, os.X_OK)


def test_the_browser_dicom3tools_and_redis_are_installed_for_the_tests_only(tmp_path):
    listed = run_functions('echo "demo: ${DEMO_APT_PACKAGES[*]}"; echo "test: ${TEST_APT_PACKAGES[*]}"', tmp_path)
    assert listed.returncode == 0, listed.stderr
    demo, test = (set(line.split(": ", 1)[1].split()) for line in listed.stdout.splitlines())
    assert {"orthanc", "orthanc-dicomweb", "python3-venv"} <= demo
    assert not demo & {"chromium", "dicom3tools", "redis-server"}
    assert demo | {"chromium", "dicom3tools", "redis-server"} <= test
    text = RUN_SH.read_text()
    assert 'install_system_packages "${DEMO_APT_PACKAGES[@]}"' in text.split("demo)")[-1].split(";;")[0]
    assert 'install_system_packages "${TEST_APT_PACKAGES[@]}"' in text.split("test)")[-1].split(";;")[0]


def test_apt_waits_for_the_lock_and_no_service_is_left_running(tmp_path):
    result = run_functions('install_system_packages "${DEMO_APT_PACKAGES[@]}"; '
                           'if [ -e "$POLICY_RC_D" ]; then echo "policy left behind"; fi', tmp_path)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "root.log").read_text().splitlines()
    apt = [i for i, call in enumerate(calls) if " apt-get " in f" {call} "]
    assert len(apt) == 2 and all("-o DPkg::Lock::Timeout=300" in calls[i] for i in apt), calls
    assert calls[apt[0]].endswith("update -qq")
    assert calls[apt[1]].split("--no-install-recommends ")[1].split() == ["orthanc", "orthanc-dicomweb", "python3-venv"]
    # no service may start during the install: policy-rc.d forbids it (101) while apt runs, and is removed after
    assert calls[apt[0] + 1] == calls[apt[1] + 1] == "policy-rc.d says 101", calls
    assert any(call.startswith("rm -f ") and "policy-rc.d" in call for call in calls[apt[1]:])
    assert "policy left behind" not in result.stdout
    # and orthanc's service, which its package enables, is stopped and disabled, and the output says so
    assert "orthanc" in result.stdout and "not left running or enabled" in result.stdout
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        assert "systemctl disable --now orthanc" in calls
    elif shutil.which("update-rc.d"):
        assert "update-rc.d orthanc disable" in calls


def test_nothing_is_installed_or_touched_when_everything_is_there(tmp_path):
    result = run_functions('dpkg-query() { echo "install ok installed"; }; install_system_packages "${TEST_APT_PACKAGES[@]}"',
                           tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "root.log").exists() and result.stdout == ""
