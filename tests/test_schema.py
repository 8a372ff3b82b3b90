"""Migrations apply once, in order, even when several instances start together."""

import time

import gevent
import pytest
from loadgen import join_all

from service.db import schema


def test_migrating_again_applies_nothing(database_url, admin):
    assert schema.migrate(database_url, connect_timeout=5) == []
    admin.execute("SELECT version, name FROM schema_migrations ORDER BY version")
    assert admin.fetchall() == [(1, "001_users.sql")]


def test_instances_starting_together_apply_each_file_once(pg_server, admin):
    if pg_server is None:
        pytest.skip("needs the throwaway server to create a database")
    url = pg_server.create_database("migrate_race")
    applied = join_all([gevent.spawn(schema.migrate, url, 5) for _ in range(5)], 60, "migrations")
    assert sorted(applied) == [[], [], [], [], ["001_users.sql"]]


def test_an_unreachable_database_fails_start_with_the_password_hidden():
    with pytest.raises(RuntimeError, match="cannot reach the database") as failed:
        schema.migrate("postgresql://u:hunter2@127.0.0.1:1/db", connect_timeout=1, wait_s=0.3)
    assert "hunter2" not in str(failed.value)


def test_a_server_that_never_answers_stops_the_migration_in_time(silent_port):
    started = time.monotonic()
    with gevent.Timeout(10), pytest.raises(RuntimeError, match="cannot reach the database"):
        schema.migrate(f"host=127.0.0.1 port={silent_port}", 1, wait_s=2)
    assert time.monotonic() - started < 5
