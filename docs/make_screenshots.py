"""The README's pictures, taken from the demo: the worklist, and one study with its heatmap.

    .venv/bin/python docs/make_screenshots.py [--out docs/images] [--chromium /usr/bin/chromium]

Runs `cds-triage demo` (Orthanc, the FHIR server, the service and a worker on loopback, the sample
studies triaged), opens the worklist and the study view of the demo's glioma sample (else the first active-mode
study with a positive finding and a heatmap) in headless Chromium, writes worklist.png and study.png, and stops
the demo. Run it after changing the pages (templates, styles, scripts) and commit the pictures;
tests/test_docs.py runs it and checks that the committed pictures still look like what it takes.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: browser window (CSS pixels) of each picture: wide enough for the worklist's columns, tall enough
#: for the study's heatmap and its model card
SIZES = {"worklist.png": (1280, 720), "study.png": (1280, 1000)}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--force-device-scale-factor=1", "--virtual-time-budget=5000"]


def cds_triage_command() -> list[str]:
    beside = Path(sys.executable).with_name("cds-triage")  # the venv's own entry point
    found = str(beside) if beside.exists() else shutil.which("cds-triage")
    if not found:
        raise SystemExit("make_screenshots: cds-triage is not installed (./run.sh demo installs it)")
    return [found]


def find_chromium(given: str | None) -> str:
    for candidate in (given, os.environ.get("CDS_TEST_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (shutil.which(candidate) or Path(candidate).exists()):
            return shutil.which(candidate) or candidate
    raise SystemExit("make_screenshots: Chromium not found (apt-get install chromium, or --chromium PATH)")


class Demo:
    """`cds-triage demo --port 0` as a child process; its worklist URL once the samples are triaged."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> str:
        self.process = subprocess.Popen([*cds_triage_command(), "demo", "--port", "0"], cwd=REPO, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
            if line.startswith("Worklist:"):
                return line.split(None, 1)[1].strip()
        self.__exit__()
        raise SystemExit("make_screenshots: the demo did not show its worklist:\n" + "".join(self.output[-30:]))

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def __exit__(self, *_: Any) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the demo stops its servers and removes its folder, as on Ctrl-C
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.reader.join(10)  # it reads the demo's output to its end; then the pipe is closed
        if self.process.stdout is not None:
            self.process.stdout.close()


SHOWCASE_PATIENT = "Charlie Sample"


def study_to_show(worklist_url: str) -> str:
    """The study view of the first row the AI raised (active mode, a positive finding, a heatmap)."""
    with urllib.request.urlopen(worklist_url + "/rows.json", timeout=30) as answer:
        rows = json.load(answer)["rows"]
    raised = [row for row in rows if row.get("heatmap") and row.get("topFinding") and not row.get("shadow")]
    # the demo's glioma sample, which the model gets right, rather than whichever raised row sorts first
    chosen = next((row for row in raised if row.get("patient") == SHOWCASE_PATIENT), None)
    chosen = chosen or next(iter(raised), None) or next((row for row in rows if row.get("heatmap")), None)
    if chosen is None:
        raise SystemExit("make_screenshots: no study on the worklist has a heatmap")
    base = worklist_url.rsplit("/worklist", 1)[0]
    return base + chosen["url"]


def screenshot(chromium: str, url: str, target: Path, size: tuple[int, int]) -> None:
    with tempfile.TemporaryDirectory(prefix="cds-screenshot-") as profile:
        command = [chromium, *CHROMIUM_ARGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                   f"--screenshot={target}", url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not target.exists():
        raise SystemExit(f"make_screenshots: Chromium could not take {url}:\n{done.stderr[-2000:]}")


def make_screenshots(out: Path, chromium: str | None = None, timeout_s: float = 300) -> list[Path]:
    browser = find_chromium(chromium)
    out.mkdir(parents=True, exist_ok=True)
    with Demo(timeout_s) as worklist_url:
        pages = {"worklist.png": worklist_url, "study.png": study_to_show(worklist_url)}
        written = []
        for name, url in pages.items():
            screenshot(browser, url, out / name, SIZES[name])
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="folder of the pictures (default docs/images)")
    parser.add_argument("--chromium", help="the browser (default: chromium on the PATH, or CDS_TEST_CHROMIUM)")
    args = parser.parse_args(argv)
    for path in make_screenshots(args.out, args.chromium):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
