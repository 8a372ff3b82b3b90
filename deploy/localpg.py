"""A throwaway local PostgreSQL cluster, for `make run`, the tests and the benchmarks.

Why a module of our own: `make run` and `make test` must work on a fresh machine with nothing
but the system's PostgreSQL binaries. The cluster lives in a fresh folder, listens only on
127.0.0.1 on a free port (no Unix socket, so no system socket directory is needed), uses a
random password, and is removed when stopped.

`initdb` and `postgres` refuse to run as root; as root they run as the `postgres` user (the
process itself changes user, like `runuser -u postgres`, but with no runuser process in between
to swallow the shutdown signals), and the same code runs unchanged as an ordinary user.

Command line: `python -m deploy.localpg [--] COMMAND...` runs COMMAND with `DATABASE_URL`
set. When `DATABASE_URL` is already set it runs COMMAND against that server and starts
nothing. Either way COMMAND runs in a session of its own, and Ctrl-C (or SIGTERM) reaches it as
one SIGTERM, gunicorn's graceful stop; the cluster is stopped after COMMAND exits.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2

START_DEADLINE_S = 60.0
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"  # one folder per installed major version
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, postgres) were not found. Install them "
    "(Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew install postgresql`), "
    "put their folder on PATH or in PG_BINDIR, or set DATABASE_URL to an existing server."
)


class LocalPostgresError(RuntimeError):
    """The throwaway cluster could not be created or started; the message says why."""


def find_bindir() -> Path:
    """Where initdb and postgres live: PG_BINDIR, else PATH, then Debian's versioned folders.

    A PG_BINDIR set is the only folder looked at: when it holds no server, that is reported
    rather than silently replaced by some other installation. An initdb on PATH counts where
    it really lives, its symlinks followed: a folder of links to initdb and postgres alone has
    no pg_basebackup beside them.
    """
    if os.environ.get("PG_BINDIR"):
        candidates = [Path(os.environ["PG_BINDIR"])]
    else:
        on_path = shutil.which("initdb")
        candidates = [Path(on_path).resolve().parent] if on_path else []
        debian = sorted(glob.glob(DEBIAN_BINDIRS), key=_version_key, reverse=True)
        candidates += [Path(p) for p in debian]
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "postgres").exists():
            return folder
    raise LocalPostgresError(INSTALL_HINT)


def _version_key(path: str) -> int:
    version = Path(path).parent.name
    return int(version) if version.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalPostgres:
    """One throwaway cluster: `start()` returns once it accepts connections, `stop()` removes it.

    `settings` are extra `postgres -c` settings (the benchmarks raise max_connections).
    Durability is off (fsync, synchronous_commit): the data is thrown away anyway.
    """

    def __init__(self, parent: str | os.PathLike | None = None, settings: dict | None = None):
        self._parent = Path(parent) if parent else None
        self._settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            **(settings or {}),
        }
        self._as_root = os.geteuid() == 0
        self._proc: subprocess.Popen | None = None
        self._folder: Path | None = None
        self.port = 0
        self.password = secrets.token_urlsafe(18)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{dbname}"

    @property
    def pid(self) -> int:
        """The postmaster's pid (tests stop and restart the server through it)."""
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self) -> LocalPostgres:
        bindir = find_bindir()
        self._folder = Path(tempfile.mkdtemp(prefix="localpg-", dir=self._parent))
        self._folder.chmod(0o755)
        data = self._folder / "data"
        pwfile = self._folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            shutil.chown(self._folder, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        self.port = _free_port()
        self.launch(bindir)
        return self

    def launch(self, bindir: Path | None = None) -> None:
        """Start the postmaster on the existing data folder and wait until it answers."""
        bindir = bindir or find_bindir()
        args = [str(bindir / "postgres"), "-D", str(self._folder / "data"), "-p", str(self.port)]
        for key, value in self._settings.items():
            args += ["-c", f"{key}={value}"]
        log = open(self._folder / "server.log", "ab")  # noqa: SIM115 - the server writes it
        # A session of its own: Ctrl-C in the terminal must reach the service, not the server.
        self._proc = subprocess.Popen(
            args, stdout=log, stderr=log, start_new_session=True, **self._user
        )
        log.close()
        self._wait_ready()

    def halt(self, mode: str = "fast") -> None:
        """Stop the postmaster but keep the data folder (tests restart it with `launch`)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        self._proc.send_signal(sig)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        """Stop the server and remove every file of the cluster."""
        self.halt()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def create_database(self, name: str) -> str:
        """Create database `name` and return its DSN."""
        admin = psycopg2.connect(self.dsn())
        try:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            admin.close()
        return self.dsn(name)

    @property
    def _user(self) -> dict:
        """subprocess arguments that drop root to the postgres user."""
        if not self._as_root:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _run(self, args: list[str]) -> None:
        done = subprocess.run(args, capture_output=True, text=True, **self._user)
        if done.returncode != 0:
            raise LocalPostgresError(f"{Path(args[0]).name} failed:\n{done.stdout}{done.stderr}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if self._proc.poll() is not None:
                raise LocalPostgresError(f"postgres exited at start:\n{self._log_tail()}")
            try:
                psycopg2.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise LocalPostgresError(
                        f"postgres did not start:\n{self._log_tail()}"
                    ) from None
                time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return (self._folder / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no server log)"

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_with_database(command: list[str]) -> int:
    """Run `command` with DATABASE_URL pointing at a throwaway cluster, or at the server that
    DATABASE_URL already names (starting nothing); return its exit code."""
    if os.environ.get("DATABASE_URL"):
        return _run(command, dict(os.environ))
    try:
        server = LocalPostgres(parent=_project_folder()).start()
    except LocalPostgresError as exc:
        print(f"localpg: {exc}", file=sys.stderr)
        return 2
    try:
        env = {**os.environ, "DATABASE_URL": server.create_database("app")}
        print(f"localpg: throwaway PostgreSQL on 127.0.0.1:{server.port}", flush=True)
        return _run(command, env)
    finally:
        server.stop()
        print("localpg: throwaway PostgreSQL stopped and removed", flush=True)


def _run(command: list[str], env: dict[str, str]) -> int:
    """Run `command` until it exits; any signal that would end us becomes one SIGTERM to it.

    The child has a session of its own, so a terminal's Ctrl-C (or Ctrl-\\, or its closing)
    reaches only us. Passed on as it is, SIGINT or SIGQUIT would be gunicorn's quick stop, which
    drops requests in flight; SIGTERM is its graceful one. Left unhandled, they would end us and
    leave gunicorn running with nobody to stop it.
    """
    child: subprocess.Popen | None = None
    stopping = False

    def stop(*_) -> None:
        nonlocal stopping
        if child is not None and not stopping:
            child.send_signal(signal.SIGTERM)
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, stop)
    child = subprocess.Popen(command, env=env, start_new_session=True)
    if stopping:  # a signal came while it was starting
        child.send_signal(signal.SIGTERM)
    return child.wait()


def _project_folder() -> Path | None:
    """`.localpg/` beside the project when the server's user can enter it, else the temp folder."""
    folder = Path(__file__).resolve().parent.parent / ".localpg"
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        return folder
    reachable = subprocess.run(["test", "-x", str(folder)], user="postgres")
    if reachable.returncode == 0:
        return folder
    return None


def main(argv: list[str]) -> int:
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        print("usage: python -m deploy.localpg [--] COMMAND...", file=sys.stderr)
        return 2
    return run_with_database(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
