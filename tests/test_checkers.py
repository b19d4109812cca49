"""ruff and mypy, run from the test suite so `.ci/run` (pytest) enforces them; configured in pyproject.toml.

ruff must find nothing. mypy's findings from its first run that are not fixed yet are listed in
tests/mypy_baseline.txt (file, error code and message; no line numbers): any finding not listed
fails, and so does a listed one that is gone (delete its line), so the list only shrinks.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return str(found)


def test_ruff_finds_nothing():
    # bench/ is left to its owner; everything the service, its training and its tests are is checked
    result = subprocess.run([tool("ruff"), "check", "--no-cache", "cds_service", "fhir_mappings", "cds_training", "cds_devtools",
                             "tests",
                             "hapi-fhir-test"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


BASELINE = Path(__file__).with_name("mypy_baseline.txt")
FINDING = re.compile(r"^(?P<path>[^:\s]+\.py):\d+: error: (?P<message>.*)$")


def mypy_findings(output: str) -> list[str]:
    return sorted(f"{m['path']}: {m['message']}" for line in output.splitlines() if (m := FINDING.match(line)))


def run_mypy() -> subprocess.CompletedProcess[str]:
    """mypy over the packages (its config: pyproject.toml); tests/conftest.py starts it in the background
    when the session begins, and `mypy_run` hands its result to the test below."""
    return subprocess.run([tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mypy_finds_nothing_new(mypy_run: subprocess.CompletedProcess[str]):
    result = mypy_run
    assert "error:" in result.stdout or result.returncode == 0, result.stdout + result.stderr  # it ran
    found = mypy_findings(result.stdout)
    known = sorted(line for line in BASELINE.read_text().splitlines() if line and not line.startswith("#"))
    new = sorted((Counter(found) - Counter(known)).elements())  # counted: a second copy of a known finding is new
    assert not new, "mypy finds (fix them; the baseline is for old findings only):\n" + "\n".join(new) + "\n\n" + result.stdout
    gone = sorted((Counter(known) - Counter(found)).elements())
    assert not gone, "fixed, so delete from tests/mypy_baseline.txt:\n" + "\n".join(gone)
