"""The replica set inside one worker, against real streaming replicas: a read cancelled by a
conflict with recovery runs again elsewhere, and a host name is as many replicas as it has
addresses, resolved again while running."""

from __future__ import annotations

import logging
import secrets
import time

import gevent
import gevent.event
import pgutil
import psycopg2.extensions
import pytest
from gunicorn_proc import wait_until
from pgbouncer import PgBouncer
from prometheus_client import REGISTRY
from psycopg2 import sql

from config import load_settings
from service import db
from service.api import consistency, users
from service.app import create_app
from service.db.lsn import parse_lsn
from service.db.replicas import PRIMARY, ReadCursor, ReplicaSet, resolve_url
from service.observability import metrics

pytestmark = pytest.mark.replicas


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_total") or 0.0


class Events:
    """The replica set's reports, kept."""

    def __init__(self):
        self.retries: list[str] = []
        self.fallbacks: list[str] = []

    def read_on(self, server):
        pass

    def fell_back(self, reason):
        self.fallbacks.append(reason)

    def caught_up(self, waited_s, ok):
        pass

    def replica_state(self, label, up, lag_bytes, lag_s):
        pass

    def retried(self, label):
        self.retries.append(label)


@pytest.mark.parametrize("hung_up", [False, True], ids=["client-there", "client-gone"])
def test_a_read_cancelled_by_a_conflict_with_recovery_runs_again_on_another_server(
    replicated, hung_up
):
    """With max_standby_streaming_delay 0, a VACUUM on the primary cancels (SQLSTATE 40001) a
    replica's query that still reads the rows it removed: the block never sees it. Nor does it
    see that its client hung up once its read was under way (`ClientGone` is for a block that
    sent nothing): a batch's read answers other requests too."""
    replica = replicated.primary.start_replica({"max_standby_streaming_delay": "0"})
    table = f"doomed_{secrets.token_hex(4)}"
    app = create_app(
        load_settings(
            {
                "DATABASE_URL": replicated.database_url,
                "DATABASE_REPLICA_URLS": replica.dsn(replicated.dbname),
                "WEB_CONCURRENCY": "1",
                "DB_POOL_MAX": "3",
            }
        )
    )
    client = {"gone": False}
    app.extensions[db.CLIENT_GONE] = lambda: client["gone"]  # what the pools ask
    try:
        with pgutil.autocommit(replicated.database_url) as cur:
            cur.execute(f"CREATE TABLE {table} AS SELECT generate_series(1, 1000) AS i")
        replica.catch_up()
        db.open_pool(app)
        replicas = app.extensions[db.REPLICAS]
        wait_until(lambda: replicas.replicas[0].up, 10, "the replica in rotation")

        def read():
            with app.app_context(), db.get_db(read_only=True) as cur:
                cur.execute(f"SELECT count(*) AS n, pg_sleep(2) FROM {table}")
                return cur.server, cur.fetchone()["n"]

        reading = gevent.spawn(read)
        with pgutil.autocommit(replica.dsn(replicated.dbname)) as cur:
            wait_until(
                lambda: any("pg_sleep" in (b["query"] or "") for b in pgutil.backends(cur)),
                5,
                "the read running on the replica",
            )
        client["gone"] = hung_up
        with pgutil.autocommit(replicated.database_url) as cur:
            cur.execute(f"DELETE FROM {table}")
            cur.execute(f"VACUUM {table}")
        server, count = reading.get(timeout=10)
        assert server == PRIMARY  # ran again there: the only other server
        assert count == 0  # the primary's rows, after the delete
    finally:
        db.close_pool(app)
        with pgutil.autocommit(replicated.database_url) as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        replica.stop()


