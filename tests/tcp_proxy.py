"""A transparent TCP proxy for fault injection, placed between our service and a server.

    proxy = TcpProxy(upstream_port=orthanc.http_port).start()   # listens on 127.0.0.1:proxy.port
    proxy.fault = Fault(kind="http_error", status=503, match=r"^GET .*/series/", times=2)
    ...
    proxy.fault = None                                             # transparent again
    proxy.stop()

Bytes pass through unchanged unless a `Fault` is set. A fault applies to requests whose
first line matches `match` (all when empty), for the first `times` of them (all when None):

- `delay`      wait `seconds` before forwarding the request;
- `drop`       close the connection instead of forwarding (the client sees a reset);
- `http_error` answer `status` (with `Retry-After` when given) and close, never forwarding;
- `blackhole`  swallow the request and never answer (the client's timeout must fire);
- `cut`        forward the request, pass `after_bytes` of the answer, then close both sides;
- `slow`       forward the request, pass the answer at `bytes_per_s`.

Requests are told apart by the start of each client-to-server chunk (`GET /x HTTP/1.1`):
enough on loopback, where a client sends a request head in one write and waits for the
answer before sending the next (no pipelining). When the upstream is down, connections are
closed at once, as a dead server's port would.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field

REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r\n")


@dataclass
class Fault:
    kind: str  # delay | drop | http_error | blackhole | cut | slow
    match: str = ""
    times: int | None = None
    seconds: float = 0.0
    status: int = 503
    retry_after: int | None = None
    after_bytes: int = 0
    bytes_per_s: int = 50_000
    applied: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in ("delay", "drop", "http_error", "blackhole", "cut", "slow"):
            raise ValueError(f"unknown fault {self.kind!r}")

    def takes(self, request_line: str) -> bool:
        """Does this fault apply to this request (and count it)?"""
        if self.match and not re.search(self.match, request_line):
            return False
        if self.times is not None and self.applied >= self.times:
            return False
        self.applied += 1
        return True


class _Connection:
    """One client connection and its upstream twin, pumped by two threads."""

    def __init__(self, proxy: "TcpProxy", client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.answer_budget: int | None = None  # bytes of the answer still allowed ("cut")
        self.answer_rate: int | None = None  # bytes per second ("slow")
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def requests(self) -> None:
        """Client → server, applying the fault to each request that starts in a chunk."""
        try:
            while not self.closed.is_set():
                chunk = self.client.recv(65536)
                if not chunk:
                    break
                head = REQUEST_LINE.match(chunk)
                if head:
                    line = f"{head.group(1).decode()} {head.group(2).decode()}"
                    self.proxy.seen.append(line)
                    fault = self.proxy.fault_for(line)
                    self.answer_budget = self.answer_rate = None
                    if fault is not None:
                        if fault.kind == "drop":
                            break
                        if fault.kind == "http_error":
                            self.client.sendall(_error_response(fault))
                            break
                        if fault.kind == "blackhole":
                            while self.client.recv(65536):  # swallow until the client gives up
                                pass
                            break
                        if fault.kind == "delay":
                            time.sleep(fault.seconds)
                        elif fault.kind == "cut":
                            self.answer_budget = fault.after_bytes
                        elif fault.kind == "slow":
                            self.answer_rate = fault.bytes_per_s
                self.upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            self.close()

    def answers(self) -> None:
        """Server → client, cut short or slowed when the current request's fault says so."""
        try:
            while not self.closed.is_set():
                rate = self.answer_rate
                chunk = self.upstream.recv(min(65536, max(1, rate // 10)) if rate else 65536)
                if not chunk:
                    break
                budget = self.answer_budget
                if budget is not None:
                    if len(chunk) >= budget:
                        self.client.sendall(chunk[:budget])
                        break
                    self.answer_budget = budget - len(chunk)
                self.client.sendall(chunk)
                if rate:
                    time.sleep(len(chunk) / rate)
        except OSError:
            pass
        finally:
            self.close()


def _error_response(fault: Fault) -> bytes:
    body = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient","diagnostics":"injected"}]}'
    headers = [f"HTTP/1.1 {fault.status} Injected", "Content-Type: application/json",
               f"Content-Length: {len(body)}", "Connection: close"]
    if fault.retry_after is not None:
        headers.append(f"Retry-After: {fault.retry_after}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


class TcpProxy:
    """Listens on 127.0.0.1:`port`, forwards to 127.0.0.1:`upstream_port`."""

    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.fault: Fault | None = None
        self.seen: list[str] = []  # request lines, in order
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._connections: list[_Connection] = []
        self._stopped = threading.Event()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> "TcpProxy":
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()
        return self

    def fault_for(self, request_line: str) -> Fault | None:
        with self._lock:
            fault = self.fault
            return fault if fault is not None and fault.takes(request_line) else None

    def requests_matching(self, pattern: str) -> list[str]:
        return [line for line in list(self.seen) if re.search(pattern, line)]

    def reset_connections(self) -> None:
        """Close every open connection (the clients see them reset)."""
        for connection in list(self._connections):
            connection.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:  # the server is down: so is its port, as the client sees it
                client.close()
                continue
            connection = _Connection(self, client, upstream)
            self._connections = [c for c in self._connections if not c.closed.is_set()] + [connection]
            threading.Thread(target=connection.requests, daemon=True).start()
            threading.Thread(target=connection.answers, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        self.reset_connections()

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
