"""The README and docs/: what a hospital IT engineer reads in the first hour.

The README opens with the two commands, says what the demo prints, shows the worklist and a study
as they look now (pictures taken from the demo by docs/make_screenshots.py), and leads to the
reference in docs/, whose links all arrive somewhere and which documents every setting.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import _require_orthanc, _require_sekmet, require

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
IMAGES = DOCS / "images"
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def load_screenshot_script():
    spec = importlib.util.spec_from_file_location("make_screenshots", DOCS / "make_screenshots.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section(text: str, heading: str) -> str:
    assert f"\n## {heading}\n" in text, f"the README has no section '## {heading}'"
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to hyphens)."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


def is_blank(image: Image.Image) -> bool:
    pixels = np.asarray(image.convert("RGB"))
    quantised = (pixels.reshape(-1, 3) // 32).astype(np.int32)  # 8 levels a channel: 512 colours
    colours = np.count_nonzero(np.bincount(quantised @ np.array([64, 8, 1]), minlength=512))  # np.unique(axis=0) took seconds
    return float(pixels.std()) < 10 or colours < 8


def thumbnail(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((64, 50), Image.BILINEAR), dtype=float)


def test_the_readme_opens_with_the_two_commands_then_what_it_does():
    text = README.read_text()
    title, rest = text.split("\n", 1)
    assert title.startswith("# cds-triage")
    first_block = rest.lstrip("\n")
    assert first_block.startswith("```bash\n"), "the first thing after the title is the commands"
    commands = first_block.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in commands] == ["./run.sh demo", "./run.sh test"]
    intro = first_block.split("```", 2)[2].split("![", 1)[0]
    assert "not a diagnosis" in intro and len(re.findall(r"[.;]\s", intro)) <= 6  # a few sentences, not a manual


def test_the_readme_says_what_the_demo_prints():
    seen = section(README.read_text(), "What you should see")
    assert "Worklist:  http://127.0.0.1:8000/worklist" in seen and "http://127.0.0.1:8000/worklist" in seen
    manifest = json.loads((REPO / "cds_service" / "samples" / "manifest.json").read_text())["studies"]
    for sample in (s for s in manifest if s.get("in_demo", True)):
        assert sample["patient_name"] in seen, f"the demo's row of {sample['patient_name']} is not shown"
    assert "sample studies stored in the PACS and ordered in the EHR" in seen


def test_the_readme_covers_your_own_servers_in_five_steps_and_the_usual_troubles():
    text = README.read_text()
    steps = re.findall(r"^(\d)\. ", section(text, "Use it with your own FHIR server and PACS"), re.MULTILINE)
    assert steps == ["1", "2", "3", "4", "5"]
    own = section(text, "Use it with your own FHIR server and PACS")
    for needed in ("CDS_FHIR_BASE_URL", "CDS_DICOMWEB_URL", "CDS_PUBLIC_URL", "cds-triage subscribe", "cds-triage serve",
                   "cds-triage worker", "CDS_PACS_TRIGGER_SECRET", "/readyz", "cds-triage validate"):
        assert needed in own, needed
    trouble = section(text, "Troubleshooting")
    for needed in ("APT_LOCK_TIMEOUT", "CDS_PORT", "--port 0", "CDS_FHIR_BASE_URL", "is it right, and is the server up?",
                   "not_applicable", "--task", "bodySite", "logs"):
        assert needed in trouble, needed


def test_every_link_in_the_readme_and_docs_arrives_somewhere():
    pages = [README, *sorted(DOCS.glob("*.md")), REPO / "weights" / "README.md"]
    for page in pages:
        for _, _, target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not followed here
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.relative_to(REPO)} links to {target}, which does not exist"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved.read_text()), f"{page.relative_to(REPO)}: no heading for #{anchor} in {path}"


def test_the_readme_pictures_are_screenshots_of_the_expected_size():
    sizes = load_screenshot_script().SIZES
    pictures = [target for bang, _, target in LINK.findall(README.read_text()) if bang]
    assert sorted(Path(p).name for p in pictures) == sorted(sizes), pictures
    for picture in pictures:
        with Image.open(REPO / picture) as image:
            assert image.format == "PNG" and image.size == sizes[Path(picture).name], picture
            assert not is_blank(image), f"{picture} is blank"


def test_every_setting_is_in_docs_settings():
    source = next(p for p in sorted((REPO / "cds_service").rglob("settings.py")) if '"env":' in p.read_text())
    names = re.findall(r'"env": "([A-Z0-9_]+)"', source.read_text())
    assert len(names) > 40
    documented = (DOCS / "settings.md").read_text()
    missing = [f"CDS_{name}" for name in names if f"`CDS_{name}`" not in documented]
    assert not missing, f"not in docs/settings.md: {missing}"


@pytest.mark.integration
def test_the_readme_pictures_are_the_current_ui(tmp_path):
    """docs/make_screenshots.py takes the pictures again from the demo; the committed ones must look the same
    (times and dates differ in a few pixels; a changed page does not)."""
    _require_orthanc()
    _require_sekmet()
    script = load_screenshot_script()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    require(Path(chromium).exists(), "Chromium not found (apt-get install chromium)")
    written = script.make_screenshots(tmp_path, chromium, timeout_s=240)
    assert sorted(p.name for p in written) == sorted(script.SIZES)
    for fresh_path in written:
        with Image.open(fresh_path) as fresh, Image.open(IMAGES / fresh_path.name) as committed:
            assert fresh.format == "PNG" and fresh.size == script.SIZES[fresh_path.name] == committed.size
            assert not is_blank(fresh), f"{fresh_path.name}: the page came out blank"
            difference = float(np.abs(thumbnail(fresh) - thumbnail(committed)).mean())
            assert difference < 2.0, (f"docs/images/{fresh_path.name} is not the current page (mean difference {difference:.1f} "
                                      "of 255): regenerate with .venv/bin/python docs/make_screenshots.py and commit the pictures")