def replica_set(replicated, make_pool, urls, poll_interval_s, **options) -> ReplicaSet:
    """A replica set of `urls` over the `replicated` primary, not started."""
    settings = {"max_lag_s": 10, "catch_up_s": 0.1, "connect_timeout": 5, **options}
    return ReplicaSet(
        make_pool(replicated.database_url),
        urls,
        make_pool=make_pool,
        poll_interval_s=poll_interval_s,
        events=Events(),
        **settings,
    )


def test_a_url_whose_host_is_an_address_or_a_list_is_one_replica():
    url = "postgresql://u:p@127.0.0.1:5433/db"
    assert resolve_url(url) == [("127.0.0.1:5433", url)]
    several = "postgresql://u:p@a:1,b:2/db"
    assert resolve_url(several) == [("a,b:1,2", several)]


def test_a_host_name_becomes_one_replica_per_address_it_resolves_to():
    [(label, dsn)] = resolve_url("postgresql://u:p@localhost:5433/db")
    assert label == "localhost/127.0.0.1:5433"
    params = psycopg2.extensions.parse_dsn(dsn)
    assert (params["host"], params["hostaddr"], params["port"]) == (
        "localhost",
        "127.0.0.1",
        "5433",
    )


def test_a_name_that_does_not_resolve_raises_oserror():
    with pytest.raises(OSError):
        resolve_url("postgresql://u:p@no-such-host.invalid:5432/db")


def test_replicas_come_and_go_as_their_name_resolves_again(replicated, make_pool):
    """A name resolving first to one replica, then to both, then to the other: each address
    that appears is monitored and read from, each that goes away is dropped, and a name that
    stops resolving keeps what it had."""
    first, second = ((f"127.0.0.1:{r.port}", r.dsn(replicated.dbname)) for r in replicated.replicas)
    steps = [
        ([first], [first[0]]),
        ([first, second], [first[0], second[0]]),
        ([second], [second[0]]),
        (OSError("no answer from DNS"), [second[0]]),
    ]
    answer: list = [steps[0][0]]

    def resolve(url):
        if isinstance(answer[0], OSError):
            raise answer[0]
        return answer[0]

    replicas = replica_set(
        replicated, make_pool, ["postgresql://replicas.test/db"], 0.02, resolve=resolve
    )
    replicas.start()
    try:
        for resolved, expected in steps:
            answer[0] = resolved
            replicas.refresh()
            assert sorted(r.label for r in replicas.replicas) == sorted(expected)
            wait_until(lambda: all(r.up for r in replicas.replicas), 10, f"{expected} up")
            pool, label, reason = replicas.route(0)
            assert label in expected and reason is None
            with pool.connection(autocommit=True) as cur:
                cur.execute("SELECT pg_is_in_recovery() AS standby")
                assert cur.fetchone()["standby"]
    finally:
        replicas.close()
    assert all(r.removed for r in replicas.replicas)
    wait_until(
        lambda: all(r.monitor is None or r.monitor.dead for r in replicas.replicas),
        5,
        "the monitors to end after close()",
    )


