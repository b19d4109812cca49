"""gunicorn settings for the web process in a container (also runs as is outside one):

    gunicorn --config docker/gunicorn.conf.py "cds_service.web.app:create_app()"

The same server `cds-triage serve` embeds, in the form container platforms expect. The bind
address comes from the service's settings (CDS_HOST, CDS_PORT); the number of worker
processes from WEB_CONCURRENCY, gunicorn's own variable (the image sets 2). Before it binds,
`on_starting` refuses what `serve` refuses: patient data without sign-in on a network address.
"""

import sys

from cds_service.core.settings import Settings

_settings = Settings.from_env()

bind = f"{_settings.host}:{_settings.port}"
threads = 4  # notifications and hooks wait on the job store, not on the CPU
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = None  # ops.py logs every request as JSON with the route, never ids from the path or query
errorlog = "-"
# Heartbeat files in memory: a container's overlay filesystem can stall gunicorn's default.
worker_tmp_dir = "/dev/shm"


def on_starting(server):  # type: ignore[no-untyped-def]
    """Checked with the addresses gunicorn will really bind (a `--bind` on the command line included)."""
    from cds_service.web.access import exposure_problem

    hosts = [address if isinstance(address, str) else str(address[0]) for address in server.cfg.address]
    problem = exposure_problem(_settings, hosts)
    if problem:
        print(f"gunicorn: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
