"""The service's exception hierarchy, in the style of httpx: one base, two kinds that matter.

A job that raises `TransientError` is retried later (the PACS or FHIR server may come
back); one that raises `PermanentError` ends `failed` with the message as its reason,
because retrying a corrupt DICOM or a study without a UID will never help.
"""

from __future__ import annotations

from typing import Literal

#: Which kind of server an error is about, so `cli.main` can name the setting that points at it.
Server = Literal["fhir", "pacs", "queue", "auth"]


def is_retryable_status(status: int) -> bool:
    """The one rule for HTTP answers: 408 (timeout), 429 (throttled) or any 5xx may pass, so retry later;
    any other 4xx is a refusal that retrying will not change."""
    return status in (408, 429) or status >= 500


def is_redirect_status(status: int) -> bool:
    """A 3xx is never a success and is never followed: an http→https or moved-server redirect means the
    URL setting is out of date, and following it would send our credentials and the patient's data to
    wherever a Location header says. It is an `UpstreamRedirectError` (retried, then failed, naming both)."""
    return 300 <= status < 400


class TriageError(Exception):
    """Base of every error the service raises on purpose; its message is safe to show.

    An adapter says which server failed in structured fields, never only in its message:
    `server` (the kind) and `url` (the base URL it was talking to), both empty when the
    error is not about a server."""

    def __init__(self, message: str = "", *, server: Server | None = None, url: str = "") -> None:
        super().__init__(message)
        self.server: Server | None = server
        self.url = url


class PermanentError(TriageError):
    """Retrying will not help: bad input, a missing resource, a misconfiguration."""


class TransientError(TriageError):
    """Retrying may help: a server down, a timeout, a 5xx or 429."""

    def __init__(self, message: str, retry_after: float | None = None, *, server: Server | None = None,
                 url: str = "") -> None:
        super().__init__(message, server=server, url=url)
        self.retry_after = retry_after


class BadDicomError(PermanentError):
    """A DICOM object that cannot be read or decoded into pixels."""


class StudyTooLargeError(PermanentError):
    """More instances or bytes than the configured limits: refused before (or while) downloading or decoding."""


class StudyNotFoundError(PermanentError):
    """The study, series or FHIR resource named by the trigger does not exist."""


class InvalidResourceError(PermanentError):
    """A FHIR resource or request that lacks what triage needs (for example a Study UID)."""


class ModelUnavailableError(PermanentError):
    """No usable weights and model card for a task."""


class UpstreamError(TransientError):
    """The PACS or the FHIR server failed in a way that may pass (down, 5xx, 429, timeout)."""


class UpstreamRedirectError(UpstreamError):
    """The PACS or the FHIR server answered a redirect (3xx, `is_redirect_status`): named with the URL we
    called and the `Location` it sent. Transient (a redirect during maintenance may pass), so a job retries
    and then fails with this message; a command says it in one line."""

    def __init__(self, what: str, status_code: int, location: str, *, server: Server | None = None,
                 url: str = "") -> None:
        shown = location[:300] if location else "(no Location header)"
        super().__init__(f"{what} answered {status_code} redirect to {shown} (redirects are not followed)",
                         server=server, url=url)
        self.status_code = status_code
        self.location = location


class UpstreamRejectedError(PermanentError):
    """The PACS or the FHIR server refused what we sent (4xx other than 408/429)."""

    def __init__(self, message: str, status_code: int, body: str = "", *, server: Server | None = None,
                 url: str = "") -> None:
        super().__init__(message, server=server, url=url)
        self.status_code = status_code
        self.body = body


class QueueUnavailableError(TransientError):
    """The job store or queue cannot be reached: nothing was accepted, the caller should retry."""
