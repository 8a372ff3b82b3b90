"""Batch loaders that share permits (service/api/users.py): a worker's reads by id and pages
take turns with one query at a time, its creates and updates likewise, and reads and writes
take turns too, but wait for each other TURN_WAIT_S at most: a write stuck on a lock holds up a
read no longer than that. Real greenlets against the real server.

A lock on `users` held by the test stops the first statement in the database, with its
connection, as in tests/test_batch_writes.py; what the other kinds do meanwhile is the test.
"""

import time

import gevent
from gunicorn_proc import wait_until
from pgutil import seed_users, users_locked
from test_batch_pages import counted
from test_batch_writes import counted as counted_kind

from service import db
from service.api import users


def in_use(app) -> int:
    return app.extensions[db.EXTENSION].stats()["in_use"]


def test_lookups_wait_for_a_page_query_and_go_together_after_it(make_app, admin, database_url):
    ids = seed_users(admin, 5)
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    lookups, lookup_queries = counted("db_lookups"), counted("db_lookup_queries")
    pages, page_queries = counted("db_pages"), counted("db_page_queries")

    with users_locked(database_url):
        first = gevent.spawn(client.get, "/users?limit=2")
        wait_until(lambda: in_use(app) == 1, 5, "the page query on the lock")
        reads = [gevent.spawn(client.get, f"/users/{uid}") for uid in ids[:3]]
        later_page = gevent.spawn(client.get, "/users?limit=3")
        wait_until(lambda: app.extensions[users.LOADER].waiting == 3, 5, "the lookups")
        wait_until(lambda: app.extensions[users.PAGES].waiting == 1, 5, "the second page")
        # None of them took a connection of its own: the page query holds the reads' turn.
        assert in_use(app) == 1
    gevent.joinall([first, *reads, later_page], timeout=10, raise_error=True)

    assert first.value.status_code == 200
    assert [u["id"] for u in first.value.json["users"]] == sorted(ids, reverse=True)[:2]
    assert [r.value.json["id"] for r in reads] == ids[:3]
    assert [u["id"] for u in later_page.value.json["users"]] == sorted(ids, reverse=True)[:3]
    # The three lookups went in one query once the page's had returned.
    assert counted("db_lookups") - lookups == 3
    assert counted("db_lookup_queries") - lookup_queries == 1
    assert counted("db_pages") - pages == 2
    assert counted("db_page_queries") - page_queries == 2


def test_writes_take_turns_and_a_write_on_a_lock_holds_up_a_read_briefly(
    make_app, admin, database_url
):
    ids = seed_users(admin, 2)
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    statements = {kind: counted_kind("db_batch_statements", kind) for kind in ("create", "update")}

    # EXCLUSIVE: writes to `users` wait for the lock, reads go on.
    with users_locked(database_url, mode="EXCLUSIVE"):
        create = gevent.spawn(client.post, "/users", json={"name": "new", "email": "n@x.org"})
        wait_until(lambda: in_use(app) == 1, 5, "the create on the lock")
        update = gevent.spawn(client.patch, f"/users/{ids[0]}", json={"name": "renamed"})
        wait_until(lambda: app.extensions[users.UPDATES].waiting == 1, 5, "the update")
        assert in_use(app) == 1  # the update waits for the create's turn, with no connection

        # The create holds the worker's turn: each read waits TURN_WAIT_S for it, then goes
        # with a connection of its own.
        started = time.monotonic()
        read = client.get(f"/users/{ids[1]}")
        page = client.get("/users?limit=1")
        assert 2 * users.TURN_WAIT_S <= time.monotonic() - started < 2 * users.TURN_WAIT_S + 2
        assert (read.status_code, read.json["id"]) == (200, ids[1])
        assert (page.status_code, page.json["users"][0]["id"]) == (200, ids[1])
        assert not create.ready() and not update.ready()
    gevent.joinall([create, update], timeout=10, raise_error=True)

    assert create.value.status_code == 201
    assert (update.value.status_code, update.value.json["name"]) == (200, "renamed")
    assert counted_kind("db_batch_statements", "create") - statements["create"] == 1
    assert counted_kind("db_batch_statements", "update") - statements["update"] == 1
    assert app.extensions[users.UPDATES].waiting == 0


def test_a_write_waits_for_a_reads_turn_then_goes_without_it(
    make_app, admin, database_url, monkeypatch
):
    monkeypatch.setattr(users, "TURN_WAIT_S", 2.0)  # long enough to see the wait
    seed_users(admin, 1)
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()

    with users_locked(database_url):  # every statement on `users` waits
        page = gevent.spawn(client.get, "/users?limit=1")
        wait_until(lambda: in_use(app) == 1, 5, "the page query on the lock")
        sent = time.monotonic()
        create = gevent.spawn(client.post, "/users", json={"name": "new", "email": "t@x.org"})
        wait_until(lambda: app.extensions[users.CREATES].waiting == 1, 5, "the create")
        assert in_use(app) == 1  # it waits for the read's turn, with no connection
        wait_until(lambda: in_use(app) == 2, 5, "the create to go without the turn")
        assert time.monotonic() - sent >= users.TURN_WAIT_S
        assert app.extensions[users.CREATES].waiting == 0
    gevent.joinall([page, create], timeout=10, raise_error=True)

    assert (page.value.status_code, create.value.status_code) == (200, 201)


def test_a_query_that_waited_for_its_permit_takes_a_free_turn_at_once(
    make_app, admin, database_url, monkeypatch
):
    monkeypatch.setattr(users, "TURN_WAIT_S", 5.0)  # what a wrong wait would cost
    [uid] = seed_users(admin, 1)
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()

    with users_locked(database_url):
        page = gevent.spawn(client.get, "/users?limit=1")
        wait_until(lambda: in_use(app) == 1, 5, "the page query on the lock")
        read = gevent.spawn(client.get, f"/users/{uid}")
        wait_until(lambda: app.extensions[users.LOADER].waiting == 1, 5, "the lookup")
        released = time.monotonic()
    gevent.joinall([page, read], timeout=10, raise_error=True)

    # The page's query gave back the turn, then the permit: the lookup's query went at once.
    assert time.monotonic() - released < users.TURN_WAIT_S / 2
    assert (read.value.status_code, read.value.json["id"]) == (200, uid)
