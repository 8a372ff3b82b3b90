"""The production command, `gunicorn -c gunicorn.conf.py`, as a subprocess for end-to-end tests.

`Gunicorn` starts it from the repository root with a test-sized environment, waits until every
worker serves, and stops it with SIGTERM. It listens on 127.0.0.1 only: `GUNICORN_CMD_ARGS`
narrows the production bind (0.0.0.0:$PORT) to the loopback address on the same port.

`request` is the tests' one HTTP client: plain HTTP/1.1 through `http.client`, which is green
once gevent has patched the test process (tests/conftest.py does, first thing). `metric` and
`scrape_metrics` read /metrics through it; `wait_until` is the tests' one way to wait for
something, polling with a deadline. (tests/loadgen.py sends the load tests' requests: it times
and classifies each end instead of raising.)
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gevent
from gevent.event import Event
from prometheus_client.parser import text_string_to_metric_families

from config import VARIABLES

REPO = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"
HOST = "127.0.0.1"
# A request that holds a pooled connection of its own for one statement: a delete of a user
# that does not exist (404, nothing changes). Lookups and pages go through batch loaders and
# share statements, so N of them do not hold N connections; N of these do.
MISSING_USER = "/users/9223372036854775807"
START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 35.0  # gunicorn.conf.py's graceful_timeout (25 s) and a margin

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


@dataclass(frozen=True)
class Reply:
    """A complete response: its status, its headers as the server spelled them, its raw body."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        """The body decoded from JSON; None when there is none. Raises ValueError on any other."""
        return json.loads(self.body) if self.body else None


def request(
    port: int,
    method: str,
    path: str,
    body: object = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    go: Event | None = None,
    connected: list | None = None,
) -> Reply:
    """One request on a fresh connection to 127.0.0.1:`port`, `body` (if any) sent as JSON;
    returns the complete response. Raises what `http.client` raises when none comes: OSError
    (refused, reset, closed, no answer within `timeout`) or an HTTPException (a cut response).

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
        sent = dict(headers or {})
        payload = None
        if body is not None:
            sent["Content-Type"] = "application/json"
            payload = json.dumps(body)
        conn.request(method, path, body=payload, headers=sent)
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One whole response from a raw socket: its head (status line and fields) and a body of
    its Content-Length bytes (none without one). Fails when the connection closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without a whole head, after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
    length = int(found[1]) if found else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head, body[:length]


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_metrics(
    port: int, headers: dict[str, str] | None = None
) -> dict[tuple[str, frozenset], float]:
    """Every sample of the service's /metrics, by name and labels: whichever worker answers
    adds up every worker's. Fails unless it answers 200; it never touches the database."""
    reply = request(port, "GET", "/metrics", headers=headers)
    assert reply.status == 200, reply.body
    return parse_metrics(reply.body.decode())


def metric(port: int, name: str) -> float:
    """A value of the service's /metrics, added up over its labels and every worker."""
    return sum(value for (sample, _), value in scrape_metrics(port).items() if sample == name)


def access_lines(lines: list[dict], request_id: str | None = None) -> list[dict]:
    """The service's access log lines among decoded JSON log lines (of one request)."""
    return [
        line
        for line in lines
        if line["logger"] == "service.access" and request_id in (None, line["request_id"])
    ]


def refuses_connections(port: int) -> bool:
    """True once nothing listens on the port any more. A connect that was queued as the
    listener closed is reset, which says nothing yet: the next one is refused."""
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


def socket_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process `pid` holds open (Linux /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def children(pid: int) -> set[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # exited meanwhile
            continue
        if parent == pid:
            found.add(int(entry))
    return found


class Gunicorn:
    """One `gunicorn -c gunicorn.conf.py` process with its output in `log_path`.

    `env` adds to the test environment, which holds DATABASE_URL and PORT and none of the
    service's other variables, whatever the calling shell has set; it must set WEB_CONCURRENCY.
    DRAIN_SECONDS is 0 unless `env` sets it: every test stops its server with SIGTERM, and all
    but tests/test_drain.py are about something other than the drain, which would add its
    seconds (5 by default) to each stop.
    """

    def __init__(self, database_url: str, log_path: Path, **env: str):
        self.port = free_port()
        self.log_path = log_path
        inherited = {
            key: value
            for key, value in os.environ.items()
            if key not in VARIABLES and key != "GUNICORN_CMD_ARGS"
        }
        self.env = {
            **inherited,
            "DATABASE_URL": database_url,
            "PORT": str(self.port),
            "GUNICORN_CMD_ARGS": f"--bind={HOST}:{self.port}",
            "DRAIN_SECONDS": "0",
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
                request(self.port, "GET", path, timeout=2).status
                for path in ("/healthz", "/readyz")
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
