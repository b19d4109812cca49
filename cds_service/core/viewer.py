"""Links into the site's image viewer (CDS_VIEWER_URL): a URL template with the study's UID in it.

The worklist rows, the study page and the CDS Hooks cards offer "Open in viewer" from one template,
e.g. OHIF's `https://viewer.example.org/viewer?StudyInstanceUIDs={study_uid}` or Weasis's
`weasis://…{study_uid}…` (docs/worklist.md). The template is checked once, at start-up: a
placeholder we do not fill, or a scheme a browser would run as script, stops the service with the
setting named rather than putting broken or dangerous links in front of a radiologist.
"""

from __future__ import annotations

import string
from urllib.parse import quote, urlsplit

#: What a template may name: `{study_uid}`, the DICOM Study Instance UID.
PLACEHOLDERS = ("study_uid",)
#: Web viewers (OHIF, a PACS's web viewer) and Weasis's launcher; never javascript:, data: or file:.
SCHEMES = ("http", "https", "weasis")


def template_problem(template: str) -> str | None:
    """Why `template` cannot be used as CDS_VIEWER_URL (None: it can)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone "{" or "}"
        return f"is not a URL template ({exc}; write a literal brace as {{{{ or }}}})"
    named = [name for _, name, spec, conversion in parts if name is not None]
    unknown = sorted({name for name in named if name not in PLACEHOLDERS})
    if unknown:
        return (f"has unknown placeholders {', '.join('{' + name + '}' for name in unknown)}; "
                f"it may use {', '.join('{' + name + '}' for name in PLACEHOLDERS)}")
    if any(spec or conversion for _, name, spec, conversion in parts if name is not None):
        return "has a placeholder with a format (write {study_uid} alone)"
    if not named:
        return "has no {study_uid}: every link would open the same page"
    try:
        parts_of_url = urlsplit(render(template, "1.2.3"))
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts_of_url.scheme.lower() not in SCHEMES:
        return f"must start with {', '.join(s + '://' for s in SCHEMES)}"
    if parts_of_url.scheme.lower() != "weasis" and not parts_of_url.hostname:
        return "has no host (like https://viewer.example.org/viewer?StudyInstanceUIDs={study_uid})"
    return None


def render(template: str, study_uid: str) -> str:
    """The template with the study filled in (a checked template: `template_problem` found nothing)."""
    return template.format(study_uid=quote(study_uid, safe="."))


def viewer_link(template: str, study_uid: str | None) -> str | None:
    """The viewer's address of a study; None without a template (no viewer configured) or a study UID."""
    if not template or not study_uid:
        return None
    return render(template, study_uid)
