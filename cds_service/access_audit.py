"""`cds-triage audit`: who saw which patient's data, when (the access log, adapters/access_log.py).

    cds-triage audit --patient 123          # every view of Patient/123's data, newest first
    cds-triage audit --user dr.grey --since 2026-11-01
    cds-triage audit --json --limit 1000    # one JSON object a line, for a SIEM or a spreadsheet
    cds-triage audit --prune                # remove views older than CDS_ACCESS_LOG_RETENTION_DAYS first

Patients are recorded hashed: `--patient` takes the id as the EHR names it and looks up its hash.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

from cds_service.adapters.access_log import DAY_S, PhiView, open_access_log, patient_key
from cds_service.core.errors import QueueUnavailableError
from cds_service.core.settings import Settings


def since_time(text: str) -> float:
    """argparse type of --since: an ISO date or date-time, UTC unless it says otherwise."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date or date-time (like 2026-11-01 or 2026-11-01T08:00)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", help="only this viewer, as recorded (the signed-in user, the proxy's user, the CDS client)")
    parser.add_argument("--patient", help="only this patient: a Patient id (123 or Patient/123), looked up hashed")
    parser.add_argument("--since", type=since_time, help="only views since this UTC date or date-time (2026-11-01T08:00)")
    parser.add_argument("--limit", type=int, default=100, help="at most this many views, newest first (default 100)")
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    parser.add_argument("--prune", action="store_true", help="first remove views older than CDS_ACCESS_LOG_RETENTION_DAYS")


def format_view(view: PhiView) -> str:
    when = datetime.fromtimestamp(view.at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    detail = " ".join(f"{k}={v}" for k, v in sorted(view.detail.items()))
    return f"{when}  {view.who:<32} {view.view:<24} {view.patient or '-':<12}  {detail}".rstrip()


def run_audit(args: argparse.Namespace, settings: Settings) -> int:
    """List the access log; a store that cannot be read is a QueueUnavailableError (one line naming the setting)."""
    try:
        store = open_access_log(settings)
        if args.prune:
            removed = store.prune(time.time() - settings.access_log_retention_days * DAY_S)
            print(f"removed {removed} views older than {settings.access_log_retention_days} days "
                  "(CDS_ACCESS_LOG_RETENTION_DAYS)")
        views = store.views(who=args.user, patient=patient_key(args.patient) if args.patient else None, since=args.since,
                            limit=max(1, args.limit))
    except Exception as exc:  # noqa: BLE001 - SQLite unreadable, Redis down
        raise QueueUnavailableError(f"access log unavailable: {type(exc).__name__}: {exc}") from exc
    if args.json:
        for view in views:
            print(json.dumps(view.to_json()))
        return 0
    print(f"{'WHEN (UTC)':<20}  {'WHO':<32} {'VIEW':<24} {'PATIENT':<12}  DETAIL")
    for view in views:
        print(format_view(view))
    return 0
