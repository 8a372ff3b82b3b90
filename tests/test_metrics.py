"""`GET /metrics`: the pool's gauges, counters and wait histogram, and requests by route and
status, added up across gunicorn's workers.

The first tests read one process's metrics through the test client (prometheus_client's
registry is global, so they compare before and after); the last ones run the production
command with two workers, where only the multiprocess files can add the workers up.
"""

import json
import os
import signal
from pathlib import Path

import gevent
import pytest
from gunicorn_proc import (
    HOST,
    Gunicorn,
    free_port,
    parse_metrics,
    request,
    scrape_metrics,
    wait_until,
)
from pgutil import backends, seed_users
from prometheus_client import REGISTRY

from config import ConfigError, load_settings
from service import db
from service.app import create_app
from service.db import DatabaseUnavailable, PoolTimeout
from service.observability import metrics

USER_ROUTE = "/users/<user_id>"


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    return parse_metrics(response.get_data(as_text=True))


def test_requests_are_counted_by_route_and_status_never_by_raw_path(client, admin):
    [user] = seed_users(admin, 1)
    before = scrape(client)
    answers = [
        client.get(f"/users/{user}").status_code,
        client.get(f"/users/{user}").status_code,
        client.get("/users/abc").status_code,
        client.get("/no/such/route").status_code,
        client.open("/users", method="BREW").status_code,
    ]
    after = scrape(client)

    assert answers == [200, 200, 404, 404, 405]

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    total = "http_requests_total"
    assert delta(total, method="GET", route=USER_ROUTE, status="200") == 2
    assert delta(total, method="GET", route=USER_ROUTE, status="404") == 1
    assert delta(total, method="GET", route="unmatched", status="404") == 1
    assert delta(total, method="other", route="unmatched", status="405") == 1
    latency = "http_request_duration_seconds"
    assert delta(f"{latency}_count", method="GET", route=USER_ROUTE) == 3
    assert delta(f"{latency}_sum", method="GET", route=USER_ROUTE) > 0
    labels = {value for _, sample_labels in after for _, value in sample_labels}
    assert not {f"/users/{user}", "/users/abc", "/no/such/route", "BREW"} & labels


def test_each_checkout_is_counted_with_its_wait(client, admin):
    [user] = seed_users(admin, 1)
    before = scrape(client)
    for _ in range(5):
        assert client.get(f"/users/{user}").status_code == 200
    after = scrape(client)

    def delta(name):
        return value(after, name) - value(before, name)

    assert delta("db_pool_checkouts_total") == 5
    assert delta("db_pool_wait_seconds_count") == 5
    assert 0 < delta("db_pool_wait_seconds_sum") < 5 * 0.5


def test_the_pool_gauges_follow_lends_returns_waiters_and_close(make_pool):
    pool = make_pool(max_size=2, events=metrics.PoolMetrics())

    def gauges() -> dict[str, float]:
        return {key: REGISTRY.get_sample_value(f"db_pool_{key}") for key in metrics.POOL_GAUGES}

    def wait_for_a_connection():
        with pool.connection(timeout=5):
            pass

    assert gauges() == {"max": 2, "size": 0, "in_use": 0, "idle": 0, "waiting": 0}
    with pool.connection(), pool.connection():
        assert gauges() == {"max": 2, "size": 2, "in_use": 2, "idle": 0, "waiting": 0}
        waiter = gevent.spawn(wait_for_a_connection)
        wait_until(lambda: gauges()["waiting"] == 1, 5, "a waiter to be counted")
        waiter.kill()
        assert gauges()["waiting"] == 0
    assert gauges() == {"max": 2, "size": 2, "in_use": 0, "idle": 2, "waiting": 0}
    pool.close()
    assert gauges() == {"max": 2, "size": 0, "in_use": 0, "idle": 0, "waiting": 0}


def test_a_pool_timeout_is_counted_and_answered_503(make_settings, admin):
    [user] = seed_users(admin, 1)
    app = create_app(make_settings(DB_POOL_MAX=1, DB_POOL_TIMEOUT=0.05))
    pool = db.open_pool(app)
    try:
        client = app.test_client()
        before = scrape(client)
        with pool.connection():  # the only connection: the request waits, then gives up
            response = client.get(f"/users/{user}")
        after = scrape(client)
    finally:
        db.close_pool(app)

    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "pool_timeout"
    timeouts = value(after, "db_pool_timeouts_total") - value(before, "db_pool_timeouts_total")
    assert timeouts == 1
    answered = {"method": "GET", "route": USER_ROUTE, "status": "503"}
    total = "http_requests_total"
    assert value(after, total, **answered) - value(before, total, **answered) == 1


