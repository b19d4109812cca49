"""The SQLite files that several processes on one machine share (the job store, the audit and access log,
the sign-in sessions, the JWT replay cache, the PACS arrivals): one way to open them.

Each use opens a short connection of its own (safe across threads and processes) in autocommit mode, so a
transaction is explicit (`BEGIN IMMEDIATE`); rows read by column name. A file is created with WAL
journaling, so readers in other processes never wait for a writer.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

#: How long a connection waits for another process's write lock before it gives up (seconds).
BUSY_TIMEOUT_S = 30.0


@contextmanager
def connection(path: Path, timeout: float = BUSY_TIMEOUT_S) -> Iterator[sqlite3.Connection]:
    """A short autocommit connection to the file, closed on leaving; rows are `sqlite3.Row`."""
    with closing(sqlite3.connect(path, timeout=timeout, isolation_level=None)) as db:
        db.row_factory = sqlite3.Row
        yield db


def create(path: Path, schema: str, timeout: float = BUSY_TIMEOUT_S) -> None:
    """The file (and its folder) in WAL mode with `schema` (CREATE … IF NOT EXISTS statements) applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with connection(path, timeout) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(schema)
