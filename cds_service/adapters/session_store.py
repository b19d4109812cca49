"""Short-lived server-side records of the sign-in (CDS_WORKLIST_AUTH=oidc): what must not live in a cookie.

- the state of each sign-in on its way (nonce, PKCE code verifier, where to go back), kept by Authlib through
  the `get`/`set`/`delete` cache interface and deleted when the identity provider sends the browser back:
  a state used once is unknown the second time (a replayed or forged callback is refused);
- each signed-in session (who, until when), named by a random id in the session cookie: signing out
  deletes it, so a copied cookie stops working at once, and it expires with CDS_OIDC_SESSION_LIFETIME_S.

In `<CDS_DATA_DIR>/sessions.sqlite3`, or in Redis where the job store is (CDS_QUEUE_URL=redis://…), so that
every `serve` process and machine sees the same sessions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from cds_service.adapters import sqlite_files
from cds_service.core.settings import Settings


class SessionStore(Protocol):
    def get(self, key: str) -> str | None: ...

    def set(self, key: str, value: str, expires_in: float | None = None) -> None: ...

    def delete(self, key: str) -> None: ...


class SqliteSessionStore:
    """Keys with an expiry in a SQLite file (one machine); expired rows are dropped as new ones are written."""

    def __init__(self, path: Path, *, default_expires_in: float = 3600.0) -> None:
        self.path = path
        self.default_expires_in = default_expires_in
        sqlite_files.create(path, "CREATE TABLE IF NOT EXISTS session_record (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                                  "expires_at REAL NOT NULL);")

    def get(self, key: str) -> str | None:
        with sqlite_files.connection(self.path) as db:
            row = db.execute("SELECT value FROM session_record WHERE key = ? AND expires_at > ?", (key, time.time())).fetchone()
        return row[0] if row else None

    def set(self, key: str, value: str, expires_in: float | None = None) -> None:
        now = time.time()
        with sqlite_files.connection(self.path) as db:
            db.execute("DELETE FROM session_record WHERE expires_at <= ?", (now,))
            db.execute("INSERT OR REPLACE INTO session_record VALUES (?, ?, ?)",
                       (key, value, now + (expires_in or self.default_expires_in)))

    def delete(self, key: str) -> None:
        with sqlite_files.connection(self.path) as db:
            db.execute("DELETE FROM session_record WHERE key = ?", (key,))


class RedisSessionStore:
    """The same in Redis (every machine), with Redis's own expiry."""

    def __init__(self, url: str, *, prefix: str = "cds-triage:sign-in:", timeout_s: float = 10.0,
                 default_expires_in: float = 3600.0) -> None:
        import redis

        self.prefix = prefix
        self.default_expires_in = default_expires_in
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          decode_responses=True)

    def get(self, key: str) -> str | None:
        value = self.redis.get(self.prefix + key)
        return str(value) if value is not None else None

    def set(self, key: str, value: str, expires_in: float | None = None) -> None:
        self.redis.set(self.prefix + key, value, px=max(1, int((expires_in or self.default_expires_in) * 1000)))

    def delete(self, key: str) -> None:
        self.redis.delete(self.prefix + key)


def open_session_store(settings: Settings) -> SqliteSessionStore | RedisSessionStore:
    """Redis where the job store is (every machine sees the sessions), else a SQLite file in CDS_DATA_DIR."""
    from cds_service.adapters.audit import on_redis

    if on_redis(settings):
        return RedisSessionStore(settings.queue_url, timeout_s=settings.http_timeout_s)
    return SqliteSessionStore(settings.data_dir / "sessions.sqlite3")
