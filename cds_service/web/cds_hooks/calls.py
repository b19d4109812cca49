"""CDS Hooks requests, parsed and checked before any handler runs (pure: no Flask, no server)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping
from urllib.parse import quote

from fhir_mappings.builders import is_fhir_id

from cds_service.adapters.audit import Feedback
from cds_service.core.settings import Settings, is_loopback_url

_TOKEN = re.compile(r"\{\{context\.([A-Za-z0-9_]+)\}\}")


class HookCallError(Exception):
    """A request we cannot serve, with the HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- the services' shape ------------------------------------------------------------------------


@dataclass(frozen=True)
class HookCall:
    """A validated CDS Hooks request."""

    hook: str
    hook_instance: str
    context: Mapping[str, Any]
    prefetch: Mapping[str, Any] = field(default_factory=dict)
    fhir_server: str | None = None
    fhir_token: str | None = None

    @property
    def patient_id(self) -> str:
        return str(self.context.get("patientId", ""))


@dataclass(frozen=True)
class HookService:
    id: str
    hook: str
    title: str
    description: str
    usage_requirements: str
    prefetch: Mapping[str, str]
    context_types: Mapping[str, type]  # the context fields we require, and their JSON type
    handler: Callable[[HookCall, Settings], tuple[list[dict[str, Any]], list[dict[str, Any]]]]

    def discovery_entry(self, render: Callable[[str], str] = str) -> dict[str, Any]:
        return {"hook": self.hook, "id": self.id, "title": self.title, "description": self.description,
                "prefetch": {key: render(query) for key, query in self.prefetch.items()},
                "usageRequirements": self.usage_requirements}


def discovery_document(services: Mapping[str, HookService], render: Callable[[str], str] = str) -> dict[str, Any]:
    """The discovery answer; `render` fills a prefetch template's site-specific parts (services.site_prefetch)."""
    return {"services": [s.discovery_entry(render) for s in services.values()]}


# --- parsing a request (pure) -----------------------------------------------------------------


def context_fhir_id(value: Any, name: str, resource_type: str) -> str:
    text = value.removeprefix(f"{resource_type}/") if isinstance(value, str) else value
    if not is_fhir_id(text):
        raise HookCallError(400, f"context.{name} must be a FHIR id of a {resource_type}")
    return text


def _check_fhir_server(url: Any) -> str:
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise HookCallError(400, "fhirServer must be an http(s) URL")
    if url.startswith("http://") and not is_loopback_url(url):
        raise HookCallError(400, "fhirServer must use https (CDS Hooks requires it for patient data)")
    return url.rstrip("/")


def allowed_fhir_server(url: str | None, issuer: str, settings: Settings) -> str | None:
    """`url` if this issuer's calls may make us call it (CDS_HOOKS_FHIR_SERVERS), else None.

    A hook's fhirServer is where we send the EHR's token and from where we show data: an
    unlisted one (an internal address, another hospital's server) is never called. Loopback
    needs CDS_HOOKS_ALLOW_LOOPBACK_FHIR as well (development only).
    """
    if url is None:
        return None
    for entry in (part.strip() for part in settings.cds_hooks_fhir_servers.split(",")):
        who, sep, listed = entry.rpartition("|") if "|" in entry else ("", "", entry)
        if listed.rstrip("/") == url and (not sep or who == issuer):
            if is_loopback_url(url) and not settings.cds_hooks_allow_loopback_fhir:
                return None
            return url
    return None