def test_reads_on_a_replica_answer_what_the_primary_does_and_carry_their_position(replicated):
    """The users API's reads, run on a replica, give the rows the same statements give on the
    primary, and a position: pages of every shape, one page or several in one statement,
    empty ones, ids found and not found. A read that found rows has its position from its own
    statement (set inside the block); one that found none gets it at the block's end; either
    way it is at least the position of the writes it saw."""
    with pgutil.autocommit(replicated.database_url) as cur:
        ids = pgutil.seed_users(cur, 30)
        cur.execute("SELECT pg_current_wal_insert_lsn()::text")
        written = parse_lsn(cur.fetchone()[0])
    for replica in replicated.replicas:
        replica.catch_up()
    newest = max(ids)
    shapes = [
        [(newest, 5)],
        [(0, 5)],  # empty
        [(newest, 5), (newest - 10, 3), (0, 4), (2**63 - 1, 2)],
        [(newest, 30), (newest, 31)],
    ]
    lookups = [ids[:3], [ids[0], -1], [-1]]

    def answers(env):
        app = create_app(load_settings({"DATABASE_URL": replicated.database_url, **env}))
        db.open_pool(app)
        try:
            if env:
                replicas = app.extensions[db.REPLICAS]
                wait_until(lambda: all(r.up for r in replicas.replicas), 10, "replicas up")
            found = []
            with app.app_context():
                for pages in shapes + lookups:
                    with db.get_db(read_only=True) as cur:
                        if isinstance(pages[0], tuple):
                            rows = users._page_rows(cur, pages)
                            any_row = any(rows.values())
                        else:
                            columns = db.with_position(cur, "id, name, email, created_at")
                            cur.execute(f"SELECT {columns} FROM users WHERE id = ANY(%s)", (pages,))
                            rows = sorted(db.fetch_with_position(cur), key=str)
                            any_row = bool(rows)
                        if env:
                            assert (cur.position is not None) == any_row, (pages, cur.position)
                        found.append(rows)
                    found.append(getattr(cur, "server", None))
                    if env:
                        assert cur.position is not None and cur.position >= written
            return found
        finally:
            db.close_pool(app)

    on_primary = answers({})
    on_replicas = answers(
        {"DATABASE_REPLICA_URLS": " ".join(replicated.replica_urls), "REPLICA_CATCH_UP_S": "5"}
    )
    assert [a for a in on_replicas if not isinstance(a, str)] == [
        a for a in on_primary if a is not None
    ]
    assert {a for a in on_replicas if isinstance(a, str)} <= {
        f"127.0.0.1:{r.port}" for r in replicated.replicas
    }
    with pgutil.autocommit(replicated.database_url) as cur:
        cur.execute("DELETE FROM users WHERE id = ANY(%s)", (ids,))


def test_blocks_tell_the_monitors_what_their_polls_would_read(replicated):
    """With monitors that poll only every 10 s, a write on the primary moves the primary's
    position and a read on a replica moves that replica's replay position, each in passing:
    the position the block read anyway, and what a read selects with its own position."""
    app = create_app(
        load_settings(
            {
                "DATABASE_URL": replicated.database_url,
                "DATABASE_REPLICA_URLS": " ".join(replicated.replica_urls),
                "REPLICA_POLL_INTERVAL_S": "10",
            }
        )
    )
    db.open_pool(app)
    email = f"told-{secrets.token_hex(4)}@example.com"
    try:
        replicas = app.extensions[db.REPLICAS]
        wait_until(lambda: all(r.up for r in replicas.replicas), 10, "replicas up")
        polled = {r.label: r.replay for r in replicas.replicas}
        with app.app_context():
            with db.get_db(autocommit=True) as cur:
                cur.execute("INSERT INTO users (name, email) VALUES ('told', %s)", (email,))
            written = cur.position
            assert written is not None and replicas.primary_position >= written
            for replica in replicated.replicas:
                replica.catch_up()
            heard = set()
            for _ in range(20):  # until each replica served a read
                with db.get_db(read_only=True) as read:
                    columns = db.with_position(read, "id")
                    read.execute(f"SELECT {columns} FROM users WHERE email = %s", (email,))
                    assert len(db.fetch_with_position(read)) == 1
                heard.add(read.server)
                if heard >= set(polled):
                    break
        assert heard == set(polled)
        for replica in replicas.replicas:
            assert replica.replay >= written > polled[replica.label], replica
            assert replica.up and replica.heard_at > 0
    finally:
        db.close_pool(app)
        with pgutil.autocommit(replicated.database_url) as cur:
            cur.execute("DELETE FROM users WHERE email = %s", (email,))


