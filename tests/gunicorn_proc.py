"""The production command, `gunicorn -c gunicorn.conf.py`, as a subprocess for end-to-end tests.

`Gunicorn` starts it from the repository root with a test-sized environment, waits until every
worker serves, and stops it with SIGTERM. It listens on 127.0.0.1 only: `GUNICORN_CMD_ARGS`
narrows the production bind (0.0.0.0:$PORT) to the loopback address on the same port.
Helpers here speak plain HTTP/1.1 through `http.client`, which is green once gevent has patched
the test process (tests/conftest.py does, first thing).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import gevent
from gevent.event import Event

from config import VARIABLES

REPO = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"
HOST = "127.0.0.1"
START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 35.0  # gunicorn.conf.py's graceful_timeout (30 s) and a margin

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str, every: float = 0.02) -> T:
    """Poll `check` until it returns something truthy, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        gevent.sleep(every)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def call(
    port: int,
    method: str,
    path: str,
    body: object = None,
    *,
    go: Event | None = None,
    connected: list | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict | None]:
    """One request on a fresh connection; returns the status and the decoded JSON body.

    With `go`, the connection is opened first (and counted in `connected`), then the request
    waits for `go`: that is how a test holds hundreds of connections open at once.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.connect()
        if go is not None:
            if connected is not None:
                connected.append(conn)
            go.wait(timeout)
        headers = {}
        payload = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            payload = json.dumps(body)
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


def access_lines(lines: list[dict], request_id: str | None = None) -> list[dict]:
    """The service's access log lines among decoded JSON log lines (of one request)."""
    return [
        line
        for line in lines
        if line["logger"] == "service.access" and request_id in (None, line["request_id"])
    ]


def refuses_connections(port: int) -> bool:
    """True once nothing listens on the port any more."""
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


class Gunicorn:
    """One `gunicorn -c gunicorn.conf.py` process with its output in `log_path`.

    `env` adds to the test environment, which holds DATABASE_URL and PORT and none of the
    service's other variables, whatever the calling shell has set; it must set WEB_CONCURRENCY.
    """

    def __init__(self, database_url: str, log_path: Path, **env: str):
        self.port = free_port()
        self.log_path = log_path
        inherited = {
            key: value
            for key, value in os.environ.items()
            if key not in {var.name for var in VARIABLES} | {"DATABASE_URL", "GUNICORN_CMD_ARGS"}
        }
        self.env = {
            **inherited,
            "DATABASE_URL": database_url,
            "PORT": str(self.port),
            "GUNICORN_CMD_ARGS": f"--bind={HOST}:{self.port}",
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> Gunicorn:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(GUNICORN), "-c", "gunicorn.conf.py"],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = START_DEADLINE_S) -> Gunicorn:
        """Until /healthz and /readyz answer 200 and every worker has opened its pool."""
        try:
            wait_until(self._ready, timeout, "gunicorn to serve")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{self.log}") from None
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log}")
        try:
            probes = [
                call(self.port, "GET", path, timeout=2)[0] for path in ("/healthz", "/readyz")
            ]
        except OSError:
            return False
        workers = int(self.env["WEB_CONCURRENCY"])
        return probes == [200, 200] and len(self.log_lines("pool open")) >= workers

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self, text: str) -> list[str]:
        return [line for line in self.log.splitlines() if text in line]

    def refused(self, timeout: float = 15.0) -> int:
        """Start, expecting gunicorn to refuse: its exit code, which must not be 0; fails when it
        is still running after `timeout`, or booted a worker."""
        self.start()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.terminate()
            raise AssertionError(f"gunicorn kept running:\n{self.log}") from None
        assert code != 0, self.log
        assert "Booting worker" not in self.log
        return code

    def terminate(self, timeout: float = STOP_DEADLINE_S) -> int:
        """SIGTERM the master and return its exit code; kill it and fail if it outlives timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"gunicorn ignored SIGTERM for {timeout:g} s:\n{self.log}"
            ) from None

    def __enter__(self) -> Gunicorn:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.terminate()
            raise

    def __exit__(self, *exc) -> None:
        code = self.terminate()
        assert code == 0, f"gunicorn exited with {code}:\n{self.log}"