def parse_hook_call(body: Any, service: HookService) -> HookCall:
    """Validate the request envelope and the context this service needs; HookCallError(400) otherwise."""
    if not isinstance(body, dict):
        raise HookCallError(400, "CDS Hooks request body must be a JSON object")
    if body.get("hook") != service.hook:
        raise HookCallError(400, f"service {service.id!r} handles hook {service.hook!r}, got {body.get('hook')!r}")
    try:
        hook_instance = str(uuid.UUID(str(body.get("hookInstance"))))
    except ValueError:
        raise HookCallError(400, "hookInstance must be a UUID") from None
    context = body.get("context")
    if not isinstance(context, dict):
        raise HookCallError(400, "context must be a JSON object")
    for name, kind in service.context_types.items():
        if not isinstance(context.get(name), kind):
            raise HookCallError(400, f"context.{name} is required ({kind.__name__})")
    context = dict(context)
    context["patientId"] = context_fhir_id(context.get("patientId"), "patientId", "Patient")
    prefetch = body.get("prefetch", {})
    if not isinstance(prefetch, dict):
        raise HookCallError(400, "prefetch must be a JSON object")
    fhir_server = _check_fhir_server(body["fhirServer"]) if body.get("fhirServer") is not None else None
    token = None
    authorization = body.get("fhirAuthorization")
    if authorization is not None:
        if not isinstance(authorization, dict) or not isinstance(authorization.get("access_token"), str) \
                or not authorization["access_token"] or str(authorization.get("token_type", "")).lower() != "bearer":
            raise HookCallError(400, "fhirAuthorization needs an access_token with token_type Bearer")
        if fhir_server is None:
            raise HookCallError(400, "fhirAuthorization was given without fhirServer")
        token = authorization["access_token"]
    return HookCall(hook=service.hook, hook_instance=hook_instance, context=context, prefetch=prefetch,
                    fhir_server=fhir_server, fhir_token=token)


def render_query(template: str, context: Mapping[str, Any]) -> str:
    """A prefetch template with its {{context.x}} tokens filled in (URL-quoted)."""
    def value(match: re.Match[str]) -> str:
        found = context.get(match.group(1))
        if not isinstance(found, (str, int, float)) or isinstance(found, bool):
            raise HookCallError(400, f"context.{match.group(1)} is needed for this service's data")
        return quote(str(found), safe="")
    return _TOKEN.sub(value, template)


def resources_of(value: Any) -> list[dict[str, Any]]:
    """A prefetched or fetched value as a list of resources (a searchset Bundle or a single resource)."""
    if not isinstance(value, dict):
        return []
    if value.get("resourceType") == "Bundle":
        return [e["resource"] for e in value.get("entry") or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
    return [value]


# --- feedback (pure parsing) ------------------------------------------------------------------


def parse_feedback(body: Any) -> list[Feedback]:
    """The `feedback` array of a CDS Hooks 2.0 feedback request; HookCallError(400) when malformed."""
    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise HookCallError(400, "feedback request needs a non-empty 'feedback' array")
    parsed = []
    for n, item in enumerate(items):
        where = f"feedback[{n}]"
        if not isinstance(item, dict) or not isinstance(item.get("card"), str) or not item["card"]:
            raise HookCallError(400, f"{where}.card (the card uuid) is required")
        outcome = item.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise HookCallError(400, f"{where}.outcome must be 'accepted' or 'overridden'")
        stamp = item.get("outcomeTimestamp")
        try:
            datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        except ValueError:
            raise HookCallError(400, f"{where}.outcomeTimestamp must be an ISO 8601 timestamp") from None
        accepted = item.get("acceptedSuggestions")
        if outcome == "accepted":
            if not isinstance(accepted, list) or not accepted or not all(isinstance(a, dict) and isinstance(a.get("id"), str) for a in accepted):
                raise HookCallError(400, f"{where}.acceptedSuggestions (objects with id) is required when accepted")
        reason = item.get("overrideReason")
        if reason is not None:
            coding = reason.get("reason") if isinstance(reason, dict) else None
            if not isinstance(reason, dict) or (coding is not None and not (
                    isinstance(coding, dict) and isinstance(coding.get("code"), str) and isinstance(coding.get("system"), str))):
                raise HookCallError(400, f"{where}.overrideReason.reason must be a Coding with system and code")
        parsed.append(Feedback(card=item["card"], outcome=outcome, outcome_timestamp=str(stamp),
                               accepted_suggestions=tuple(a["id"] for a in accepted or [] if outcome == "accepted"),
                               override_reason=reason))
    return parsed
