"""The FHIR adapter: standard R4 REST over httpx, nothing server-specific.

Reads, searches, a transaction, and a versioned update with If-Match. HTTP trouble is
mapped to the service's error kinds so the job layer can decide to retry or to fail.
Works the same against HAPI FHIR and the local test server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterator

import httpx

from fhir_mappings.builders import is_fhir_id

from cds_service.core.errors import (InvalidResourceError, PermanentError, StudyNotFoundError, UpstreamError, UpstreamRedirectError,
                                     UpstreamRejectedError, is_redirect_status, is_retryable_status)
from cds_service.adapters.metrics import count_upstream_error

FHIR_JSON = "application/fhir+json"


#: A stale If-Match: 412 Precondition Failed (the HTTP and FHIR R4 answer, sekmet's), or 409 Conflict
#: (HAPI FHIR: "HAPI-0989: Trying to update ... but this is not the current version").
VERSION_CONFLICT_STATUSES = (409, 412)


class VersionConflictError(UpstreamRejectedError):
    """If-Match did not match (HTTP 412, or 409 from HAPI): someone else changed the resource first.
    The caller re-reads the resource and decides again."""


class ForeignNextLinkError(PermanentError):
    """A search Bundle's `next` link leads to another origin than the FHIR base: not followed, because
    the request would carry our (or the EHR's) token there."""


def outcome_text(response: httpx.Response) -> str:
    """The diagnostics of an OperationOutcome body, or the start of any other body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue") or []
        return "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code")) for i in issues)
    return response.text[:300]


def version_of(resource: dict[str, Any], response: httpx.Response | None = None) -> str | None:
    """A resource's version id, from meta.versionId or the ETag header (W/"3" → 3)."""
    version = (resource.get("meta") or {}).get("versionId")
    if version:
        return str(version)
    etag = response.headers.get("ETag", "") if response is not None else ""
    return etag.removeprefix("W/").strip('"') or None


def resource_path(resource_type: str, resource_id: object) -> str:
    """`Type/id`, refusing an id that is not a FHIR id or is a path segment ("." / "..")."""
    if not is_fhir_id(resource_id):
        raise InvalidResourceError(f"not a FHIR id for {resource_type}: {str(resource_id)[:80]!r}")
    return f"{resource_type}/{resource_id}"


def same_origin(url: str, base: str) -> bool:
    """Whether `url` has the base's scheme, host and port (where a Bundle's `next` link may lead)."""
    a, b = httpx.URL(url), httpx.URL(base)
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


class FhirClient:
    """A small FHIR R4 REST client bound to one base URL."""

    def __init__(self, base_url: str, *, timeout_s: float = 30.0, auth: httpx.Auth | None = None,
                 bearer_token: str = "") -> None:
        headers = {"Accept": FHIR_JSON}
        if bearer_token and auth is None:
            headers["Authorization"] = f"Bearer {bearer_token}"
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url + "/", timeout=timeout_s, headers=headers, auth=auth)

    def close(self) -> None:
        self.http.close()

    @property
    def _where(self) -> dict[str, Any]:
        """The structured fields of every error this client raises (errors.TriageError)."""
        return {"server": "fhir", "url": self.base_url}

    # --- plumbing ---------------------------------------------------------------------

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TimeoutException as exc:
            count_upstream_error("fhir", "timeout")
            raise UpstreamError(f"FHIR server timed out on {method} {url.split('?')[0]}", **self._where) from exc
        except httpx.TransportError as exc:
            count_upstream_error("fhir", "unreachable")
            raise UpstreamError(f"FHIR server unreachable at {self.base_url}: {type(exc).__name__}", **self._where) from exc
        if is_redirect_status(response.status_code):  # never followed, never a success (errors.is_redirect_status)
            count_upstream_error("fhir", f"http_{response.status_code}")
            called = response.request.url.copy_with(query=None)
            raise UpstreamRedirectError(f"FHIR {method} {called}", response.status_code,
                                        response.headers.get("Location", ""), **self._where)
        if response.status_code < 400:
            return response
        count_upstream_error("fhir", f"http_{response.status_code}")
        detail = outcome_text(response)
        reason = f"FHIR {method} {url.split('?')[0]} answered {response.status_code}" + (f": {detail}" if detail else "")
        if response.status_code in (404, 410):
            raise StudyNotFoundError(reason, **self._where)
        if response.status_code in VERSION_CONFLICT_STATUSES:
            raise VersionConflictError(reason, response.status_code, response.text, **self._where)
        if is_retryable_status(response.status_code):
            retry_after = response.headers.get("Retry-After")
            raise UpstreamError(reason, retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
                               **self._where)
        raise UpstreamRejectedError(reason, response.status_code, response.text, **self._where)

    # --- REST interactions --------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> tuple[dict[str, Any], str | None]:
        """A resource and its version id (for If-Match)."""
        response = self._send("GET", resource_path(resource_type, resource_id))
        resource = response.json()
        return resource, version_of(resource, response)

    def search(self, resource_type: str, params: dict[str, str] | None = None, *, max_pages: int = 10) -> list[dict[str, Any]]:
        """Matching resources (search mode `match`, plus `include`d ones), following `next` links."""
        return list(self.iter_search(resource_type, params, max_pages=max_pages))

    def iter_search(self, resource_type: str, params: dict[str, str] | None = None, *,
                    max_pages: int = 10) -> Iterator[dict[str, Any]]:
        """Each matching resource; `next` pages are fetched only while more pages are wanted, and only
        from the base's own origin (a link elsewhere ends the search: see `iter_pages`)."""
        for bundle in self.iter_pages(resource_type, params, max_pages=max_pages, refuse_foreign_next=False):
            for entry in bundle.get("entry") or []:
                if isinstance(entry, dict) and "resource" in entry:
                    yield entry["resource"]

    def iter_pages(self, resource_type: str, params: Mapping[str, str | Sequence[str]] | None = None, *,
                   max_pages: int | None = None, headers: Mapping[str, str] | None = None,
                   refuse_foreign_next: bool = True) -> Iterator[dict[str, Any]]:
        """Each page (searchset Bundle) of a search, following `next` links from the base's own origin
        only: the request carries our (or the EHR's) token, which a link to another host would hand
        over. Such a link raises ForeignNextLinkError (or, `refuse_foreign_next=False`, ends the search)."""
        response = self._send("GET", resource_type, params=params or {}, headers=dict(headers or {}))
        page = 1
        while True:
            bundle = response.json()
            yield bundle
            next_url = next((link.get("url") for link in bundle.get("link") or []
                             if isinstance(link, dict) and link.get("relation") == "next"), None)
            if not next_url or (max_pages is not None and page >= max_pages):
                return
            if not isinstance(next_url, str) or not same_origin(next_url, self.base_url):
                count_upstream_error("fhir", "foreign_next_link")
                if refuse_foreign_next:
                    shown = httpx.URL(next_url) if isinstance(next_url, str) else None
                    raise ForeignNextLinkError(
                        f"FHIR search {resource_type}: page {page}'s next link leads to "
                        f"{f'{shown.scheme}://{shown.netloc.decode()}' if shown else repr(next_url)[:80]}, another origin "
                        f"than {self.base_url}; not followed (our token would go with it)", **self._where)
                return
            response = self._send("GET", next_url, headers=dict(headers or {}))
            page += 1

    def create(self, resource: dict[str, Any], *, if_none_exist: str | None = None) -> dict[str, Any]:
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        response = self._send("POST", resource["resourceType"], json=resource, headers=headers)
        return response.json() if response.content else resource

    def update(self, resource: dict[str, Any], *, if_match: str | None) -> dict[str, Any]:
        """PUT the resource; with `if_match`, only if nobody changed it since we read it."""
        headers = {"Content-Type": FHIR_JSON, "Prefer": "return=representation"}
        if if_match:
            headers["If-Match"] = f'W/"{if_match}"'
        response = self._send("PUT", resource_path(resource["resourceType"], resource.get("id")), json=resource, headers=headers)
        return response.json() if response.content else resource

    def amend(self, resource_type: str, resource_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None],
              *, attempts: int = 3) -> bool:
        """Read, `change` (None: nothing to do) and update with If-Match, re-reading on a version conflict;
        whether anything was written. UpstreamError when the resource kept changing under us."""
        for _ in range(attempts):
            resource, version = self.read(resource_type, resource_id)
            updated = change(resource)
            if updated is None:
                return False
            try:
                self.update(updated, if_match=version)
                return True
            except VersionConflictError:
                continue
        raise UpstreamError(f"{resource_type}/{resource_id} kept changing under us", **self._where)

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle: the server applies all entries or none."""
        response = self._send("POST", "", json=bundle, headers={"Content-Type": FHIR_JSON})
        return response.json()

    def operation(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """GET a FHIR operation (`CodeSystem/$validate-code`): its answer, a Parameters resource."""
        return self._send("GET", path, params=params).json()

    def delete(self, resource_type: str, resource_id: str) -> None:
        self._send("DELETE", resource_path(resource_type, resource_id))
