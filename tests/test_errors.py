"""Database errors by SQLSTATE class, raised by the real server: each becomes the response its
class calls for, and the connection is kept or discarded as the class says."""

from __future__ import annotations

import psycopg2
import pytest
from pgutil import users_locked

from service.db import DatabaseUnavailable, PoolTimeout, TransactionConflict, get_db


def raising(sqlstate: str):
    """A view whose statement makes the server raise `sqlstate`, after noting its backend."""

    def view():
        with get_db() as db:
            db.execute("SELECT pg_backend_pid() AS pid")
            view.pids.append(db.fetchone()["pid"])
            db.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'raised for a test' USING ERRCODE = %s; END $$",
                (sqlstate,),
            )
        return {}

    view.pids = []
    return view


def backend_pid(client_app) -> int:
    with client_app.app_context(), get_db() as db:
        db.execute("SELECT pg_backend_pid() AS pid")
        return db.fetchone()["pid"]


RETRYABLE = {
    "40001": "serialization_failure",
    "40P01": "deadlock_detected",
    "55P03": "lock_not_available",
}
CONNECTION = {
    "08006": "connection_failure",
    "08003": "connection_does_not_exist",
    "57P01": "admin_shutdown",
    "57P02": "crash_shutdown",
    "57P03": "cannot_connect_now",
}
OTHER = {
    "53100": "disk_full",
    "23514": "check_violation",
    "XX000": "internal_error",
}


def serve(make_app, sqlstate: str):
    app = make_app(DB_POOL_MAX="1")
    view = raising(sqlstate)
    app.add_url_rule("/raise", "raise", view)
    response = app.test_client().get("/raise")
    return app, view, response


@pytest.mark.parametrize("sqlstate", RETRYABLE, ids=RETRYABLE.values())
def test_a_conflict_is_a_retryable_503_and_keeps_the_connection(make_app, sqlstate):
    app, view, response = serve(make_app, sqlstate)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "transaction_conflict"
    assert response.headers["Retry-After"] == "1"
    assert backend_pid(app) == view.pids[0]  # the same server connection serves on


@pytest.mark.parametrize("sqlstate", CONNECTION, ids=CONNECTION.values())
def test_a_lost_connection_is_database_unavailable_and_the_connection_is_discarded(
    make_app, sqlstate
):
    app, view, response = serve(make_app, sqlstate)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "database_unavailable"
    assert backend_pid(app) != view.pids[0]


@pytest.mark.parametrize("sqlstate", OTHER, ids=OTHER.values())
def test_any_other_error_is_a_500_naming_the_request_whose_traceback_is_logged(
    make_app, log_lines, sqlstate
):
    app, view, response = serve(make_app, sqlstate)
    assert response.status_code == 500
    error = response.get_json()["error"]
    assert error["code"] == "internal_error"
    assert error["request_id"] == response.headers["X-Request-ID"]
    [logged] = [line for line in log_lines() if line["message"] == "unhandled error"]
    assert logged["request_id"] == error["request_id"]
    assert sqlstate in logged["exception"] or "raised for a test" in logged["exception"]
    assert backend_pid(app) == view.pids[0]  # a statement's error costs no connection


def test_the_statement_timeout_is_its_own_503_and_keeps_the_connection(make_app, database_url):
    app = make_app(DB_POOL_MAX="1", DB_STATEMENT_TIMEOUT_MS="200")
    pid = backend_pid(app)
    with users_locked(database_url):
        response = app.test_client().get("/users")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "statement_timeout"
    assert backend_pid(app) == pid


def test_a_real_lock_timeout_is_a_transaction_conflict(make_app, database_url):
    app = make_app(DB_POOL_MAX="1")

    def view():
        with get_db() as db:
            db.execute("SET LOCAL lock_timeout = '50ms'")
            db.execute("SELECT count(*) FROM users")
        return {}

    app.add_url_rule("/locked", "locked", view)
    with users_locked(database_url):
        response = app.test_client().get("/locked")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "transaction_conflict"


class SubConflict(TransactionConflict):
    pass


class SubPoolTimeout(PoolTimeout):
    pass


class SubUnavailable(DatabaseUnavailable):
    pass


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (SubConflict, "transaction_conflict"),
        (SubPoolTimeout, "pool_timeout"),
        (SubUnavailable, "database_unavailable"),
    ],
)
def test_a_subclass_maps_as_its_parent_does(app, raised, code):
    def view():
        raise raised("a subclass")

    app.add_url_rule("/sub", "sub", view)
    response = app.test_client().get("/sub")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == code


def test_a_psycopg2_subclass_of_an_unmapped_error_is_still_a_json_500(app):
    class Odd(psycopg2.errors.DiskFull):
        pass

    def view():
        raise Odd("full")

    app.add_url_rule("/odd", "odd", view)
    response = app.test_client().get("/odd")
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"
