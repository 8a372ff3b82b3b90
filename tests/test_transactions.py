"""`get_db()` is one transaction whatever the block writes through: commit on a clean exit,
roll back on an exception. Each way of writing is tried against the real server."""

from __future__ import annotations

import contextlib
import io

import psycopg2
import psycopg2.errors
import pytest
from psycopg2 import sql

from service.db import TransactionAborted, get_db


class Boom(Exception):
    pass


def _execute(db, email):
    db.execute("INSERT INTO users (name, email) VALUES (%s, %s)", ("n", email))


def _executemany(db, email):
    db.executemany("INSERT INTO users (name, email) VALUES (%s, %s)", [("n", email)])


def _callproc(db, email):
    db.callproc("test_add_user", ("n", email))


def _copy_from(db, email):
    db.copy_from(io.StringIO(f"n\t{email}\n"), "users", columns=("name", "email"))


def _copy_expert(db, email):
    db.copy_expert("COPY users (name, email) FROM STDIN", io.StringIO(f"n\t{email}\n"))


def _second_cursor(db, email):
    with db.connection.cursor() as other:
        _execute(other, email)


def _composed(db, email):
    db.execute(
        sql.SQL("INSERT INTO {} (name, email) VALUES (%s, %s)").format(sql.Identifier("users")),
        ("n", email),
    )


def _bytes(db, email):
    db.execute(b"INSERT INTO users (name, email) VALUES (%s, %s)", ("n", email))


def _read_first(db, email):
    db.execute("SELECT 1")  # the old code protected only a block whose first call wrote
    _executemany(db, email)


WRITES = [
    _execute,
    _executemany,
    _callproc,
    _second_cursor,
    _composed,
    _bytes,
    _read_first,
]


@pytest.fixture
def add_user_function(admin):
    admin.execute(
        "CREATE FUNCTION test_add_user(n text, e text) RETURNS void LANGUAGE sql AS"
        " $$ INSERT INTO users (name, email) VALUES (n, e) $$"
    )
    yield
    admin.execute("DROP FUNCTION test_add_user(text, text)")


def emails(admin) -> list[str]:
    admin.execute("SELECT email FROM users ORDER BY id")
    return [email for (email,) in admin.fetchall()]


@pytest.mark.parametrize("write", WRITES, ids=lambda write: write.__name__.strip("_"))
def test_a_block_that_raises_leaves_nothing_and_a_clean_one_commits(
    app, admin, add_user_function, write
):
    with app.app_context():
        with pytest.raises(Boom), get_db() as db:
            write(db, "gone@example.com")
            raise Boom
        assert emails(admin) == []
        with get_db() as db:
            write(db, "kept@example.com")
            assert emails(admin) == []  # not visible outside before the commit
    assert emails(admin) == ["kept@example.com"]


@pytest.mark.parametrize("copy", [_copy_from, _copy_expert], ids=["copy_from", "copy_expert"])
def test_copy_is_refused_under_gevent_before_anything_is_sent(app, admin, copy):
    """psycopg2 cannot run COPY with a green wait callback (psycogreen's): it says so at once,
    and the block's transaction, with what it wrote before, rolls back as for any error."""
    refused = pytest.raises(psycopg2.ProgrammingError, match="asynchronous")
    with app.app_context(), refused, get_db() as db:
        _execute(db, "before@example.com")
        copy(db, "copied@example.com")
    assert emails(admin) == []


def test_rollback_inside_a_block_undoes_what_came_before_as_psycopg2_documents(app, admin):
    with app.app_context(), get_db() as db:
        _execute(db, "undone@example.com")
        db.connection.rollback()
        _execute(db, "after@example.com")
    assert emails(admin) == ["after@example.com"]


def test_commit_inside_a_block_keeps_what_came_before_and_an_exception_undoes_the_rest(app, admin):
    with app.app_context(), pytest.raises(Boom), get_db() as db:
        _execute(db, "committed@example.com")
        db.connection.commit()
        _execute(db, "undone@example.com")
        raise Boom
    assert emails(admin) == ["committed@example.com"]


def test_a_block_that_swallows_a_database_error_commits_nothing_and_says_so(app, admin):
    with app.app_context():
        _create(app, "taken@example.com")
        with pytest.raises(TransactionAborted), get_db() as db:
            _execute(db, "first@example.com")
            # Caught, the error leaves the transaction aborted: PostgreSQL answers COMMIT with
            # ROLLBACK, and psycopg2 raises nothing for it.
            with contextlib.suppress(psycopg2.errors.UniqueViolation):
                _execute(db, "taken@example.com")
    assert emails(admin) == ["taken@example.com"]


def test_the_connection_comes_back_usable_after_each_way_of_ending(app):
    with app.app_context():
        for ending in (Boom, None):
            with pytest.raises(Boom) if ending else _nothing(), get_db() as db:
                db.execute("SELECT 1")
                if ending:
                    raise ending
        with get_db() as db:
            db.execute("SELECT txid_current_if_assigned() AS t")
            assert db.fetchone() == {"t": None}  # a new transaction, nothing left over


def test_autocommit_runs_what_cannot_run_in_a_transaction_block(app, admin):
    with app.app_context(), get_db(autocommit=True) as db:
        db.execute("VACUUM users")
        db.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS test_users_name ON users (name)")
    admin.execute("DROP INDEX test_users_name")


def test_autocommit_commits_each_statement_at_once(app, admin):
    with app.app_context(), pytest.raises(Boom), get_db(autocommit=True) as db:
        _execute(db, "stays@example.com")
        assert emails(admin) == ["stays@example.com"]
        raise Boom
    assert emails(admin) == ["stays@example.com"]


def test_a_transaction_block_is_one_transaction_for_the_server(app):
    with app.app_context(), get_db() as db:
        db.execute("SELECT txid_current() AS t")
        first = db.fetchone()["t"]
        with db.connection.cursor() as other:
            other.execute("SELECT txid_current() AS t")
            assert other.fetchone()["t"] == first


def _create(app, email: str) -> None:
    with get_db() as db:
        _execute(db, email)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