def test_discarded_connections_and_connect_errors_are_counted(make_pool, admin, client):
    pool = make_pool(max_size=1, events=metrics.PoolMetrics())
    with pool.connection() as cur:
        cur.execute("SELECT pg_backend_pid() AS pid")
        backend = cur.fetchone()["pid"]
    before = scrape(client)
    admin.execute("SELECT pg_terminate_backend(%s)", (backend,))

    wait_until(lambda: backend not in {b["pid"] for b in backends(admin)}, 5, "the backend to exit")
    with pool.connection() as cur:  # the dead idle connection is discarded, a new one opened
        cur.execute("SELECT 1")

    unreachable = make_pool(
        f"postgresql://nobody@{HOST}:{free_port()}/x", events=metrics.PoolMetrics()
    )
    with pytest.raises(DatabaseUnavailable), unreachable.connection():
        pass
    after = scrape(client)

    assert value(after, "db_pool_discarded_total") - value(before, "db_pool_discarded_total") == 1
    connect_errors = "db_pool_connect_errors_total"
    assert value(after, connect_errors) - value(before, connect_errors) == 1


def test_a_pool_without_events_reports_nothing(make_pool, client):
    pool = make_pool(max_size=1)
    before = scrape(client)
    with pool.connection() as cur:
        cur.execute("SELECT 1")
    with pool.connection(), pytest.raises(PoolTimeout), pool.connection(timeout=0.01):
        pass
    after = scrape(client)
    for name in ("db_pool_checkouts_total", "db_pool_timeouts_total"):
        assert value(after, name) == value(before, name), name


# --- the production command: two workers, one /metrics ---------------------------------------

WORKERS = 2
POOL_MAX = 3


@pytest.fixture(scope="module")
def server(database_url, tmp_path_factory):
    log = tmp_path_factory.mktemp("metrics") / "gunicorn.log"
    env = {"WEB_CONCURRENCY": str(WORKERS), "DB_POOL_MAX": str(POOL_MAX), "DB_POOL_MIN": "1"}
    with Gunicorn(database_url, log, **env) as gunicorn:
        yield gunicorn


def served_by(gunicorn: Gunicorn, route: str) -> list[int]:
    """The pid of the worker behind each access line for `route` so far."""
    lines = (json.loads(line) for line in gunicorn.log_lines('"service.access"'))
    return [line["pid"] for line in lines if line["route"] == route]


def served_by_request(gunicorn: Gunicorn, request_id: str) -> int:
    """The pid of the worker that wrote the access line of the request with this id."""
    lines = (json.loads(line) for line in gunicorn.log_lines(f'"request_id":"{request_id}"'))
    return next(line["pid"] for line in lines if line["logger"] == "service.access")


def test_metrics_add_up_every_workers_requests(server, admin):
    [user] = seed_users(admin, 1)
    sent = 0
    # The kernel decides which worker accepts a connection: send bursts until both have served.
    for _ in range(20):
        burst = [gevent.spawn(request, server.port, "GET", f"/users/{user}") for _ in range(20)]
        assert [g.get(timeout=30).status for g in burst] == [200] * len(burst)
        sent += len(burst)
        if len(set(served_by(server, USER_ROUTE))) == WORKERS:
            break
    assert len(set(served_by(server, USER_ROUTE))) == WORKERS, "one worker served everything"

    # Whichever worker answers /metrics, it reports the requests of both. Scrapes go in
    # bursts, as the requests did, so that both workers are woken; each is tagged with a
    # request id, which its access line pairs with the worker that answered it.
    reports = {}
    for round_ in range(20):
        ids = [f"scrape-{round_}-{i}" for i in range(8)]
        scrapes = [gevent.spawn(scrape_metrics, server.port, {"X-Request-ID": i}) for i in ids]
        for request_id, scrape in zip(ids, scrapes, strict=True):
            reports[served_by_request(server, request_id)] = scrape.get(timeout=30)
        if len(reports) == WORKERS:
            break
    assert len(reports) == WORKERS, "one worker served every scrape"
    for samples in reports.values():
        ok = {"method": "GET", "route": USER_ROUTE, "status": "200"}
        assert value(samples, "http_requests_total", **ok) == sent
        count = "http_request_duration_seconds_count"
        assert value(samples, count, method="GET", route=USER_ROUTE) == sent
        assert value(samples, "db_lookups_total") == sent
        queries = value(samples, "db_lookup_queries_total")
        assert 0 < queries <= sent  # fewer when concurrent lookups shared a query
        assert value(samples, "db_pool_checkouts_total") >= queries
        assert value(samples, "db_pool_max") == WORKERS * POOL_MAX
        assert value(samples, "db_pool_in_use") == 0
        assert value(samples, "db_pool_idle") == value(samples, "db_pool_size") >= WORKERS