def test_what_a_read_tells_never_brings_a_replica_back_into_rotation(replicated, make_pool):
    """A read that found its replica out of recovery takes it out at once; one that answers
    after its replica was taken out (it started before) leaves it out, replay and all, until
    the monitor's own poll."""
    replicas = replica_set(replicated, make_pool, list(replicated.replica_urls[:1]), 10)
    replicas.start()
    try:
        wait_until(lambda: all(r.up for r in replicas.replicas), 10, "the replica up")
        [replica] = replicas.replicas
        before = replica.replay
        replicas.heard(replica.label, False, before + 1)
        assert (replica.up, replica.state) == (False, "promoted")
        replicas.heard(replica.label, True, before + (1 << 20))
        assert (replica.up, replica.state, replica.replay) == (False, "promoted", before)
        assert replica.heard_at == 0
        assert replicas.route(0)[1] == PRIMARY
    finally:
        replicas.close()


def test_a_replica_stuck_behind_positions_only_blocks_told_leaves_for_lag(replicated, make_pool):
    """Blocks on the primary keep telling a position the primary's monitor never polled (its
    polls are skipped while they do): that position still enters the history lag is told
    from, so a replica whose replay stopped short of it leaves the rotation for lag."""
    replica_db = replicated.replicas[0]
    replicas = replica_set(replicated, make_pool, [replicated.replica_urls[0]], 2, max_lag_s=1)
    replicas.start()
    replica_db.set_apply_delay(60)
    try:
        wait_until(lambda: all(r.up for r in replicas.replicas), 10, "the replica up")
        with pgutil.autocommit(replicated.database_url) as cur:
            cur.execute("SELECT pg_current_wal_insert_lsn()::text")
            # Far past what the replica replays meanwhile: the delay holds commits back, not
            # the records between them (a running-transactions record every 15 s).
            written = parse_lsn(cur.fetchone()[0]) + (16 << 20)
        telling = gevent.spawn(_tell_for_ever, replicas, written)
        try:
            [replica] = replicas.replicas
            wait_until(lambda: replica.state == "lagging", 8, "the replica out for lag")
            assert replicas.route(written)[1] == PRIMARY
        finally:
            telling.kill()
    finally:
        replicas.close()
        replica_db.set_apply_delay(0)
        replica_db.catch_up()


def _tell_for_ever(replicas: ReplicaSet, position: int) -> None:
    while True:
        replicas.heard_primary(position)
        gevent.sleep(0.01)


