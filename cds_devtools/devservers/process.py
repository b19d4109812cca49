"""The process handling both development servers share: a child process with a log, started,
waited for, stopped on any exit (also when the interpreter exits with it still running), and
SIGTERM/SIGHUP turned into KeyboardInterrupt so that the `finally` stopping the servers runs."""

from __future__ import annotations

import atexit
import copy
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import httpx

LOOPBACK = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A dev server exited or did not become ready; the message ends with its log tail."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True if GET url answers 200 (no proxies from the environment: loopback only)."""
    try:
        return httpx.get(url, timeout=timeout, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


_RUNNING: set["ManagedProcess"] = set()
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:  # a crashed test session must not leave servers behind
    with _RUNNING_LOCK:
        leftovers = list(_RUNNING)
    for proc in leftovers:
        proc.stop(timeout=5)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: Any) -> None:
    for stop in STOP_SIGNALS:  # the clean-up this starts is not cut short by a second signal
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def stopped_like_ctrl_c() -> Iterator[None]:
    """SIGTERM and SIGHUP (`kill`, a process manager, a closed terminal) raise KeyboardInterrupt
    in the main thread, as Ctrl-C does, so the `finally` that stops the servers runs: without
    it Python dies at once and Orthanc, the FHIR server and the service outlive the script."""
    previous = {stop: signal.signal(stop, _interrupt) for stop in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


class ManagedProcess:
    """A child process with a log file, a URL and a clean `stop()`.

    stdout and stderr go to `log_path`. Use as a context manager, or call `stop()`; processes
    still running when the interpreter exits are stopped too.
    """

    def __init__(
        self,
        name: str,
        cmd: Sequence[str | os.PathLike[str]],
        *,
        url: str,
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.cmd = [str(c) for c in cmd]
        self.url = url
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}" if self.proc else "not started"
        return f"<{type(self).__name__} {self.name} {self.url} pid={self.pid} {state}>"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> "ManagedProcess":
        if self.proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the child
            )
        except OSError as exc:
            self._log_file.close()
            raise ServerStartError(f"{self.name}: cannot run {self.cmd[0]}: {exc}") from exc
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start_ready(self, check: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1,
                    stop_timeout: float = 10.0) -> "ManagedProcess":
        """`start()`, then `wait_ready()`; stopped again when it does not get ready (or the wait is interrupted)."""
        self.start()
        try:
            return self.wait_ready(check, timeout, interval)
        except BaseException:
            self.stop(timeout=stop_timeout)
            raise

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0, interval: float = 0.1) -> "ManagedProcess":
        """Poll `check()` until it returns True. Raises ServerStartError (with the log tail)
        if the process exits first or `timeout` seconds pass; exceptions from `check` count
        as "not ready yet"."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self.proc.returncode} during start-up "
                    f"(command: {' '.join(self.cmd)}).\n--- last lines of {self.log_path} ---\n{self.log_tail()}"
                )
            try:
                if check():
                    return self
                last_error = None
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = exc
            if time.monotonic() >= deadline:
                why = f" (last check error: {last_error!r})" if last_error else ""
                raise ServerStartError(
                    f"{self.name} did not become ready within {timeout:.0f}s{why}.\n"
                    f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
                )
            time.sleep(interval)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate (SIGTERM), then kill after `timeout` seconds. Returns the exit code.
        Safe to call more than once."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        return proc.returncode if proc is not None else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                tail = deque(fh, maxlen=lines)
        except OSError:
            return "(no log)"
        return b"".join(tail).decode("utf-8", errors="replace").rstrip() or "(log is empty)"

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
