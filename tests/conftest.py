"""Fixtures that start the real things: a PostgreSQL server once per session, then an app with
its own pool per test.

The test process is patched like a gunicorn worker, first thing, so that the greenlets the
tests spawn and the psycopg2 connections they use behave as they do in production.
"""

from gevent import monkey

monkey.patch_all()

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pgutil  # noqa: E402
import psycopg2  # noqa: E402
import psycopg2.extensions  # noqa: E402
import pytest  # noqa: E402

from config import load_settings  # noqa: E402
from deploy.localpg import LocalPostgres, LocalReplica  # noqa: E402
from service import db  # noqa: E402
from service.app import create_app  # noqa: E402
from service.db import schema  # noqa: E402
from service.db.pool import Pool  # noqa: E402
from service.observability.logs import JsonFormatter  # noqa: E402

OPEN_FILES = 8192  # above the storms' 2,000 sockets in one process, with room for the rest


@pytest.fixture(scope="session", autouse=True)
def _open_files():
    """The storms of tests/test_faults.py hold 2,000 sockets at once in this process and in a
    gunicorn it starts (which inherits its limits), where a login's soft limit on open files is
    often 1024, the hard one far above: the soft limit is raised to OPEN_FILES, within the hard
    one, for the session."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))


@pytest.fixture(scope="session")
def pg_server():
    """The throwaway server, or None when TEST_DATABASE_URL names one to use instead."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield None
        return
    server = LocalPostgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def database_url(pg_server):
    """A fresh database for this session, on the throwaway server or on TEST_DATABASE_URL's."""
    name = f"test_{secrets.token_hex(4)}"
    server_url = os.environ.get("TEST_DATABASE_URL") or pg_server.dsn()
    with pgutil.autocommit(server_url) as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = psycopg2.extensions.make_dsn(server_url, dbname=name)
    schema.migrate(url, connect_timeout=5)
    yield url
    with pgutil.autocommit(server_url) as cur:
        cur.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class Replicated:
    """What `replicated` yields: a primary, its streaming replicas, the test database's name,
    and its URL on the primary and on each replica (in the replicas' order)."""

    primary: LocalPostgres
    replicas: tuple[LocalReplica, ...]
    dbname: str
    database_url: str
    replica_urls: tuple[str, ...]


@pytest.fixture(scope="session")
def replicated():
    """A throwaway primary of its own with two streaming replicas, and a fresh database
    migrated on the primary that both replicas have replayed; started for the first test that
    asks for it. Its own primary even with TEST_DATABASE_URL: only a server of ours can be
    given replicas. Commits are synchronous, as on a production primary, so that a commit is
    on its way to the replicas when it returns.

    The replicas are shared: a test may delay or pause one, and must undo it; a test that
    promotes or halts a replica starts one of its own (`replicated.primary.start_replica()`).
    """
    primary = LocalPostgres(settings={"synchronous_commit": "on"})
    replicas: list[LocalReplica] = []
    try:
        primary.start()
        for _ in range(2):
            replicas.append(primary.start_replica())
        name = f"test_{secrets.token_hex(4)}"
        url = primary.create_database(name)
        schema.migrate(url, connect_timeout=5)
        for replica in replicas:
            replica.catch_up()
        urls = tuple(replica.dsn(name) for replica in replicas)
        yield Replicated(primary, tuple(replicas), name, url, urls)
    finally:
        for replica in replicas:
            replica.stop()
        primary.stop()


@pytest.fixture
def fresh_database(database_url):
    """An empty database of its own (no schema, nobody else's connections), for a test that
    starts the service and counts its connections apart."""
    with pgutil.fresh_database(database_url, "fresh") as url:
        yield url


@pytest.fixture(scope="session")
def docker_engine():
    """A Docker engine with `debian:bookworm-slim` in it: the one that answers, or one started
    for the session and stopped after it (deploy/localdocker.py); the base pulled, or made with
    debootstrap where no registry answers. Skips, saying why, only where no engine can be had."""
    from deploy import localdocker

    try:
        engine = localdocker.Engine.ensure()
    except localdocker.Unavailable as exc:
        pytest.skip(f"no Docker engine can be had here: {exc}")
    try:
        engine.base_origin = localdocker.base_image()
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def silent_port():
    """A port on 127.0.0.1 where the kernel accepts connections and nothing ever speaks."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield silent.getsockname()[1]


@pytest.fixture
def admin(database_url):
    """A plain autocommit cursor on the test database, outside any pool, for set-up and checks."""
    with pgutil.autocommit(database_url) as cur:
        yield cur


@pytest.fixture(autouse=True)
def _empty_users(request):
    """Every test that touches the database starts with no users."""
    if "database_url" in request.fixturenames:
        with pgutil.autocommit(request.getfixturevalue("database_url")) as cur:
            cur.execute("TRUNCATE users")
    yield


@pytest.fixture
def make_settings(database_url):
    def make(**env):
        base = {"DATABASE_URL": database_url, "WEB_CONCURRENCY": "1", "DB_POOL_MAX": "5"}
        return load_settings({**base, **{key: str(value) for key, value in env.items()}})

    return make


@pytest.fixture
def make_pool(database_url):
    """Build pools with test-sized limits; every pool is closed after the test."""
    pools = []

    def make(dsn=None, **overrides):
        options = dict(
            min_size=0,
            max_size=5,
            timeout=5.0,
            statement_timeout_ms=5000,
            connect_timeout=5,
            max_lifetime=3600.0,
            application_name="test-pool",
        )
        pool = Pool(dsn or database_url, **{**options, **overrides})
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def app(make_settings):
    app = create_app(make_settings())
    db.open_pool(app)
    yield app
    db.close_pool(app)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def make_app(make_settings):
    """Apps with settings of the test's choosing, each with its own open pool."""
    apps = []

    def make(**env):
        app = create_app(make_settings(**env))
        db.open_pool(app)
        apps.append(app)
        return app

    yield make
    for app in apps:
        db.close_pool(app)


@pytest.fixture
def log_lines(capsys):
    """The service's log lines from now on, as the JSON objects gunicorn would write: its
    records through `JsonFormatter`, and the access lines, which go straight to stdout. Both
    go to stdout as captured by pytest now (`capsys`), so they keep their order."""
    handler = logging.StreamHandler(_Stdout())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("service")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    written: list[str] = []

    def lines() -> list[dict]:
        written.append(capsys.readouterr().out)
        return [json.loads(line) for line in "".join(written).splitlines()]

    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


class _Stdout:
    """Whatever `sys.stdout` is at the time of each write."""

    def write(self, text: str) -> None:
        sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()