def test_reads_batched_with_one_that_runs_again_elsewhere_wait_for_its_answer(replicated):
    """A batch's read gets no answer from a paused replica and runs once more on the primary,
    where it waits for a connection: every lookup in the batch gets its row, though that
    takes longer than a statement's deadline and a second more from the send. (Before, the
    lookups that had joined the sender left at that bound with 503, and the sender alone got
    its row.)"""
    paused = replicated.replicas[0]
    app = create_app(
        load_settings(
            {
                "DATABASE_URL": replicated.database_url,
                "DATABASE_REPLICA_URLS": paused.dsn(replicated.dbname),
                "WEB_CONCURRENCY": "1",
                "DB_POOL_MAX": "2",
                "DB_POOL_TIMEOUT": "3",
                "DB_STATEMENT_TIMEOUT_MS": "1000",  # a statement's deadline: 2 s
            }
        )
    )
    tag = secrets.token_hex(4)
    with pgutil.autocommit(replicated.database_url) as cur:
        cur.execute(
            "INSERT INTO users (name, email) SELECT 'reader', %s || '-' || n || '@example.com'"
            " FROM generate_series(1, 3) AS n RETURNING id, email",
            (tag,),
        )
        seeded = [{"id": uid, "email": email} for uid, email in sorted(cur.fetchall())]
    paused.catch_up()
    client = app.test_client()
    release = gevent.event.Event()

    def hold():
        with app.app_context(), db.get_db():
            release.wait(30)

    try:
        db.open_pool(app)
        primary = app.extensions[db.EXTENSION]
        wait_until(lambda: app.extensions[db.REPLICAS].replicas[0].up, 10, "the replica up")
        assert client.get(f"/users/{seeded[0]['id']}").status_code == 200  # a replica connection
        lookups_before, queries_before = counted("db_lookups"), counted("db_lookup_queries")
        retries_before = counted("db_read_retries")
        # The primary's two connections, held until released: one at once, the other once a
        # create has had it. That create waits on a lock that stops writes (reads go on), for
        # its statement timeout, holding the writes' turn: the reads below wait for the turn
        # (TURN_WAIT_S), together.
        holders = [gevent.spawn(hold)]
        wait_until(lambda: primary.stats()["in_use"] == 1, 5, "a holder")
        with pgutil.users_locked(replicated.database_url, mode="EXCLUSIVE"):
            late = {"name": "late", "email": f"{tag}-late@example.com"}
            create = gevent.spawn(client.post, "/users", json=late)
            wait_until(lambda: primary.stats()["in_use"] == 2, 5, "the create on the lock")
            holders.append(gevent.spawn(hold))
            wait_until(lambda: primary.stats()["waiting"] == 1, 5, "the other holder queued")
            paused.pause()
            started = time.monotonic()
            reads = [gevent.spawn(client.get, f"/users/{row['id']}") for row in seeded]
            assert create.get(timeout=5).status_code == 503  # its statement timeout
        # Past the bound the lookups kept before: the pool's 3 s, or the send and 3 s more.
        gevent.sleep(max(0.0, started + 3.5 - time.monotonic()))
        assert primary.stats()["waiting"] == 1  # the batch's read, run again, waits
        assert not any(read.ready() for read in reads)
        release.set()
        gevent.joinall(reads, timeout=10, raise_error=True)

        answers = [read.value for read in reads]
        assert [r.status_code for r in answers] == [200] * 3
        assert [(r.json["id"], r.json["email"]) for r in answers] == [
            (row["id"], row["email"]) for row in seeded
        ]
        assert counted("db_lookups") - lookups_before == 3
        assert counted("db_lookup_queries") - queries_before == 1  # one batch
        assert counted("db_read_retries") - retries_before == 1  # run again, once
        gevent.joinall(holders, timeout=5, raise_error=True)
    finally:
        release.set()
        paused.resume()
        db.close_pool(app)


def test_every_write_of_a_batch_carries_its_statement_position_a_409_too(replicated):
    """Two creates of one new email in one batch: the earlier is stored (201), the later is
    answered 409 from the same statement. Both responses carry a consistency token, the same
    one: the position that statement wrote, at least; the 409 was no less a request that
    touched the database. (Before, only the batch's sender was given one.)"""
    app = create_app(
        load_settings(
            {
                "DATABASE_URL": replicated.database_url,
                "DATABASE_REPLICA_URLS": replicated.replica_urls[1],
                "WEB_CONCURRENCY": "1",
                "DB_POOL_MAX": "3",
            }
        )
    )
    tag = secrets.token_hex(4)
    wanted = f"{tag}-wanted@example.com"
    client = app.test_client()
    try:
        db.open_pool(app)
        # A create waits on a lock that stops writes, holding the writes' turn: the next two
        # batch.
        with pgutil.users_locked(replicated.database_url, mode="EXCLUSIVE"):
            ahead = {"name": "first", "email": f"{tag}-first@example.com"}
            first = gevent.spawn(client.post, "/users", json=ahead)
            primary = app.extensions[db.EXTENSION]
            wait_until(lambda: primary.stats()["in_use"] == 1, 5, "the create on the lock")
            both = [
                gevent.spawn(client.post, "/users", json={"name": name, "email": wanted})
                for name in ("earlier", "later")
            ]
            wait_until(lambda: app.extensions[users.CREATES].waiting == 2, 5, "the two to batch")
        gevent.joinall([first, *both], timeout=10, raise_error=True)

        answers = [g.value for g in both]
        assert [r.status_code for r in answers] == [201, 409]
        tokens = [r.headers.get(consistency.HEADER) for r in answers]
        assert tokens[0] is not None and tokens[0] == tokens[1]
        written = consistency.decode(tokens[0])
        with pgutil.autocommit(replicated.database_url) as cur:
            cur.execute("SELECT (pg_current_wal_lsn() - '0/0')::bigint")
            assert 0 < written <= cur.fetchone()[0]
        assert first.value.status_code == 201
    finally:
        db.close_pool(app)