def test_a_dead_workers_gauges_leave_the_sums_and_its_counts_stay(server, admin):
    [user] = seed_users(admin, 1)
    for _ in range(3):
        assert request(server.port, "GET", f"/users/{user}").status == 200
    ok = {"method": "GET", "route": USER_ROUTE, "status": "200"}
    before = value(scrape_metrics(server.port), "http_requests_total", **ok)
    victim = served_by(server, USER_ROUTE)[-1]
    opened = len(server.log_lines("pool open"))

    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(server.log_lines("pool open")) > opened, 20, "a new worker's pool")
    after = scrape_metrics(server.port)

    assert value(after, "db_pool_max") == WORKERS * POOL_MAX  # not the dead worker's too
    assert value(after, "http_requests_total", **ok) == before


def metrics_dir(gunicorn: Gunicorn) -> Path:
    [line] = gunicorn.log_lines('"metrics: ')
    return Path(json.loads(line)["message"].removeprefix("metrics: "))


def test_a_metrics_dir_of_its_own_is_made_and_removed_at_exit(database_url, tmp_path):
    gunicorn = Gunicorn(database_url, tmp_path / "gunicorn.log", WEB_CONCURRENCY="1")
    with gunicorn:
        made = metrics_dir(gunicorn)
        assert made.is_dir()
        assert list(made.glob("*.db"))
    assert not made.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP])
def test_a_stop_while_waiting_for_the_database_removes_the_metrics_dir(tmp_path, sig):
    temp = tmp_path / "tmp"  # where the master makes its metrics dir
    temp.mkdir()
    nobody_listens = f"postgresql://nobody@{HOST}:{free_port()}/none"
    gunicorn = Gunicorn(nobody_listens, tmp_path / "gunicorn.log", TMPDIR=str(temp))
    gunicorn.start()
    try:
        wait_until(lambda: gunicorn.log_lines("waiting for the database"), 15, "the start to wait")
        assert list(temp.glob("service-metrics-*"))
        gunicorn.proc.send_signal(sig)
        code = gunicorn.proc.wait(timeout=10)
    finally:
        gunicorn.terminate()
    assert code != 0
    assert f"stopped by {sig.name} while starting" in gunicorn.log
    assert not list(temp.glob("service-metrics-*"))


def test_a_given_metrics_dir_starts_from_zero_and_is_kept(database_url, tmp_path):
    given = tmp_path / "metrics"
    given.mkdir()
    env = {"WEB_CONCURRENCY": "1", "PROMETHEUS_MULTIPROC_DIR": str(given)}
    counts = []
    for run in range(2):  # the same directory, as after a container restart
        with Gunicorn(database_url, tmp_path / f"gunicorn{run}.log", **env) as gunicorn:
            assert metrics_dir(gunicorn) == given
            for _ in range(3):
                assert request(gunicorn.port, "GET", "/openapi.json").status == 200
            samples = scrape_metrics(gunicorn.port)
            ok = {"method": "GET", "route": "/openapi.json", "status": "200"}
            counts.append(value(samples, "http_requests_total", **ok))
        assert list(given.glob("*.db")), "the files are the operator's to keep"
    assert counts == [3, 3]  # the second run counted from zero, not from the first's files


def test_with_a_metrics_port_metrics_leave_the_public_listener(database_url, tmp_path):
    """METRICS_PORT: /metrics there alone; the public port answers it 404, and a Host header
    naming the metrics port changes nothing (the listener decides, not the client)."""
    public, private = free_port(), free_port()
    env = {
        "WEB_CONCURRENCY": "1",
        "DB_POOL_MAX": "1",
        "PORT": str(public),
        "METRICS_PORT": str(private),
        "GUNICORN_CMD_ARGS": f"--bind={HOST}:{public} --bind={HOST}:{private}",
    }
    gunicorn = Gunicorn(database_url, tmp_path / "gunicorn.log", **env)
    gunicorn.port = public  # where it is waited for, as ready
    with gunicorn:
        on_public = request(public, "GET", "/metrics")
        spoofed = request(public, "GET", "/metrics", headers={"Host": f"{HOST}:{private}"})
        scraped = request(private, "GET", "/metrics")
        users_on_private = request(private, "GET", "/users")
        health_on_public = request(public, "GET", "/healthz")
    assert (on_public.status, spoofed.status) == (404, 404)
    assert on_public.json["error"]["code"] == "not_found"
    assert scraped.status == 200 and b"db_pool_max" in scraped.body
    assert users_on_private.status == 404
    assert health_on_public.status == 200


def test_metrics_port_must_differ_from_port():
    with pytest.raises(ConfigError, match="METRICS_PORT=9000 is PORT too"):
        load_settings({"PORT": "9000", "METRICS_PORT": "9000"})
