"""A throwaway local PostgreSQL cluster, for `make run`, the tests and the benchmarks: a primary
and, when asked, streaming replicas of it.

Why a module of our own: `make run` and `make test` must work on a fresh machine with nothing
but the system's PostgreSQL binaries. The cluster lives in a fresh folder, listens only on
127.0.0.1 on a free port (no Unix socket, so no system socket directory is needed), uses a
random password, and is removed when stopped. A replica (`LocalPostgres.start_replica()`) is
one more such folder and port, made by `pg_basebackup` from the primary, with the same
password, and fault controls for the tests: an apply delay, a pause, a halt, a promotion.

`initdb` and `postgres` refuse to run as root; as root they run as the `postgres` user (the
process itself changes user, like `runuser -u postgres`, but with no runuser process in between
to swallow the shutdown signals), and the same code runs unchanged as an ordinary user.

Command line: `python -m deploy.localpg [--replicas N] [--] COMMAND...` runs COMMAND with
`DATABASE_URL` set, and with `--replicas N` also `DATABASE_REPLICA_URLS`: the URLs of N
streaming replicas of that database, separated by single spaces (a libpq URL may hold commas,
never whitespace). When `DATABASE_URL` is already set it runs COMMAND against that server and
starts nothing; `--replicas` is then refused (exit 2), since only a server of our own can be
given replicas. Either way COMMAND runs in a session of its own, and Ctrl-C (or SIGTERM)
reaches it as one SIGTERM, gunicorn's graceful stop; the servers are stopped after COMMAND exits.
"""

from __future__ import annotations

import argparse
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
SETTLE_DEADLINE_S = 30.0  # for a change to show: a reload, a promotion, a pause, a catch-up
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


