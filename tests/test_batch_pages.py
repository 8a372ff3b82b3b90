"""Batched pages (service/api/users.py): concurrent `GET /users` of one worker sharing one
query, each request answered the page it asked for, with real greenlets against the real
server; then through real gunicorn workers over HTTP.

Requests pile up as in tests/test_batch_writes.py: a lock on `users` held by the test stops the
first page's query in the database, with its connection, and the pages asked meanwhile gather
in the next batch.
"""

import gevent
from gevent.event import Event
from gunicorn_proc import Gunicorn, request, scrape_metrics, wait_until
from pgutil import APP_NAME, seed_users, users_locked, waiting_on_lock
from prometheus_client import REGISTRY
from test_batch_writes import piled_up

from service.api import users
from service.api.pagination import encode_cursor

USERS = 60


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_total") or 0.0


def pages_piled_up(app, database_url, first: str, rest: list[str]) -> list:
    """GET `first`, then each of `rest` while its query waits on the lock (piled_up)."""
    client = app.test_client()
    return piled_up(
        app,
        database_url,
        users.PAGES,
        lambda: client.get(first),
        [lambda path=path: client.get(path) for path in rest],
    )


def pages_asked(ids: list[int]) -> list[str]:
    """Pages of every shape: the same page three times, other limits, cursors in the middle,
    at the oldest user (an empty page), past the newest, 0 and 2**63-1, the default limit."""
    newest_first = sorted(ids, reverse=True)
    return [
        "/users?limit=5",
        "/users?limit=5",
        "/users?limit=5",
        "/users?limit=2",
        "/users?limit=60",  # exactly all: no next cursor
        "/users?limit=59",
        f"/users?limit=5&cursor={encode_cursor(newest_first[4])}",
        f"/users?limit=5&cursor={encode_cursor(newest_first[4])}",
        f"/users?limit=50&cursor={encode_cursor(newest_first[20])}",  # the last 39: a short page
        f"/users?limit=1&cursor={encode_cursor(newest_first[-1])}",  # after the oldest: empty
        f"/users?limit=3&cursor={encode_cursor(newest_first[0] + 1000)}",  # a deleted newest
        "/users",
        f"/users?limit=4&cursor={encode_cursor(0)}",  # empty
        f"/users?limit=4&cursor={encode_cursor(2**63 - 1)}",  # the newest
    ]


def test_pages_arriving_while_one_runs_share_one_query_and_each_gets_its_own(
    make_app, admin, database_url
):
    ids = seed_users(admin, USERS)
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    paths = pages_asked(ids)
    # Each page as a request alone gets it: one query each, no batch.
    alone = [client.get(path) for path in paths]
    assert [a.status_code for a in alone] == [200] * len(paths)
    pages, queries = counted("db_pages"), counted("db_page_queries")

    answers = pages_piled_up(app, database_url, "/users?limit=3", paths)

    assert answers[0].json == alone[2].json | {
        "users": alone[2].json["users"][:3],
        "next_cursor": encode_cursor(alone[2].json["users"][2]["id"]),
    }
    assert [a.status_code for a in answers[1:]] == [200] * len(paths)
    assert [a.json for a in answers[1:]] == [a.json for a in alone]
    # Spot checks that the answers alone are the pages asked for, not all the same.
    newest_first = sorted(ids, reverse=True)
    assert [u["id"] for u in alone[0].json["users"]] == newest_first[:5]
    assert [u["id"] for u in alone[6].json["users"]] == newest_first[5:10]
    assert [u["id"] for u in alone[8].json["users"]] == newest_first[21:]
    assert alone[8].json["next_cursor"] is None
    assert [u["id"] for u in alone[4].json["users"]] == newest_first
    assert alone[4].json["next_cursor"] is None
    assert alone[5].json["next_cursor"] == encode_cursor(newest_first[58])
    assert alone[9].json == {"users": [], "next_cursor": None}
    assert [u["id"] for u in alone[10].json["users"]] == newest_first[:3]
    assert [u["id"] for u in alone[11].json["users"]] == newest_first[:50]
    assert alone[11].json["next_cursor"] == encode_cursor(newest_first[49])
    assert alone[12].json == {"users": [], "next_cursor": None}
    assert [u["id"] for u in alone[13].json["users"]] == newest_first[:4]
    # The first went alone at once; the other 14 waited for it, together, and went as one.
    assert counted("db_pages") - pages == 1 + len(paths)
    assert counted("db_page_queries") - queries == 2
    assert app.extensions[users.PAGES].waiting == 0


def test_requests_for_one_page_share_its_rows(make_app, admin, database_url):
    """Twenty requests for the newest page while one runs: one plain query answers them all,
    and a user created before they were asked is on it."""
    ids = seed_users(admin, 5)
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    created = client.post("/users", json={"name": "new", "email": "new@example.com"}).json
    pages, queries = counted("db_pages"), counted("db_page_queries")

    answers = pages_piled_up(app, database_url, "/users?limit=1", ["/users?limit=3"] * 20)

    newest = [created["id"], *sorted(ids, reverse=True)[:2]]
    assert [[u["id"] for u in a.json["users"]] for a in answers[1:]] == [newest] * 20
    assert {a.json["next_cursor"] for a in answers[1:]} == {encode_cursor(newest[-1])}
    assert counted("db_pages") - pages == 21
    assert counted("db_page_queries") - queries == 2


def test_through_gunicorn_concurrent_pages_are_each_their_own(database_url, admin, tmp_path):
    """140 requests for 11 distinct pages of every shape, all at once against 2 workers with 2
    connections each, piled up behind a lock: each gets the page it asked for, and they
    shared queries."""
    ids = seed_users(admin, USERS)
    paths = pages_asked(ids) * 10
    env = {"WEB_CONCURRENCY": "2", "DB_POOL_MAX": "2", "DB_POOL_TIMEOUT": "20"}
    go, connected = Event(), []
    with Gunicorn(database_url, tmp_path / "gunicorn.log", **env) as server:
        alone = {path: request(server.port, "GET", path).json for path in set(paths)}
        with users_locked(database_url):
            clients = [
                gevent.spawn(
                    request, server.port, "GET", path, timeout=60, go=go, connected=connected
                )
                for path in paths
            ]
            wait_until(lambda: len(connected) == len(paths), 20, "the open connections")
            go.set()
            wait_until(lambda: waiting_on_lock(admin, APP_NAME) >= 1, 20, "the first pages")
        replies = [client.get(timeout=60) for client in clients]
        samples = scrape_metrics(server.port)

    assert [r.status for r in replies] == [200] * len(paths)
    assert [r.json for r in replies] == [alone[path] for path in paths]
    pages = samples[("db_pages_total", frozenset())]
    queries = samples[("db_page_queries_total", frozenset())]
    assert pages == len(paths) + len(alone)
    assert queries * 4 <= pages, (queries, pages)