class Ticks(metrics.PoolMetrics):
    """The app's metrics, keeping when each replica monitor last reported a poll (or a skip)
    and where each read ran."""

    def __init__(self):
        super().__init__()
        self.ticks: list[tuple[str, float]] = []
        self.reads: list[str] = []

    def replica_state(self, label, up, lag_bytes, lag_s):
        self.ticks.append((label, time.monotonic()))
        super().replica_state(label, up, lag_bytes, lag_s)

    def read_on(self, server):
        self.reads.append(server)
        super().read_on(server)


@pytest.mark.parametrize("path", ["direct", pytest.param("pgbouncer", marks=pytest.mark.pgbouncer)])
def test_a_replica_restarted_behind_what_a_client_saw_is_not_read_there(replicated, path, caplog):
    """The server at a replica's address restarts, between two polls of its monitor, having
    replayed less than before (here an older copy, started at the same address; a crash
    before its pages were written does the same). Its monitor still holds the position it read
    before, and the pool's next connection reaches the new server: directly, a dead idle
    connection replaced without a word; through a PgBouncer, the same client connection on a
    new server connection. The read of a client that created a row, with its token, is routed
    there, and the guard before its statement refuses: it runs on the primary and the client
    reads its row; the replica leaves the rotation. (Before, it answered 404.)"""
    caplog.set_level(logging.INFO, logger="service.db.replicas")
    old = replicated.primary.start_replica()
    behind = replicated.primary.start_replica()
    bouncer = None
    events = Ticks()
    app = None
    try:
        # A copy that stops here: from its next start on, it replays no commit for an hour.
        behind.catch_up()
        with pgutil.autocommit(behind.dsn()) as cur:
            cur.execute("ALTER SYSTEM SET recovery_min_apply_delay = '1h'")
        behind.halt()
        url = old.dsn(replicated.dbname)
        if path == "pgbouncer":
            bouncer = PgBouncer(url, pool_size=4).start()
            url = (
                f"postgresql://postgres:{old.password}@127.0.0.1:{bouncer.port}/{replicated.dbname}"
            )
        app = create_app(
            load_settings(
                {
                    "DATABASE_URL": replicated.database_url,
                    "DATABASE_REPLICA_URLS": url,
                    "WEB_CONCURRENCY": "1",
                    "DB_POOL_MAX": "2",
                    "REPLICA_POLL_INTERVAL_S": "10",  # the monitor polls 9 to 11 s apart
                }
            )
        )
        app.extensions[db.EVENTS] = events
        client = app.test_client()
        db.open_pool(app)
        replicas = app.extensions[db.REPLICAS]
        label = replicas.replicas[0].label
        wait_until(lambda: replicas.replicas[0].up, 15, "the replica in rotation")
        created = client.post(
            "/users", json={"name": "mine", "email": f"{secrets.token_hex(4)}@example.com"}
        )
        assert created.status_code == 201
        token = {consistency.HEADER: created.headers[consistency.HEADER]}
        old.catch_up()
        wait_until(
            lambda: (
                client.get(f"/users/{created.json['id']}", headers=token).status_code == 200
                and events.reads[-1] == label
            ),
            15,
            "the row read on the replica",
        )

        polls = len(events.ticks)
        wait_until(lambda: len(events.ticks) > polls, 15, "a poll of the monitor")
        polled_at = events.ticks[-1][1]
        old.halt("immediate")
        behind.port = old.port
        behind.launch()
        with pgutil.autocommit(behind.dsn(replicated.dbname)) as cur:
            cur.execute("SELECT count(*) FROM users WHERE id = %s", (created.json["id"],))
            assert cur.fetchone() == (0,)  # the server there now is behind the client
        if path == "direct":  # a failed poll would take it out (through PgBouncer one succeeds)
            assert events.ticks[-1][1] == polled_at, "the monitor polled since: no test"
        retries = counted("db_read_retries")

        answer = client.get(f"/users/{created.json['id']}", headers=token)
        assert answer.status_code == 200
        assert answer.json["email"] == created.json["email"]
        assert events.reads[-1] == PRIMARY
        assert counted("db_read_retries") - retries == 1
        assert any("has not replayed" in r.getMessage() for r in caplog.records)  # the guard
        replica = replicas.replicas[0]  # out, until a poll of its monitor puts it right
        assert not replica.up or replica.replay < consistency.decode(token[consistency.HEADER])
    finally:
        if app is not None:
            db.close_pool(app)
        if bouncer is not None:
            bouncer.stop()
        old.stop()
        behind.stop()


