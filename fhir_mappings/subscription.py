"""The R4 rest-hook Subscription `cds-triage subscribe` creates, and the tag that finds it again."""

from __future__ import annotations

from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.subscription import Subscription, SubscriptionChannel

from . import codes
from .common import narrative
from .conventions import DEFAULT_CONVENTIONS, Conventions

#: Header the FHIR server sends with each notification so our webhook can check it.
SUBSCRIPTION_SECRET_HEADER = "X-CDS-Subscription-Secret"

#: Default Subscription.reason (R4 requires one).
DEFAULT_SUBSCRIPTION_REASON = "cds-triage: AI triage of new imaging studies"


def is_our_subscription(subscription: dict, endpoint: str, conventions: Conventions = DEFAULT_CONVENTIONS) -> bool:
    """Whether a Subscription (a dict) is the one `cds-triage subscribe` made for `endpoint` (our tag)."""
    return (conventions.has_tag(subscription, codes.SUBSCRIPTION_TAG_CODE)
            and (subscription.get("channel") or {}).get("endpoint") == endpoint)


def build_subscription(
    endpoint: str,
    *,
    header_secret: str | None,
    criteria: str = "ImagingStudy?",
    reason: str = DEFAULT_SUBSCRIPTION_REASON,
    conventions: Conventions = DEFAULT_CONVENTIONS,
) -> Subscription:
    """The R4 rest-hook Subscription that makes the FHIR server notify us of new studies.

    Tagged (codes.SUBSCRIPTION_TAG_CODE) so `cds-triage subscribe` can find its own Subscription
    (`is_our_subscription`, or search `conventions.subscription_tag_query`) and not create a duplicate. The secret travels in a
    header the webhook checks; header values must not contain line breaks.
    """
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"subscription endpoint must be an http(s) URL, got {endpoint!r}")
    headers: list[str | None] | None = None
    if header_secret is not None:
        if not header_secret.strip() or any(c in header_secret for c in "\r\n"):
            raise ValueError("header secret must be non-empty and contain no line breaks")
        headers = [f"{SUBSCRIPTION_SECRET_HEADER}: {header_secret}"]
    return Subscription(
        text=narrative(f"cds-triage: rest-hook notifications of {criteria} to {endpoint}, for AI triage."),
        meta=Meta(tag=[Coding.model_validate(conventions.tag(codes.SUBSCRIPTION_TAG_CODE))]),
        status="requested",
        reason=reason,
        criteria=criteria,
        channel=SubscriptionChannel(
            type="rest-hook",
            endpoint=endpoint,
            payload="application/fhir+json",
            header=headers,
        ),
    )
