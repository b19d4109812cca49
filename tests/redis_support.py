"""A real Redis for the scale-out tests: `redis-server` (Debian package) on a free loopback port.

Nothing is persisted (`--save '' --appendonly no`); each call starts its own server, so
tests never share queue state. Skips when redis-server is missing, fails under CI.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cds_devtools.devservers import ManagedProcess, free_port, port_open
from conftest import require


def start_redis(workdir: Path) -> ManagedProcess:
    """A started redis-server; its URL (redis://127.0.0.1:<port>/0) is `.url`."""
    binary = shutil.which("redis-server")
    require(binary, "redis-server not found (apt-get install redis-server)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = ManagedProcess("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(workdir)],
                          url=f"redis://127.0.0.1:{port}/0", log_path=workdir / "redis.log")
    return proc.start_ready(lambda: port_open(port), timeout=20)
