"""A throwaway PgBouncer in transaction pooling mode in front of a PostgreSQL server, for tests.

Like deploy.localpg's cluster: its files live in a fresh folder that `stop()` removes, it
listens on 127.0.0.1 on a free port and on no Unix socket, and as root it runs as the postgres
user (PgBouncer refuses to run as root). It logs in to the server with the user and password
of the server's DSN, and accepts that same user and password from its clients (auth_file).
Every database of the server is reachable through it under its own name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg2
import psycopg2.extensions
from gunicorn_proc import free_port, wait_until

INSTALL_HINT = "pgbouncer is not installed: apt-get install pgbouncer (Debian/Ubuntu)"
START_DEADLINE_S = 15.0


def find_pgbouncer() -> str | None:
    """The pgbouncer binary; Debian puts it in /usr/sbin, which need not be on PATH."""
    return shutil.which("pgbouncer", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin")


class PgBouncer:
    """One PgBouncer: at most `pool_size` server connections per database and user."""

    def __init__(
        self,
        server_dsn: str,
        pool_size: int,
        max_client_conn: int = 200,
        ignore_startup_parameters: str = "",
    ):
        params = psycopg2.extensions.parse_dsn(server_dsn)
        self.user = params.get("user", "postgres")
        self.password = params.get("password", "")
        self._server = (params.get("host", "127.0.0.1"), params.get("port", "5432"))
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.ignore_startup_parameters = ignore_startup_parameters
        self.port = 0
        self._folder: Path | None = None
        self._proc: subprocess.Popen | None = None

    def dsn(self, dbname: str) -> str:
        return psycopg2.extensions.make_dsn(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=dbname
        )

    def start(self) -> PgBouncer:
        binary = find_pgbouncer()
        assert binary, INSTALL_HINT
        self._folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self._folder.chmod(0o755)
        self.port = free_port()
        (self._folder / "userlist.txt").write_text(f'"{self.user}" "{self.password}"\n')
        (self._folder / "pgbouncer.ini").write_text(self._config())
        as_root = os.geteuid() == 0
        if as_root:
            for path in (self._folder, *self._folder.iterdir()):
                shutil.chown(path, "postgres", "postgres")
        user = {"user": "postgres", "group": "postgres", "extra_groups": []} if as_root else {}
        with open(self._folder / "pgbouncer.log", "ab") as log:
            self._proc = subprocess.Popen(
                [binary, str(self._folder / "pgbouncer.ini")],
                stdout=log,
                stderr=log,
                start_new_session=True,
                **user,
            )
        self._wait_ready()
        return self

    def _config(self) -> str:
        host, port = self._server
        return f"""\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self._folder / "userlist.txt"}
admin_users = {self.user}
pool_mode = transaction
default_pool_size = {self.pool_size}
max_db_connections = {self.pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {self.max_client_conn}
ignore_startup_parameters = {self.ignore_startup_parameters}
"""

    def show(self, what: str) -> list[dict]:
        """Rows of the admin console's `SHOW <what>` (STATS, POOLS, ...), as dicts."""
        conn = psycopg2.connect(self.dsn("pgbouncer"))
        try:
            conn.autocommit = True  # the console knows no BEGIN
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}")
                names = [column.name for column in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def _wait_ready(self) -> None:
        try:
            wait_until(self._answers, START_DEADLINE_S, "pgbouncer to start", every=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.log}") from None

    def _answers(self) -> bool:
        if self._proc.poll() is not None:
            raise AssertionError("pgbouncer exited at start")
        try:
            self.show("VERSION")
        except psycopg2.OperationalError:
            return False
        return True

    @property
    def log(self) -> str:
        return (self._folder / "pgbouncer.log").read_text(errors="replace")

    def stop(self) -> None:
        """Shut down at once (SIGINT would wait for clients) and remove the folder."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
