"""`cds-triage subscribe`: create our ImagingStudy rest-hook Subscription, once, and wait until it is active.

Idempotent: a Subscription carrying our tag and pointing at the same endpoint is reused;
running the command again (or from several machines) creates nothing new. Our own
Subscriptions are recognised client-side by tag, so servers that do not index `_tag` on
Subscription work the same.

Servers activate a Subscription on their own time: HAPI FHIR stores it as `requested` and turns
it `active` a few seconds later, asynchronously; a study created before then is not notified.
`wait_until_active` polls the Subscription until it is `active` (or `error`/`off`, or a timeout).
"""

from __future__ import annotations

import time

import httpx

from fhir_mappings.builders import build_subscription, is_our_subscription
from fhir_mappings.conventions import Conventions

from cds_service.core.settings import Settings
from cds_service.adapters.smart_auth import fhir_auth, fhir_client
from cds_service.adapters.terminology import LabelCheck, check_ai_labels


def is_ours(subscription: dict, endpoint: str, conventions: Conventions | None = None) -> bool:
    return is_our_subscription(subscription, endpoint, conventions or Conventions())


def ensure_subscription(settings: Settings, endpoint: str) -> tuple[str, bool]:
    """The id of our Subscription for `endpoint`, and whether it was created just now."""
    fhir = fhir_client(settings, fhir_auth(settings))  # SMART Backend Services when configured
    conventions = Conventions.from_settings(settings)
    try:
        for existing in fhir.search("Subscription", {"_count": "200"}):
            if is_ours(existing, endpoint, conventions) and existing.get("status") in ("requested", "active"):
                return str(existing["id"]), False
        resource = build_subscription(endpoint, header_secret=settings.subscription_secret or None,
                                      conventions=conventions)
        created = fhir.create(resource.model_dump(mode="json", exclude_none=True))
        return str(created["id"]), True
    finally:
        fhir.close()


def ai_label_checks(settings: Settings, timeout_s: float | None = None) -> list[LabelCheck]:
    """Whether the FHIR server's terminology knows each AI security label we write (terminology.py)."""
    fhir = fhir_client(settings, fhir_auth(settings))
    if timeout_s is not None:
        fhir.http.timeout = httpx.Timeout(timeout_s)
    try:
        return check_ai_labels(fhir, Conventions.from_settings(settings))
    finally:
        fhir.close()


class SubscriptionNotActiveError(RuntimeError):
    """The FHIR server did not activate our Subscription (it says `error` or `off`, or kept it `requested`)."""

    def __init__(self, message: str, status: str | None) -> None:
        super().__init__(message)
        self.status = status


def wait_until_active(settings: Settings, subscription_id: str, *, timeout_s: float = 120.0,
                      interval_s: float = 0.5) -> float:
    """Poll Subscription/<id> until its status is `active`; the seconds that took.

    Raises SubscriptionNotActiveError when the server sets it `error` or `off` (with the server's
    `error` text) or leaves it `requested` past `timeout_s`."""
    fhir = fhir_client(settings, fhir_auth(settings))
    started = time.monotonic()
    try:
        while True:
            subscription, _ = fhir.read("Subscription", subscription_id)
            status = subscription.get("status")
            if status == "active":
                return time.monotonic() - started
            if status not in ("requested", None):
                why = f": {subscription['error']}" if subscription.get("error") else ""
                raise SubscriptionNotActiveError(f"Subscription/{subscription_id} is {status!r}{why}", status)
            if time.monotonic() - started >= timeout_s:
                raise SubscriptionNotActiveError(
                    f"Subscription/{subscription_id} is still {status!r} after {timeout_s:.0f} s "
                    "(rest-hook Subscriptions may be off on the FHIR server)", status)
            time.sleep(interval_s)
    finally:
        fhir.close()
