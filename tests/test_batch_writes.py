"""Batched writes (service/api/users.py): concurrent `POST /users` and `PATCH /users/<id>` of
one worker sharing statements, each write made exactly once, with real greenlets against the
real server; then the same through real gunicorn workers over HTTP.

Requests are made to pile up the way load does it: a lock on `users` held by the test stops
the first write in the database, with its connection, and the writes that arrive meanwhile
gather in the next batch.
"""

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import gevent
import psycopg2
from gevent.event import Event
from gunicorn_proc import Gunicorn, request, scrape_metrics, wait_until
from pgutil import APP_NAME, seed_users, users_locked, waiting_on_lock
from prometheus_client import REGISTRY

from service import db
from service.api import users


def counted(name: str, kind: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_total", {"kind": kind}) or 0.0


def piled_up(app, database_url, loader: str, first, rest: list) -> list:
    """Send `first`, and once it holds a connection (stopped on the lock), each of `rest`;
    release the lock once all of `rest` wait in `loader`'s batch. Their answers, in order."""
    with users_locked(database_url):
        held = gevent.spawn(first)
        wait_until(lambda: app.extensions[db.EXTENSION].stats()["in_use"] == 1, 5, "the first")
        later = [gevent.spawn(call) for call in rest]
        wait_until(lambda: app.extensions[loader].waiting == len(rest), 5, "the batch")
    gevent.joinall([held, *later], timeout=10, raise_error=True)
    assert app.extensions[loader].waiting == 0
    return [g.value for g in (held, *later)]


def post(client, name: str, email: str):
    return lambda: client.post("/users", json={"name": name, "email": email})


def patch(client, uid: int, **fields):
    return lambda: client.patch(f"/users/{uid}", json=fields)


def stored(admin) -> dict[str, str]:
    admin.execute("SELECT email, name FROM users")
    return dict(admin.fetchall())


def test_creates_arriving_while_one_runs_share_one_statement(make_app, admin, database_url):
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    writes, statements = (
        counted("db_batched_writes", "create"),
        counted("db_batch_statements", "create"),
    )
    emails = [f"new{n}@example.com" for n in range(20)]
    answers = piled_up(
        app,
        database_url,
        users.CREATES,
        post(client, "first", emails[0]),
        [post(client, f"user {n}", email) for n, email in enumerate(emails[1:], 1)],
    )

    assert [a.status_code for a in answers] == [201] * 20
    assert [a.json["email"] for a in answers] == emails
    assert [a.json["name"] for a in answers] == ["first"] + [f"user {n}" for n in range(1, 20)]
    assert all(a.headers["Location"] == f"/users/{a.json['id']}" for a in answers)
    assert len({a.json["id"] for a in answers}) == 20
    assert stored(admin) == {a.json["email"]: a.json["name"] for a in answers}
    # The first went alone at once; the other 19 waited for it, together, and went as one.
    assert counted("db_batched_writes", "create") - writes == 20
    assert counted("db_batch_statements", "create") - statements == 2


def test_a_batch_with_a_taken_email_stores_the_others_and_answers_that_one_409(
    make_app, admin, database_url
):
    """The batch's statement stores the others (ON CONFLICT DO NOTHING): two of one new email
    end in one 201 and one 409, as without a batch."""
    seed_users(admin, 1)  # user1@example.com
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    writes = counted("db_batched_writes", "create")
    statements = counted("db_batch_statements", "create")
    answers = piled_up(
        app,
        database_url,
        users.CREATES,
        post(client, "first", "first@example.com"),
        [
            post(client, "a", "a@example.com"),
            post(client, "taken", "user1@example.com"),
            post(client, "twice 1", "twice@example.com"),
            post(client, "b", "b@example.com"),
            post(client, "twice 2", "twice@example.com"),
        ],
    )

    statuses = [a.status_code for a in answers]
    assert statuses[:3] == [201, 201, 409]
    assert sorted(statuses[3::2]) == [201, 409]  # one of the two of one email
    assert statuses[4] == 201
    assert answers[2].json["error"]["code"] == "email_taken"
    twice = next(a for a in answers[3::2] if a.status_code == 201).json["name"]
    # The first alone, then one statement for the rest, the second of one email left out.
    assert counted("db_batch_statements", "create") - statements == 2
    assert counted("db_batched_writes", "create") - writes == 1 + 4
    assert stored(admin) == {
        "user1@example.com": "user 1",
        "first@example.com": "first",
        "a@example.com": "a",
        "twice@example.com": twice,
        "b@example.com": "b",
    }


def test_updates_in_one_batch_each_answer_the_row_as_their_own_update_left_it(
    make_app, admin, database_url
):
    """Two updates of one user in a batch: the first goes in the batch's statement and the
    second alone, after it, so each is made once and answers its own name; a missing user is
    404 and the others are made."""
    ids = seed_users(admin, 3)
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    statements = counted("db_batch_statements", "update")
    writes = counted("db_batched_writes", "update")
    answers = piled_up(
        app,
        database_url,
        users.UPDATES,
        patch(client, ids[0], name="first"),
        [
            patch(client, ids[1], name="one"),
            patch(client, ids[2], email="new3@example.com"),
            patch(client, ids[1], name="two"),
            patch(client, ids[2] + 1000, name="nobody"),
            patch(client, ids[1], name="three"),
        ],
    )

    assert [a.status_code for a in answers] == [200, 200, 200, 200, 404, 200]
    assert [a.json["name"] for a in answers[:4]] == ["first", "one", "user 3", "two"]
    assert answers[2].json["email"] == "new3@example.com"
    assert answers[5].json["name"] == "three"
    assert answers[4].json["error"]["code"] == "not_found"
    final = stored(admin)
    assert final["user1@example.com"] == "first"
    assert final["new3@example.com"] == "user 3"
    assert final["user2@example.com"] in {"one", "two", "three"}
    # The first alone, then the batch; the second and third of one user went alone after it.
    assert counted("db_batch_statements", "update") - statements == 2
    assert counted("db_batched_writes", "update") - writes == 1 + 3


def test_an_update_to_a_taken_email_in_a_batch_is_409_and_the_others_are_made(
    make_app, admin, database_url
):
    """The batch's statement fails on the unique index and stores nothing; each update then
    runs alone, with its own answer."""
    ids = seed_users(admin, 4)
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    statements = counted("db_batch_statements", "update")
    answers = piled_up(
        app,
        database_url,
        users.UPDATES,
        patch(client, ids[0], name="first"),
        [
            patch(client, ids[1], name="renamed"),
            patch(client, ids[2], email="user4@example.com"),  # user 4's
            patch(client, ids[3], email="four@example.com", name="four"),
        ],
    )

    assert [a.status_code for a in answers] == [200, 200, 409, 200]
    assert answers[2].json["error"]["code"] == "email_taken"
    assert counted("db_batch_statements", "update") - statements == 2  # the first; the batch
    assert stored(admin) == {
        "user1@example.com": "first",
        "user2@example.com": "renamed",
        "user3@example.com": "user 3",
        "four@example.com": "four",
    }


@contextmanager
def locked(dsn: str, statement: str, *args) -> Iterator[Callable[[], None]]:
    """Hold the lock `statement` takes in a transaction of its own; the block may release it
    early with the callable it gets."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = '5s'")
            cur.execute(statement, args)
        yield conn.rollback
    finally:
        conn.rollback()
        conn.close()


def test_a_row_locked_elsewhere_holds_up_its_own_update_only(make_app, admin, database_url):
    """User 2's row is locked by another transaction: the batch skips it (SKIP LOCKED) and
    makes the other updates; user 2's runs alone and waits for that lock by itself."""
    ids = seed_users(admin, 4)
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    row_lock = "SELECT 1 FROM users WHERE id = %s FOR UPDATE"
    with locked(database_url, row_lock, ids[1]) as release_row:
        # SHARE mode stops every UPDATE at its start, and lets the row lock above be.
        with locked(database_url, "LOCK TABLE users IN SHARE MODE") as release_table:
            first = gevent.spawn(patch(client, ids[0], name="first"))
            wait_until(lambda: app.extensions[db.EXTENSION].stats()["in_use"] == 1, 5, "first")
            batch = [gevent.spawn(patch(client, uid, name=f"new {uid}")) for uid in ids[1:]]
            wait_until(lambda: app.extensions[users.UPDATES].waiting == 3, 5, "the batch")
            release_table()
        # The batch went without the locked row: the other two are answered, it waits.
        gevent.joinall([first, *batch[1:]], timeout=10, raise_error=True)
        assert [g.value.json["name"] for g in (first, *batch[1:])] == [
            "first",
            f"new {ids[2]}",
            f"new {ids[3]}",
        ]
        assert not batch[0].ready()
        release_row()
        assert batch[0].get(timeout=10).json["name"] == f"new {ids[1]}"
    assert stored(admin) == {
        "user1@example.com": "first",
        **{f"user{n}@example.com": f"new {uid}" for n, uid in enumerate(ids[1:], 2)},
    }


def test_a_write_whose_client_hung_up_while_it_waited_in_a_batch_is_not_made(
    make_app, admin, database_url
):
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    ours, theirs = socket.socketpair()
    theirs.close()  # the client is gone before the batch's statement holds a connection
    try:
        answers = piled_up(
            app,
            database_url,
            users.CREATES,
            post(client, "first", "first@example.com"),
            [
                post(client, "a", "a@example.com"),
                lambda: client.post(
                    "/users",
                    json={"name": "gone", "email": "gone@example.com"},
                    environ_overrides={"gunicorn.socket": ours},
                ),
                post(client, "b", "b@example.com"),
            ],
        )
    finally:
        ours.close()

    assert [a.status_code for a in answers] == [201, 201, 499, 201]
    assert set(stored(admin)) == {"first@example.com", "a@example.com", "b@example.com"}


def test_writes_that_got_no_connection_in_time_get_503_and_are_not_made(
    make_app, admin, database_url
):
    app = make_app(DB_POOL_MAX=5, DB_POOL_TIMEOUT=0.4, DB_STATEMENT_TIMEOUT_MS=3000)
    client = app.test_client()
    with users_locked(database_url):
        held = gevent.spawn(post(client, "first", "first@example.com"))
        wait_until(lambda: app.extensions[db.EXTENSION].stats()["in_use"] == 1, 5, "the first")
        late = [gevent.spawn(post(client, f"late {n}", f"late{n}@x.org")) for n in range(3)]
        gevent.joinall(late, timeout=5, raise_error=True)
    assert held.get(timeout=10).status_code == 201

    answers = [(g.value.status_code, g.value.json["error"]["code"]) for g in late]
    assert answers == [(503, "pool_timeout")] * 3
    assert set(stored(admin)) == {"first@example.com"}
    assert app.extensions[users.CREATES].waiting == 0


def test_through_gunicorn_concurrent_writes_are_each_made_once(database_url, admin, tmp_path):
    """200 creates of 100 emails, each asked twice, and 100 renames of 10 users, all at once
    against 2 workers with 2 connections each: one 201 and one 409 per email, every rename
    answers its own name, and the writes shared statements."""
    ids = seed_users(admin, 10)
    creates = [
        ("POST", "/users", {"name": f"new {n % 100}.{n // 100}", "email": f"new{n % 100}@x.org"})
        for n in range(200)
    ]
    renames = [("PATCH", f"/users/{ids[n % 10]}", {"name": f"name {n}"}) for n in range(100)]
    # Interleaved, so that both workers get both kinds, whichever accepts what.
    order = [*range(100), *range(200, 250), *range(100, 200), *range(250, 300)]
    sent = creates + renames
    env = {"WEB_CONCURRENCY": "2", "DB_POOL_MAX": "2", "DB_POOL_TIMEOUT": "20"}
    go, connected = Event(), []
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as server:
        with users_locked(database_url):
            clients = {
                n: gevent.spawn(
                    request, server.port, *sent[n], timeout=60, go=go, connected=connected
                )
                for n in order
            }
            wait_until(lambda: len(connected) == len(sent), 20, "300 open connections")
            go.set()
            # The first writes hold connections, on the lock; the others pile up behind.
            wait_until(lambda: waiting_on_lock(admin, APP_NAME) >= 2, 20, "the first writes")
        replies = [clients[n].get(timeout=60) for n in range(len(sent))]
        samples = scrape_metrics(server.port)

    by_email: dict[str, list] = {}
    for (_, _, body), reply in zip(creates, replies, strict=False):
        by_email.setdefault(body["email"], []).append(reply)
    for email, pair in by_email.items():
        assert sorted(r.status for r in pair) == [201, 409], email
    for (_, path, body), reply in zip(renames, replies[200:], strict=True):
        assert (reply.status, reply.json["name"]) == (200, body["name"])
        assert path == f"/users/{reply.json['id']}"
    admin.execute("SELECT email, name FROM users WHERE email LIKE '%%@x.org'")
    winners = {r.json["email"]: r.json["name"] for r in replies[:200] if r.status == 201}
    assert dict(admin.fetchall()) == winners
    assert len(winners) == 100
    admin.execute("SELECT id, name FROM users WHERE id = ANY(%s)", (ids,))
    for uid, name in admin.fetchall():
        assert name in {body["name"] for (_, path, body) in renames if path == f"/users/{uid}"}
    # Each email went in a batch statement at least once, and the creates shared statements.
    creates_sent = samples[("db_batched_writes_total", frozenset({("kind", "create")}))]
    statements = samples[("db_batch_statements_total", frozenset({("kind", "create")}))]
    assert creates_sent >= 100
    assert statements * 4 <= creates_sent, (statements, creates_sent)
