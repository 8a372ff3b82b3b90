"""The HTTP servers under test: how each starts, when it is ready, and how it stops.

Every server has 2 workers and a pool of 10 per worker where it has one, started from the
repository root in a session of its own, its output (access log included, as in production)
going to a file. The service runs through its production command, unchanged. Each WSGI stack
runs under gunicorn; the asyncio peer under uvicorn's own worker processes (`uvicorn
--workers`), as its users would run it.

The four stacks serve every workload of bench/workloads.py: this service and three peers, two
Flask + psycopg 3 (gthread, gevent) and one asyncio (Starlette + asyncpg on uvicorn). The
variants kept from issue 4 serve one workload each: the service's /healthz (ceiling) and a
connection per request (per-request).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from config import VARIABLES

ROOT = Path(__file__).resolve().parent.parent
VARIANTS_DIR = Path(__file__).resolve().parent / "variants"
WORKERS = 2
POOL_PER_WORKER = 10
POOL_TIMEOUT_S = 30  # wrk's own timeout
READY_DEADLINE_S = 60.0
STOP_DEADLINE_S = 40.0  # the service's graceful_timeout is 25 s
# /proc/net/tcp states of a socket a server still holds for a client: ESTABLISHED, SYN_RECV,
# CLOSE_WAIT (the client hung up, the server has not closed yet).
_HELD_STATES = {"01", "03", "08"}


def stop_everything_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so that the `finally` blocks stop what was started;
    a second SIGTERM while they run is ignored, so that it cannot cut the stopping short (as
    `timeout`, say, forwarding its own SIGTERM after a `pkill` would)."""

    def unwind(*_) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, unwind)


# What to count in a server's log: gunicorn's own messages and Python's.
LOG_EVENTS = {
    "workers booted": "Booting worker",
    "worker timeouts": "WORKER TIMEOUT",
    "tracebacks": "Traceback (most recent call last)",
    "too many open files": "Too many open files",
}


@dataclass(frozen=True)
class HttpVariant:
    name: str
    description: str
    config: Path | None  # gunicorn -c; None for an ASGI app that uvicorn serves
    path: str = ""  # what every URL asked for starts with, after the port
    workload: str | None = None  # the one workload it serves; None: every workload
    asgi_app: str = ""  # "module:attribute" of the app that uvicorn serves, when `config` is None

    def command(self, env: Mapping[str, str], root: Path = ROOT) -> list[str]:
        """The command that serves this variant on env's PORT with WEB_CONCURRENCY workers."""
        if self.config is None:
            return uvicorn_command(self.asgi_app, env, root)
        return gunicorn_command(self.config, root)


SERVICE_CONFIG = ROOT / "gunicorn.conf.py"
STACKS = ("service", "peer-gthread", "peer-gevent", "asyncio")
FLASK_PEERS = ("peer-gthread", "peer-gevent")
HTTP_VARIANTS = {
    "service": HttpVariant(
        "service",
        "this service through its production command (gunicorn.conf.py): gevent workers, "
        "psycopg2 + psycogreen, its pool and batch loader",
        SERVICE_CONFIG,
    ),
    "peer-gthread": HttpVariant(
        "peer-gthread",
        "Flask + psycopg 3 + psycopg_pool under gunicorn gthread workers, threads = pool size",
        VARIANTS_DIR / "peer.conf.py",
    ),
    "peer-gevent": HttpVariant(
        "peer-gevent",
        "the same Flask + psycopg 3 + psycopg_pool app under gunicorn's stock gevent worker "
        "(psycopg 3 waits in gevent's patched select.poll)",
        VARIANTS_DIR / "peer_gevent.conf.py",
    ),
    "asyncio": HttpVariant(
        "asyncio",
        "Starlette + asyncpg pool, handlers calling pool.fetchrow()/fetch(), under uvicorn's "
        "own worker processes (uvloop, httptools)",
        None,
        asgi_app="bench.variants.asyncio_peer:app",
    ),
    "ceiling": HttpVariant(
        "ceiling",
        "this service, GET /healthz: the same stack without the database",
        SERVICE_CONFIG,
        workload="healthz",
    ),
    "per-request": HttpVariant(
        "per-request",
        "Flask + psycopg2, a new connection per request, same gevent workers + psycogreen; "
        "GET /users/<random id> only",
        VARIANTS_DIR / "per_request.conf.py",
        workload="get",
    ),
}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a server the bench starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gunicorn_command(config: Path, root: Path = ROOT) -> list[str]:
    """`gunicorn -c CONFIG`, run from `root`: the checkout's own `.venv/bin/gunicorn` when it
    has one, else the running interpreter's."""
    shown = config.relative_to(root) if config.is_relative_to(root) else config
    return [*_launcher("gunicorn", root), "-c", str(shown)]


