"""`cds-triage demo`, the README's first command: the real servers, the shipped weights and the
sample studies, run as a user runs it, then stopped as a process manager stops it (SIGTERM):
nothing it started keeps running, and its temp folder is gone."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from cds_devtools.demo import load_manifest, truth_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def read_until(lines: "queue.Queue[str | None]", marker: str, timeout_s: float, seen: list[str]) -> None:
    """Collect the demo's output until a line contains `marker`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError("the demo exited early:\n" + "".join(seen))
        seen.append(line)
        if marker in line:
            return
    raise AssertionError(f"no {marker!r} within {timeout_s} s:\n" + "".join(seen))


def processes_using(folder: Path) -> list[int]:
    """Processes whose command line or environment names `folder`: the demo's servers (each runs
    in its own session, with its data, config or CDS_DATA_DIR in there)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if str(folder).encode() in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.TransportError:
        return True
    return False


def test_the_demo_triages_the_samples_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    if not (REPO / "weights" / "head_ct_ich.safetensors").exists():
        pytest.skip("the shipped weights are not in this checkout")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CDS_")}
    env["TMPDIR"] = str(tmp_path)  # where the demo makes its own temp folder, as a user runs it (no --workdir)
    demo = subprocess.Popen([sys.executable, "-m", "cds_service.cli", "demo"],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str | None]" = queue.Queue()

    def pump() -> None:
        for line in demo.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    seen: list[str] = []
    try:
        read_until(lines, "Press Ctrl-C to stop.", 400, seen)
        output = "".join(seen)
        worklist = re.search(r"Worklist:\s+(\S+)", output).group(1)
        fhir_url, pacs_url = re.search(r"FHIR:\s+(\S+)\s+PACS: (\S+)", output).groups()
        service = worklist.rsplit("/worklist", 1)[0]
        assert all(url.startswith("http://127.0.0.1:") for url in (worklist, fhir_url, pacs_url))
        assert httpx.get(worklist, timeout=10).status_code == 200

        manifest = load_manifest(demo_only=True)
        assert all(sample.get("expected_positive_labels") is not None for sample in manifest)  # truth known
        for index, sample in enumerate(manifest):
            [job] = httpx.get(f"{service}/jobs", params={"imagingStudy": f"demo-study-{index}"}, timeout=10).json()["jobs"]
            priority = httpx.get(f"{fhir_url}/ServiceRequest/demo-order-{index}", timeout=10).json()["priority"]
            assert job["status"] == "done", (sample["folder"], job)
            positives = sorted(f["label"] for f in job["result"]["findings"] if f["positive"])
            # the priority follows the AI's finding where the task is active, never where it runs in shadow
            raised = bool(positives) and job["result"]["mode"] == "active"
            assert (priority != "routine") == raised, (sample["folder"], priority, job["result"])
            assert f"truth {truth_of(sample)}" in output, output  # the truth is printed beside the result
            # the demo also stores each result in Orthanc as a DICOM SR (and a positive's heatmap as a capture)
            assert job["result"]["reportToPacs"]["stored"] is True, job["result"]
            assert ("heatmapToPacs" in job["result"]) is bool(positives), job["result"]
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)
        try:
            code = demo.wait(60)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
        finally:
            pumping.join(10)  # it reads to the end of the demo's output, then the pipe is closed here
            demo.stdout.close()  # type: ignore[union-attr]
    left = processes_using(tmp_path)
    for pid in left:  # whatever the outcome, nothing the demo started outlives the test
        os.kill(pid, signal.SIGKILL)
    assert code == 0, "".join(seen)
    assert not left, "the demo left servers running"
    for url in (worklist, f"{fhir_url}/metadata", pacs_url):
        assert refused(url), url
    assert re.search(r"data in \S*cds-triage-demo-\w+, removed when the demo stops", "".join(seen)), "".join(seen)
    assert not list(tmp_path.glob("cds-triage-demo-*")), "the demo left its temp folder behind"


@pytest.mark.parametrize("code", [0, 1])
def test_the_demo_removes_its_temp_folder_only_when_it_ends_well(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str], code: int) -> None:
    from cds_devtools import demo
    from cds_service.core.settings import Settings

    def fake_run(settings: Settings, workdir: Path, own_workdir: bool, keep_running: bool, port: int) -> int:
        (workdir / "orthanc.log").write_text("the log a failed demo is read by")
        return code

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(demo, "_run_demo", fake_run)
    assert demo.run_demo(Settings()) == code
    left = list(tmp_path.glob("cds-triage-demo-*"))
    if code == 0:
        assert left == []
    else:
        assert [p.name for p in left[0].iterdir()] == ["orthanc.log"]
        assert f"kept in {left[0]}" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    assert demo.run_demo(Settings(), workdir=mine) == code
    assert (mine / "orthanc.log").exists()  # a folder the caller named is always kept