def _proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name: state, ppid, pgrp, ..."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def _descendants(root: int) -> list[int]:
    """Every live process below `root` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(_proc_stat(int(entry))[1])
        except (OSError, IndexError):  # it exited while we looked
            continue
        children.setdefault(parent, []).append(int(entry))
    found, below = [], list(children.get(root, []))
    while below:
        pid = below.pop()
        found.append(pid)
        below += children.get(pid, [])
    return found


def _wait_for_state(pid: int, state: str) -> None:
    """Return once /proc shows `pid` in `state` ("T": stopped by a signal)."""
    deadline = time.monotonic() + SETTLE_DEADLINE_S
    while _proc_stat(pid)[0] != state:
        if time.monotonic() > deadline:
            raise LocalPostgresError(f"process {pid} did not reach state {state}")
        time.sleep(0.001)


class LocalPostgres:
    """One throwaway cluster: `start()` returns once it accepts connections, `stop()` removes it.

    `settings` are extra `postgres -c` settings (the benchmarks raise max_connections); set on
    the command line, they win over `ALTER SYSTEM`. Durability is off (fsync,
    synchronous_commit, full_page_writes): the data is thrown away anyway.

    Every cluster can feed streaming replicas (`start_replica()`): wal_level=replica, 10 WAL
    senders and 10 replication slots (PostgreSQL's defaults, written out because replication
    depends on them; a replica holds one of each, a `pg_basebackup` in progress two senders),
    and initdb's pg_hba.conf already admits replication from 127.0.0.1 with the password.
    None of this needs durability: `pg_basebackup` forces full-page writes while it copies.
    With synchronous_commit off a commit reaches the replicas when the WAL writer flushes it,
    within three times wal_writer_delay (200 ms), not when COMMIT returns; pass
    `settings={"synchronous_commit": "on"}` for a primary whose commits must be on their way
    when they return (it costs a write(), not an fsync).
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
            "wal_level": "replica",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            **(settings or {}),
        }
        self._as_root = os.geteuid() == 0
        self._proc: subprocess.Popen | None = None
        self._folder: Path | None = None
        self._paused = False
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
        self._folder = self._new_folder()
        data = self._folder / "data"
        pwfile = self._folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
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
        """Stop the postmaster but keep the data folder (tests restart it with `launch`).

        `mode` is pg_ctl's: "smart" waits for the clients to leave, "fast" ends their sessions,
        "immediate" ends every process at once, with no shutdown checkpoint (a crash, recovered
        from at the next `launch`). A paused server is resumed first, so that it can hear the
        signal. After 30 s the postmaster is killed (SIGKILL).
        """
        if self._proc is None or self._proc.poll() is not None:
            return
        if self._paused:
            self.resume()
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
        self._fetchone(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def start_replica(self, settings: dict | None = None) -> LocalReplica:
        """A new streaming replica of this running server, ready: see `LocalReplica.start()`.

        It is started with this server's settings and then `settings` (a standby needs at
        least the primary's max_connections and max_wal_senders); a replica that cannot be
        started is removed before the error is raised.
        """
        replica = LocalReplica(self, settings)
        try:
            return replica.start()
        except BaseException:
            replica.stop()
            raise

    def current_lsn(self) -> int:
        """Where this primary has written its WAL to, `pg_current_wal_lsn()`, as a byte
        position (comparable with `LocalReplica.replay_lsn()`), past every commit that has
        returned: with synchronous_commit off a returned commit may wait for the WAL writer,
        so a transaction of one WAL record (`pg_logical_emit_message`, which any wal_level
        takes) commits synchronously first, writing that backlog. On a server in recovery it
        raises psycopg2.InternalError ("cannot assign TransactionIds during recovery").
        """
        (lsn,) = self._fetchone(
            "BEGIN; SET LOCAL synchronous_commit = on;"
            " SELECT pg_logical_emit_message(true, 'localpg', 'current_lsn'); COMMIT;"
            " SELECT (pg_current_wal_lsn() - '0/0')::bigint"
        )
        return lsn

    def pause(self) -> None:
        """Freeze the whole server with SIGSTOP, so that it answers nothing: connections are
        accepted by the kernel and never served, queries in flight never return.

        The postmaster is stopped first, so that it forks no new process, then every process
        below it, found through /proc (parent pids): PostgreSQL puts each child in a process
        group of its own, so the postmaster's group would not reach them. While paused, the
        server's clients and peers see their own timeouts: a primary's wal_sender_timeout (60
        s) ends a paused replica's stream, and the replica streams again once resumed. `halt()`
        and `stop()` resume it first.
        """
        os.kill(self.pid, signal.SIGSTOP)
        _wait_for_state(self.pid, "T")
        for pid in _descendants(self.pid):
            os.kill(pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo `pause()`: SIGCONT to the processes below the postmaster, then to it."""
        for pid in _descendants(self.pid):
            os.kill(pid, signal.SIGCONT)
        os.kill(self.pid, signal.SIGCONT)
        self._paused = False

    @property
    def _user(self) -> dict:
        """subprocess arguments that drop root to the postgres user."""
        if not self._as_root:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _new_folder(self) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="localpg-", dir=self._parent))
        folder.chmod(0o755)
        if self._as_root:
            shutil.chown(folder, "postgres")
        return folder

    def _run(self, args: list[str], env: dict[str, str] | None = None) -> None:
        done = subprocess.run(args, capture_output=True, text=True, env=env, **self._user)
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

    def _fetchone(self, sql: str, params: tuple = ()) -> tuple | None:
        """Run one statement in autocommit on the `postgres` database; its first row, if any."""
        conn = psycopg2.connect(self.dsn(), connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchone() if cur.description else None
        finally:
            conn.close()

    def _log_tail(self) -> str:
        try:
            return (self._folder / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no server log)"

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalReplica(LocalPostgres):
    """A streaming replica of a running `LocalPostgres`: a hot standby that serves reads.

    `start()` copies the primary with `pg_basebackup -X stream -R` through a replication slot
    of its own (the primary keeps the WAL the replica has yet to receive, however long it is
    halted or paused), and returns once the replica is in recovery and streaming. `stop()`
    removes its folder and, when the primary still runs, drops its slot.

    Settings as the primary's (see `LocalPostgres`), plus hot_standby=on, and PostgreSQL's
    defaults otherwise: hot_standby_feedback off and max_standby_streaming_delay 30 s, so that
    a VACUUM on the primary cancels a standby query that still needs the rows it removed
    (SQLSTATE 40001) once it has held up replay for 30 s; `settings` may set it to 0 to cancel
    at once.
    """

    def __init__(self, primary: LocalPostgres, settings: dict | None = None):
        standby = {**primary._settings, "hot_standby": "on", **(settings or {})}
        super().__init__(parent=primary._parent, settings=standby)
        self.primary = primary
        self.password = primary.password
        self.slot = f"replica_{secrets.token_hex(4)}"

    def start(self) -> LocalReplica:
        """Copy the primary and start streaming from it; returns once the replica accepts
        connections, is in recovery and its WAL receiver streams. The password goes to
        `pg_basebackup` in its environment (PGPASSWORD), never on its command line; `-R` then
        writes it into the replica's primary_conninfo (postgresql.auto.conf, mode 0600)."""
        bindir = find_bindir()
        if not (bindir / "pg_basebackup").exists():
            raise LocalPostgresError(f"pg_basebackup is missing from {bindir}")
        self._folder = self._new_folder()
        self._run(
            [
                str(bindir / "pg_basebackup"),
                "--pgdata",
                str(self._folder / "data"),
                f"--dbname=host=127.0.0.1 port={self.primary.port} user=postgres",
                "--no-password",
                "--wal-method=stream",
                "--create-slot",
                f"--slot={self.slot}",
                "--write-recovery-conf",
                "--checkpoint=fast",
                "--no-sync",
            ],
            env={**os.environ, "PGPASSWORD": self.password},
        )
        self.port = _free_port()
        self.launch(bindir)
        return self

    def stop(self) -> None:
        """Stop the replica, remove its files and drop its slot on the primary, unless the
        primary has stopped (its slots go with it) or is paused (the slot then stays, keeping
        WAL). Raises LocalPostgresError when the slot is still in use after SETTLE_DEADLINE_S."""
        super().stop()
        primary = self.primary
        if primary._proc is None or primary._proc.poll() is not None or primary._paused:
            return
        # The primary's WAL sender leaves the slot once it sees the replica's connection close.
        deadline = time.monotonic() + SETTLE_DEADLINE_S
        while primary._fetchone(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
        ) == (True,):
            if time.monotonic() > deadline:
                raise LocalPostgresError(f"replication slot {self.slot} is still in use")
            time.sleep(0.01)
        primary._fetchone(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (self.slot,),
        )

    def set_apply_delay(self, seconds: float) -> None:
        """Replay each commit `seconds` after the primary made it (recovery_min_apply_delay,
        through ALTER SYSTEM and a reload, no restart); 0 removes the delay. Returns once the
        server shows the new value; raises LocalPostgresError when it does not within
        SETTLE_DEADLINE_S (as when `settings` fixed it on the command line)."""
        if seconds:
            milliseconds = f"{round(seconds * 1000)}ms"
            self._fetchone("ALTER SYSTEM SET recovery_min_apply_delay = %s", (milliseconds,))
        else:
            self._fetchone("ALTER SYSTEM RESET recovery_min_apply_delay")
        self._fetchone("SELECT pg_reload_conf()")
        wanted = (round(seconds * 1000),)
        deadline = time.monotonic() + SETTLE_DEADLINE_S
        query = "SELECT setting::int FROM pg_settings WHERE name = 'recovery_min_apply_delay'"
        while self._fetchone(query) != wanted:
            if time.monotonic() > deadline:
                raise LocalPostgresError(f"recovery_min_apply_delay did not become {seconds} s")
            time.sleep(0.01)

    def promote(self) -> None:
        """End recovery (`pg_promote()`): the replica becomes a primary of its own, on a new
        timeline, and accepts writes; returns once `pg_is_in_recovery()` is false. Its slot on
        the old primary stays until `stop()`. Raises LocalPostgresError when promotion does
        not end within SETTLE_DEADLINE_S."""
        self._fetchone("SELECT pg_promote(true, %s)", (int(SETTLE_DEADLINE_S),))
        deadline = time.monotonic() + SETTLE_DEADLINE_S
        while self._fetchone("SELECT pg_is_in_recovery()") != (False,):
            if time.monotonic() > deadline:
                raise LocalPostgresError(f"promotion did not end:\n{self._log_tail()}")
            time.sleep(0.01)

    def replay_lsn(self) -> int:
        """How far this replica has replayed the primary's WAL, `pg_last_wal_replay_lsn()`, as
        a byte position comparable with the primary's `current_lsn()`. After a promotion, the
        last position replayed in recovery."""
        (lsn,) = self._fetchone("SELECT (pg_last_wal_replay_lsn() - '0/0')::bigint")
        return lsn

    def catch_up(self, timeout: float = SETTLE_DEADLINE_S) -> None:
        """Return once this replica has replayed every commit the primary had returned when
        called (`replay_lsn()` has reached the primary's `current_lsn()`). Raises
        LocalPostgresError after `timeout` seconds, as with a longer apply delay. Not for a
        paused replica or primary: its queries would wait for it."""
        target = self.primary.current_lsn()
        deadline = time.monotonic() + timeout
        while self.replay_lsn() < target:
            if time.monotonic() > deadline:
                raise LocalPostgresError(f"replica on port {self.port} did not catch up")
            time.sleep(0.01)

    def _wait_ready(self) -> None:
        """Accepting connections, and then, while in recovery, streaming: a promoted replica
        relaunched is a primary of its own and streams from nobody."""
        super()._wait_ready()
        deadline = time.monotonic() + START_DEADLINE_S
        query = (
            "SELECT pg_is_in_recovery(),"
            " coalesce((SELECT status FROM pg_stat_wal_receiver), 'not started')"
        )
        while True:
            in_recovery, receiver = self._fetchone(query)
            if not in_recovery or receiver == "streaming":
                return
            if self._proc.poll() is not None:
                raise LocalPostgresError(f"postgres exited at start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise LocalPostgresError(
                    f"replica did not stream (WAL receiver {receiver}):\n{self._log_tail()}"
                )
            time.sleep(0.01)


REFUSED_REPLICAS = (
    "--replicas starts replicas of a throwaway server, and DATABASE_URL names a server of "
    "yours: unset DATABASE_URL, or drop --replicas and set DATABASE_REPLICA_URLS yourself"
)


def run_with_database(command: list[str], replicas: int = 0) -> int:
    """Run `command` with DATABASE_URL pointing at a throwaway cluster, or at the server that
    DATABASE_URL already names (starting nothing); return its exit code.

    With `replicas`, the throwaway cluster gets that many streaming replicas, in
    DATABASE_REPLICA_URLS (space-separated), and commits synchronously so that a commit is on
    its way to them when it returns, as on a production primary. Without, DATABASE_REPLICA_URLS
    is removed: replicas of some other server cannot serve a throwaway one. With DATABASE_URL
    set, `replicas` is refused (exit 2, REFUSED_REPLICAS on stderr) and nothing runs.
    """
    if os.environ.get("DATABASE_URL"):
        if replicas:
            print(f"localpg: {REFUSED_REPLICAS}", file=sys.stderr)
            return 2
        return _run(command, dict(os.environ))
    primary = LocalPostgres(
        parent=_project_folder(), settings={"synchronous_commit": "on"} if replicas else None
    )
    servers = [primary]  # stopped last to first: the replicas, then their primary
    try:
        primary.start()
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_REPLICA_URLS"}
        env["DATABASE_URL"] = primary.create_database("app")
        print(f"localpg: throwaway PostgreSQL on 127.0.0.1:{primary.port}", flush=True)
        for _ in range(replicas):
            servers.append(primary.start_replica())
            print(f"localpg: streaming replica on 127.0.0.1:{servers[-1].port}", flush=True)
        if replicas:
            env["DATABASE_REPLICA_URLS"] = " ".join(r.dsn("app") for r in servers[1:])
        return _run(command, env)
    except LocalPostgresError as exc:
        print(f"localpg: {exc}", file=sys.stderr)
        return 2
    finally:
        for server in reversed(servers):
            server.stop()
        if primary.port:
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
    parser = argparse.ArgumentParser(
        prog="python -m deploy.localpg",
        description="Run COMMAND with DATABASE_URL set: a throwaway PostgreSQL unless it is set.",
    )
    parser.add_argument(
        "--replicas",
        type=_replica_count,
        default=0,
        metavar="N",
        help="also start N streaming replicas, in DATABASE_REPLICA_URLS (space-separated)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="[--] COMMAND...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("COMMAND is missing")
    return run_with_database(command, args.replicas)


def _replica_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a count of replicas, 0 or more, not {text!r}")
    return int(text)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
