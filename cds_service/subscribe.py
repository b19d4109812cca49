"""`cds-triage subscribe`: create our ImagingStudy rest-hook Subscription, once.

Idempotent: a Subscription carrying our tag and pointing at the same endpoint is reused;
running the command again (or from several machines) creates nothing new. Our own
Subscriptions are recognised client-side by tag, so servers that do not index `_tag` on
Subscription work the same.
"""

from __future__ import annotations

from fhir_mappings.builders import SUBSCRIPTION_TAG, build_subscription

from .settings import Settings
from .smart_auth import fhir_auth, fhir_client


def is_ours(subscription: dict, endpoint: str) -> bool:
    tags = (subscription.get("meta") or {}).get("tag") or []
    tagged = any(t.get("system") == SUBSCRIPTION_TAG.system and t.get("code") == SUBSCRIPTION_TAG.code for t in tags)
    return tagged and (subscription.get("channel") or {}).get("endpoint") == endpoint


def ensure_subscription(settings: Settings, endpoint: str) -> tuple[str, bool]:
    """The id of our Subscription for `endpoint`, and whether it was created just now."""
    fhir = fhir_client(settings, fhir_auth(settings))  # SMART Backend Services when configured
    try:
        for existing in fhir.search("Subscription", {"_count": "200"}):
            if is_ours(existing, endpoint) and existing.get("status") in ("requested", "active"):
                return str(existing["id"]), False
        resource = build_subscription(endpoint, header_secret=settings.subscription_secret or None)
        created = fhir.create(resource.model_dump(mode="json", exclude_none=True))
        return str(created["id"]), True
    finally:
        fhir.close()