def test_a_read_whose_replica_left_the_rotation_after_it_was_routed_there_moves(
    replicated, make_pool
):
    """Between routing a read to a replica and its first statement (the connection is opened
    or checked meanwhile, and other greenlets run), the replica may leave the rotation: a
    failed poll, another read that found it broken. The read then goes elsewhere."""
    replicas = replica_set(replicated, make_pool, [replicated.replica_urls[0]], 10)
    replicas.start()
    try:
        wait_until(lambda: all(r.up for r in replicas.replicas), 10, "the replica up")
        [replica] = replicas.replicas
        cursor = ReadCursor(replicas, 5, lambda: 0)
        assert cursor.server == replica.label
        replicas.failed(replica.label, RuntimeError("found broken by another read"))
        cursor.execute("SELECT pg_is_in_recovery() AS standby")
        assert cursor.fetchone()["standby"] is False
        assert cursor.server == PRIMARY
        cursor.close(None)
    finally:
        replicas.close()


def test_the_guard_goes_before_every_kind_of_query_and_refuses_a_position_not_replayed(
    replicated, make_pool
):
    """A read that must see a position runs on a replica behind the guard, whatever form its
    query takes (text with parameters, bytes, `psycopg2.sql`), and is answered there. When the
    monitor's picture is ahead of the server (as after a restart it did not see), the guard
    refuses: the read runs on the primary and the replica leaves the rotation."""
    replicas = replica_set(replicated, make_pool, [replicated.replica_urls[0]], 10)
    replicas.start()
    try:
        wait_until(lambda: all(r.up for r in replicas.replicas), 10, "the replica up")
        [replica] = replicas.replicas
        replayed = replica.replay
        queries = [
            ("SELECT %s::int AS v", (1,)),
            (b"SELECT 1 AS v", None),
            (sql.SQL("SELECT {} AS v").format(sql.Literal(1)), None),
        ]
        for query, params in queries:
            cursor = ReadCursor(replicas, 5, lambda: replayed)
            cursor.execute(query, params)
            assert cursor.fetchone()["v"] == 1
            assert cursor.server == replica.label
            cursor.close(None)

        replica.replay = replayed + (16 << 20)  # the picture, ahead of the server
        cursor = ReadCursor(replicas, 5, lambda: replayed + (1 << 20))
        assert cursor.server == replica.label
        cursor.execute("SELECT pg_is_in_recovery() AS standby")
        assert cursor.fetchone()["standby"] is False
        assert cursor.server == PRIMARY
        cursor.close(None)
        # Out, until its monitor polled it (woken at once): where the server says it is.
        wait_until(lambda: replica.replay < replayed + (1 << 20), 5, "the picture put right")
    finally:
        replicas.close()
