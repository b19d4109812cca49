"""JSON log lines: one object per event, with job ids and never any patient data.

Study UIDs and FHIR ids can identify a patient when joined with other data, so code logs
`hashed(uid)` rather than the value itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Iterator, Mapping

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def hashed(value: str) -> str:
    """A short, stable pseudonym for an identifier, for log correlation only."""
    return hashlib.sha256(value.encode()).hexdigest()[:12]


# read-only default: log_context always sets a new mapping, never changes one in place
_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar("cds_log_context", default=MappingProxyType({}))


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields (a job id, a hashed study id) to every log line written inside, by any logger."""
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class ContextFilter(logging.Filter):
    """Copies the `log_context` fields onto each record (an explicit `extra` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # dicomweb-client writes Study/Series Instance UIDs at INFO: identifiers stay out of our logs.
    logging.getLogger("dicomweb_client").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the events that matter