def uvicorn_command(app: str, env: Mapping[str, str], root: Path = ROOT) -> list[str]:
    """`uvicorn APP --workers N` on 127.0.0.1:PORT with uvloop and httptools, its access log
    on (uvicorn's default, named), run from `root` as `gunicorn_command` is."""
    return [
        *_launcher("uvicorn", root),
        app,
        "--host=127.0.0.1",
        f"--port={env['PORT']}",
        f"--workers={env['WEB_CONCURRENCY']}",
        "--loop=uvloop",
        "--http=httptools",
        "--access-log",
    ]


def _launcher(program: str, root: Path) -> list[str]:
    own = root / ".venv" / "bin" / program
    script = own if own.exists() else Path(sys.executable).with_name(program)
    return [str(script)] if script.exists() else [sys.executable, "-m", program]


def environment(database_url: str, port: int, worker_connections: int) -> dict[str, str]:
    """The service's own variables, which the other variants read too. Any other variable of
    the service set in this environment (`DB_POOL_TIMEOUT=30 make bench`) passes through."""
    return {**os.environ, **_set_by_bench(database_url, port, worker_connections)}


def passed_through(environ: Mapping[str, str]) -> dict[str, str]:
    """The service's variables set by the caller that the bench does not set itself, but for
    those Settings keeps out of its repr (URLs and tokens): the bench prints these."""
    ours = _set_by_bench("", 0, 0)
    return {
        name: environ[name]
        for name, field in VARIABLES.items()
        if name in environ and name not in ours and field.repr
    }


def _set_by_bench(database_url: str, port: int, worker_connections: int) -> dict[str, str]:
    # A closed loop of N connections waits N / throughput on average (Little's law): about
    # 8 s at 10,000 connections here. The default pool timeout (5 s) would answer that wait
    # with 503s, so every pooled server may wait as long as wrk does.
    return {
        "DATABASE_URL": database_url,
        "PORT": str(port),
        "WEB_CONCURRENCY": str(WORKERS),
        "WORKER_CONNECTIONS": str(worker_connections),
        "DB_POOL_MAX": str(POOL_PER_WORKER),
        "DB_MAX_CONNECTIONS": str(WORKERS * POOL_PER_WORKER),
        "DB_POOL_TIMEOUT": str(POOL_TIMEOUT_S),
    }


class Server:
    """One running server (gunicorn, or uvicorn for an ASGI variant), started from the checkout
    at `root` (this one by default); `stop()` ends it and every worker, whatever state it is
    in."""

    def __init__(
        self, variant: HttpVariant, env: dict[str, str], log_path: Path, root: Path = ROOT
    ):
        self.variant = variant
        self.env = env
        self.root = root
        self.port = int(env["PORT"])
        self.log_path = log_path
        self.start()

    def start(self) -> None:
        """Start the server, at first or again after `stop()`: its output goes to `log_path`,
        which it starts afresh."""
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.variant.command(self.env, self.root),
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The server's master process: its workers are its children."""
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.variant.path}"

    def wait_ready(self, paths: tuple[str, ...] = ("/healthz", "/users/1")) -> None:
        """Return once each of `paths` answers 200 in turn (by default: the service is up and a
        database request succeeds); raise RuntimeError with the server's log when it exits or
        is not ready in time."""
        deadline = time.monotonic() + READY_DEADLINE_S
        for path in paths:
            while not self._answers(path):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.variant.name} did not become ready:\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to the session (a graceful stop), SIGKILL after the deadline."""
        if self._proc.poll() is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def log_events(self) -> dict[str, int]:
        """How often the server's log tells of trouble (read after `stop()`)."""
        counts = dict.fromkeys(LOG_EVENTS, 0)
        with open(self.log_path, errors="replace") as log:
            for line in log:
                for name, marker in LOG_EVENTS.items():
                    if marker in line:
                        counts[name] += 1
        return counts

    def held_connections(self) -> int:
        """Client sockets the server still holds on its port (established or not yet closed)."""
        count = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                rows = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                fields = row.split()
                local, state = fields[1], fields[3]
                if state in _HELD_STATES and int(local.rsplit(":", 1)[1], 16) == self.port:
                    count += 1
        return count

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False
