"""The connection budget: WEB_CONCURRENCY x DB_POOL_MAX x APP_INSTANCES must fit in the server's
max_connections less its reserved slots, or the service refuses to start."""

import time
from collections import Counter

import pytest
from gunicorn_proc import Gunicorn
from pgutil import autocommit, backends

from service.db.budget import Budget, BudgetExceeded, ServerLimits, check, read_limits

PG15 = ServerLimits(max_connections=100, superuser_reserved_connections=3)


def test_a_budget_that_fills_the_server_exactly_fits():
    check(Budget(web_concurrency=1, pool_max=97, instances=1), PG15)
    check(Budget(web_concurrency=4, pool_max=8, instances=3), PG15)  # 96


def test_one_connection_too_many_is_refused_with_the_arithmetic():
    with pytest.raises(BudgetExceeded) as refused:
        check(Budget(web_concurrency=4, pool_max=10, instances=3), PG15)
    assert str(refused.value).startswith(
        "WEB_CONCURRENCY 4 x DB_POOL_MAX 10 x APP_INSTANCES 3 = 120 connections, "
        "but the server allows 97 (max_connections 100 - superuser_reserved_connections 3)"
    )
    with pytest.raises(BudgetExceeded, match="= 98 connections, but the server allows 97"):
        check(Budget(web_concurrency=2, pool_max=49, instances=1), PG15)


def test_reserved_connections_of_postgresql_16_count_too():
    pg16 = ServerLimits(100, 3, reserved_connections=10)
    check(Budget(1, 87, 1), pg16)
    with pytest.raises(BudgetExceeded, match=r"allows 87 \(.* - reserved_connections 10\)"):
        check(Budget(1, 88, 1), pg16)


def test_the_budget_counts_every_instance(make_settings):
    assert Budget.of(make_settings(WEB_CONCURRENCY=3, DB_POOL_MAX=7)).connections == 21
    assert Budget.of(make_settings(WEB_CONCURRENCY=3, DB_POOL_MAX=7, APP_INSTANCES=4)) == Budget(
        3, 7, 4
    )


def test_the_limits_read_are_the_servers(database_url, admin):
    admin.execute("SELECT current_setting('max_connections')::int")
    [max_connections] = admin.fetchone()
    admin.execute("SELECT current_setting('superuser_reserved_connections')::int")
    [superuser_reserved] = admin.fetchone()

    limits = read_limits(database_url, connect_timeout=5)

    assert (limits.max_connections, limits.superuser_reserved_connections) == (
        max_connections,
        superuser_reserved,
    )


def test_gunicorn_refuses_to_start_when_the_budget_exceeds_max_connections(
    fresh_database, tmp_path
):
    limits = read_limits(fresh_database, connect_timeout=5)
    too_many = Budget(web_concurrency=2, pool_max=limits.allowed // 6 + 1, instances=3)
    env = {
        "WEB_CONCURRENCY": str(too_many.web_concurrency),
        "DB_POOL_MAX": str(too_many.pool_max),
        "APP_INSTANCES": str(too_many.instances),
    }
    gunicorn = Gunicorn(fresh_database, tmp_path / "gunicorn.log", **env)
    started = time.monotonic()
    gunicorn.refused()
    assert time.monotonic() - started < 10
    [message] = gunicorn.log_lines(f"{too_many}, but the server allows {limits.allowed}")
    assert f"max_connections {limits.max_connections}" in message
    with autocommit(fresh_database) as cur:  # refused before the schema was touched
        cur.execute("SELECT to_regclass('schema_migrations')")
        assert cur.fetchone() == (None,)


def test_gunicorn_starts_when_the_budget_fits_and_the_check_keeps_no_connection(
    fresh_database, tmp_path
):
    env = {"WEB_CONCURRENCY": "2", "DB_POOL_MAX": "3", "DB_POOL_MIN": "1", "APP_INSTANCES": "3"}
    with (
        Gunicorn(fresh_database, tmp_path / "gunicorn.log", **env) as gunicorn,
        autocommit(fresh_database) as cur,
    ):
        [line] = gunicorn.log_lines("connection budget: ")
        assert "WEB_CONCURRENCY 2 x DB_POOL_MAX 3 x APP_INSTANCES 3 = 18 connections" in line
        # Only the workers' warmed pools are connected: the master kept neither the budget
        # check's connection nor the migration's.
        assert Counter(b["application_name"] for b in backends(cur)) == {"service": 2}
