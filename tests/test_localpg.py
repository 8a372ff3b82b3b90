"""`python -m deploy.localpg [--replicas N] -- COMMAND`: the throwaway PostgreSQL behind
`make run`, and its streaming replicas."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from deploy import localpg
from deploy.localpg import LocalPostgresError, find_bindir

REPO = Path(__file__).resolve().parent.parent


def localpg_env(**env: str) -> dict[str, str]:
    """This environment without a database or binaries of its own, plus `env`."""
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PG_BINDIR")}
    return {**base, **env}


def run_localpg(
    command: list[str], timeout: float = 120, options: tuple[str, ...] = (), **env: str
):
    return subprocess.run(
        [sys.executable, "-m", "deploy.localpg", *options, "--", *command],
        cwd=REPO,
        env=localpg_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fake_installation(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("initdb", "postgres"):
        (folder / name).touch(mode=0o755)
    return folder


def test_without_server_binaries_or_database_url_it_says_what_to_install(tmp_path):
    folders = os.environ["PATH"].split(os.pathsep)
    without_initdb = os.pathsep.join(d for d in folders if not (Path(d) / "initdb").exists())
    done = run_localpg(
        [sys.executable, "-c", "print('the command ran')"],
        PATH=without_initdb,
        PG_BINDIR=str(tmp_path),
    )
    assert done.returncode != 0
    assert "apt-get install postgresql" in done.stderr
    assert "DATABASE_URL" in done.stderr
    assert "the command ran" not in done.stdout


def test_with_database_url_it_runs_the_command_against_it_and_starts_nothing(tmp_path):
    url = "postgresql://nobody:secret@127.0.0.1:1/elsewhere"
    print_url = "import os, sys; print(os.environ['DATABASE_URL']); sys.exit(4)"
    # No binaries either: starting a server here would fail loudly.
    done = run_localpg([sys.executable, "-c", print_url], DATABASE_URL=url, PG_BINDIR=str(tmp_path))
    assert done.returncode == 4
    assert done.stdout == url + "\n"
    assert "throwaway" not in done.stdout + done.stderr


def test_without_database_url_it_runs_the_command_on_a_throwaway_server_then_removes_it():
    select_one = (
        "import os, sys, psycopg2\n"
        "conn = psycopg2.connect(os.environ['DATABASE_URL'])\n"
        "cur = conn.cursor()\n"
        "cur.execute('SELECT 1')\n"
        "assert cur.fetchone() == (1,)\n"
        "cur.execute('SHOW data_directory')\n"
        "print('data directory:', cur.fetchone()[0])\n"
        "print('replica urls:', os.environ.get('DATABASE_REPLICA_URLS'))\n"
        "conn.close()\n"
        "sys.exit(3)\n"
    )
    done = run_localpg([sys.executable, "-c", select_one], DATABASE_REPLICA_URLS=STALE_REPLICAS)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "replica urls: None" in done.stdout
    [line] = [line for line in done.stdout.splitlines() if line.startswith("data directory:")]
    cluster = Path(line.split(":", 1)[1].strip()).parent
    assert cluster.name.startswith("localpg-")
    assert not cluster.exists()
    assert "stopped and removed" in done.stdout


STALE_REPLICAS = "postgresql://nobody:secret@127.0.0.1:1/x postgresql://nobody:secret@127.0.0.1:2/x"

# Writes on the primary, then reads it back on the one replica, waiting for it (10 s at most).
WRITE_THEN_READ_ON_THE_REPLICA = (
    "import os, sys, time, psycopg2\n"
    "replicas = os.environ['DATABASE_REPLICA_URLS'].split(' ')\n"
    "print('replicas:', len(replicas))\n"
    "primary = psycopg2.connect(os.environ['DATABASE_URL'])\n"
    "primary.autocommit = True\n"
    "primary.cursor().execute(\"CREATE TABLE notes AS SELECT 'from the primary' AS note\")\n"
    "replica = psycopg2.connect(replicas[0])\n"
    "replica.autocommit = True\n"
    "cur = replica.cursor()\n"
    "cur.execute('SELECT pg_is_in_recovery()')\n"
    "print('in recovery:', cur.fetchone()[0])\n"
    "deadline = time.monotonic() + 10\n"
    "while time.monotonic() < deadline:\n"
    "    try:\n"
    "        cur.execute('SELECT note FROM notes')\n"
    "    except psycopg2.errors.UndefinedTable:\n"
    "        time.sleep(0.01)\n"
    "        continue\n"
    "    print('read on the replica:', cur.fetchone()[0])\n"
    "    break\n"
    "sys.exit(5)\n"
)


def test_with_replicas_the_command_reads_on_a_replica_what_it_wrote_on_the_primary():
    done = run_localpg(
        [sys.executable, "-c", WRITE_THEN_READ_ON_THE_REPLICA],
        options=("--replicas", "1"),
        DATABASE_REPLICA_URLS=STALE_REPLICAS,
    )
    assert done.returncode == 5, done.stdout + done.stderr
    assert "replicas: 1\n" in done.stdout
    assert "in recovery: True\n" in done.stdout
    assert "read on the replica: from the primary\n" in done.stdout
    assert "stopped and removed" in done.stdout


def test_with_database_url_replicas_are_refused_and_the_command_does_not_run(tmp_path):
    done = run_localpg(
        [sys.executable, "-c", "print('the command ran')"],
        options=("--replicas", "1"),
        DATABASE_URL=ELSEWHERE,
        PG_BINDIR=str(tmp_path),
    )
    assert done.returncode == 2
    assert "--replicas" in done.stderr and "DATABASE_URL" in done.stderr
    assert "the command ran" not in done.stdout


# Tells which signal ended it: exit 0 and "got SIGTERM" for gunicorn's graceful stop, exit 1
# and "got SIGINT" for its quick one. The handler writes with os.write: the signal may come
# while print('ready') still holds stdout's buffer, and a print there would be a reentrant call.
REPORT_SIGNAL = (
    "import os, signal, sys\n"
    "def stop(sig, _):\n"
    "    os.write(1, f'got {signal.Signals(sig).name}\\n'.encode())\n"
    "    sys.exit(0 if sig == signal.SIGTERM else 1)\n"
    "signal.signal(signal.SIGINT, stop)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "print('ready', os.getpid(), flush=True)\n"
    "while True:\n"
    "    signal.pause()\n"
)


ELSEWHERE = "postgresql://nobody:secret@127.0.0.1:1/x"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("given_url", "sig"),
    [
        (ELSEWHERE, signal.SIGINT),
        (None, signal.SIGINT),
        (ELSEWHERE, signal.SIGQUIT),
        (ELSEWHERE, signal.SIGHUP),
        (ELSEWHERE, signal.SIGTERM),
    ],
)
def test_a_signal_to_the_terminal_group_becomes_one_sigterm_to_the_command(given_url, sig):
    """A terminal sends Ctrl-C (SIGINT), Ctrl-\\ (SIGQUIT) and its closing (SIGHUP) to its whole
    foreground group (make, localpg and, unless it has a session of its own, gunicorn): the
    command must get SIGTERM, once, and must not outlive localpg."""
    env = localpg_env(**({"DATABASE_URL": given_url} if given_url else {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.localpg", "--", sys.executable, "-c", REPORT_SIGNAL],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own, as a terminal gives a command
    )
    try:
        lines, child = [], None
        with gevent.Timeout(60, AssertionError(f"the command never started: {lines}")):
            while child is None:
                line = proc.stdout.readline()
                assert line, f"the command exited before it started: {lines}"
                lines.append(line)
                if line.startswith("ready "):
                    child = int(line.split()[1])
        os.killpg(proc.pid, sig)
        code = proc.wait(timeout=60)
        orphaned = alive(child)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)  # its own session: killpg above cannot reach it
    out = proc.stdout.read()
    assert not orphaned, "the command outlived localpg"
    assert code == 0, [*lines, out]
    assert out.count("got ") == 1 and "got SIGTERM" in out, out
    if given_url is None:
        assert "stopped and removed" in out


def test_nothing_found_anywhere_raises_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.delenv("PG_BINDIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(localpg, "DEBIAN_BINDIRS", str(tmp_path / "*" / "bin"))
    with pytest.raises(LocalPostgresError, match="apt-get install postgresql"):
        find_bindir()


def test_the_newest_debian_installation_is_chosen(tmp_path, monkeypatch):
    monkeypatch.delenv("PG_BINDIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    monkeypatch.setattr(localpg, "DEBIAN_BINDIRS", str(tmp_path / "*" / "bin"))
    for version in ("9", "17", "16"):
        fake_installation(tmp_path / version / "bin")
    assert find_bindir() == tmp_path / "17" / "bin"


def test_pg_bindir_is_the_only_folder_looked_at_when_set(tmp_path, monkeypatch):
    on_path = fake_installation(tmp_path / "on-path")
    monkeypatch.setenv("PATH", str(on_path))
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    with pytest.raises(LocalPostgresError):
        find_bindir()
    monkeypatch.setenv("PG_BINDIR", str(on_path))
    assert find_bindir() == on_path
