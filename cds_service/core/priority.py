"""The priority policy: findings in, a suggested FHIR priority out. Pure and configurable.

Two rules a radiologist can rely on: a positive finding raises the priority to at least
what its rule says; the AI never lowers a priority that a person (or an earlier, more
worrying result) has set.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from cds_service.core.domain import Finding, Priority


def suggest_priority(findings: Iterable[Finding], rules: Mapping[str, Priority]) -> Priority | None:
    """The highest priority any positive finding's rule asks for; None when nothing is positive."""
    wanted = [rules[f.label] for f in findings if f.positive and f.raises_priority and f.label in rules]
    return max(wanted, key=lambda p: p.rank) if wanted else None


def raised_priority(current: Priority | None, suggested: Priority | None) -> Priority | None:
    """The priority to write, or None to leave the order alone (never lowers)."""
    if suggested is None:
        return None
    if current is not None and current >= suggested:
        return None
    return suggested


def parse_priority(value: object) -> Priority | None:
    """A FHIR priority code as found on a ServiceRequest; unknown or absent → None."""
    try:
        return Priority(str(value)) if value else None
    except ValueError:
        return None
