"""Whether `serve` can listen on an address, asked before gunicorn starts (and by the demo before it
picks its port): one check, so both say the same thing."""

from __future__ import annotations


def address_problem(host: str, port: int) -> str | None:
    """Why `serve` could not listen on host:port (in use, not this machine's address), or None.

    Bound the way gunicorn binds (SO_REUSEADDR), then released at once."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"unknown host ({exc.strerror or exc})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
