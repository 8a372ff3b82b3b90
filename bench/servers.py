"""The HTTP servers under test: how each starts, when it is ready, and how it stops.

Every server is gunicorn with 2 workers and a pool of 10 per worker where it has one, started
from the repository root in a session of its own, its output (access log included, as in
production) going to a file. The service runs through its production command, unchanged.
"""

from __future__ import annotations

import os
import signal
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
USERS_LUA = Path(__file__).resolve().parent / "users.lua"
WORKERS = 2
POOL_PER_WORKER = 10
POOL_TIMEOUT_S = 30  # wrk's own timeout
READY_DEADLINE_S = 60.0
STOP_DEADLINE_S = 40.0  # the service's graceful_timeout is 30 s


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
    config: Path  # gunicorn -c
    path: str  # the URL path wrk asks for, or the prefix its Lua script completes
    lua: Path | None = None


SERVICE_CONFIG = ROOT / "gunicorn.conf.py"
HTTP_VARIANTS = {
    "pooled": HttpVariant(
        "pooled",
        "this service, GET /users/<random id>, production command",
        SERVICE_CONFIG,
        "/users/",
        USERS_LUA,
    ),
    "ceiling": HttpVariant(
        "ceiling",
        "this service, GET /healthz: the same stack without the database",
        SERVICE_CONFIG,
        "/healthz",
    ),
    "per-request": HttpVariant(
        "per-request",
        "Flask + psycopg2, a new connection per request, same gevent workers + psycogreen",
        VARIANTS_DIR / "per_request.conf.py",
        "/users/",
        USERS_LUA,
    ),
    "peer": HttpVariant(
        "peer",
        "Flask + psycopg 3 + psycopg_pool under gunicorn gthread workers",
        VARIANTS_DIR / "peer.conf.py",
        "/users/",
        USERS_LUA,
    ),
}


def gunicorn_command(config: Path, root: Path = ROOT) -> list[str]:
    """`gunicorn -c CONFIG`, run from `root`: the checkout's own `.venv/bin/gunicorn` when it
    has one, else the running interpreter's."""
    own = root / ".venv" / "bin" / "gunicorn"
    script = own if own.exists() else Path(sys.executable).with_name("gunicorn")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "gunicorn"]
    shown = config.relative_to(root) if config.is_relative_to(root) else config
    return [*launcher, "-c", str(shown)]


def environment(database_url: str, port: int, worker_connections: int) -> dict[str, str]:
    """The service's own variables, which the other variants read too. Any other variable of
    the service set in this environment (`DB_POOL_TIMEOUT=30 make bench`) passes through."""
    return {**os.environ, **_set_by_bench(database_url, port, worker_connections)}


def passed_through(environ: Mapping[str, str]) -> dict[str, str]:
    """The service's variables set by the caller that the bench does not set itself."""
    ours = _set_by_bench("", 0, 0)
    return {v.name: environ[v.name] for v in VARIABLES if v.name in environ and v.name not in ours}


def _set_by_bench(database_url: str, port: int, worker_connections: int) -> dict[str, str]:
    # A closed loop of N connections waits N / throughput on average (Little's law): about
    # 8 s at 10,000 connections here. The default pool timeout (5 s) would answer that wait
    # with 503s, so both pooled servers may wait as long as wrk does.
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
    """One running gunicorn, started from the checkout at `root` (this one by default);
    `stop()` ends it and every worker, whatever state it is in."""

    def __init__(
        self, variant: HttpVariant, env: dict[str, str], log_path: Path, root: Path = ROOT
    ):
        self.variant = variant
        self.port = int(env["PORT"])
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(
                gunicorn_command(variant.config, root),
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The gunicorn master's pid: its workers are its children."""
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
        """SIGTERM to the session (gunicorn's graceful stop), SIGKILL after the deadline."""
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

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False
