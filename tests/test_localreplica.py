"""Streaming replicas of the throwaway PostgreSQL (deploy/localpg.py), against real servers:
what reaches them, and the faults the tests of reads on replicas will provoke."""

import secrets
import subprocess
import time

import gevent
import pgutil
import psycopg2
import psycopg2.errors
import pytest

DEADLINE_S = 10.0


def add_user(url: str) -> str:
    """Insert a user of a fresh email; return the email."""
    email = f"{secrets.token_hex(6)}@example.com"
    with pgutil.autocommit(url) as cur:
        cur.execute("INSERT INTO users (name, email) VALUES ('replicated', %s)", (email,))
    return email


def has_user(url: str, email: str) -> bool:
    with pgutil.autocommit(url) as cur:
        cur.execute("SELECT count(*) FROM users WHERE email = %s", (email,))
        return cur.fetchone() == (1,)


def wait_for_user(url: str, email: str) -> float:
    """Seconds until the user shows on `url`; fails after DEADLINE_S."""
    start = time.monotonic()
    while not has_user(url, email):
        assert time.monotonic() - start < DEADLINE_S, f"{email} never showed"
        time.sleep(0.01)
    return time.monotonic() - start


def one(url: str, sql: str):
    with pgutil.autocommit(url) as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def slots(primary) -> set[str]:
    with pgutil.autocommit(primary.dsn()) as cur:
        cur.execute("SELECT slot_name FROM pg_replication_slots")
        return {name for (name,) in cur.fetchall()}


def processes(postmaster: int) -> dict[str, str]:
    """The postmaster and its children as ps sees them: their titles ("postgres: startup
    recovering ...") by state (T: stopped)."""
    listed = subprocess.run(
        ["ps", "-o", "stat=,args=", "--pid", str(postmaster), "--ppid", str(postmaster)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = (line.split(None, 1) for line in listed.stdout.splitlines())
    return {args: stat for stat, args in rows}


def test_a_commit_on_the_primary_is_on_every_replica_once_it_replayed_that_far(replicated):
    email = add_user(replicated.database_url)
    target = replicated.primary.current_lsn()
    for replica, url in zip(replicated.replicas, replicated.replica_urls, strict=True):
        deadline = time.monotonic() + DEADLINE_S
        while replica.replay_lsn() < target:
            assert time.monotonic() < deadline, "the replica never replayed the commit"
            time.sleep(0.01)
        assert one(url, "SELECT pg_is_in_recovery()") is True
        assert has_user(url, email)


@pytest.mark.timing
def test_an_apply_delay_holds_commits_back_on_its_replica_alone_and_zero_lifts_it(replicated):
    delayed = replicated.replicas[0]
    delayed_url, prompt_url = replicated.replica_urls
    delayed.set_apply_delay(1)
    try:
        email = add_user(replicated.database_url)
        start = time.monotonic()
        wait_for_user(prompt_url, email)
        assert not has_user(delayed_url, email)
        wait_for_user(delayed_url, email)
        assert 0.5 <= time.monotonic() - start < DEADLINE_S
    finally:
        delayed.set_apply_delay(0)
    assert wait_for_user(delayed_url, add_user(replicated.database_url)) < 0.5


def test_a_paused_replica_answers_nothing_until_resumed(replicated):
    replica, url = replicated.replicas[1], replicated.replica_urls[1]
    with pgutil.autocommit(url) as connected:
        replica.pause()
        try:
            frozen = processes(replica.pid)
            with pytest.raises(gevent.Timeout), gevent.Timeout(1):
                psycopg2.connect(url).close()
            with pytest.raises(gevent.Timeout), gevent.Timeout(1):
                connected.execute("SELECT 1")
        finally:
            replica.resume()
    titles = " ".join(frozen)
    assert "startup" in titles and "walreceiver" in titles and "idle" in titles, titles
    assert all(state.startswith("T") for state in frozen.values()), frozen
    assert not any(state.startswith("T") for state in processes(replica.pid).values())
    wait_for_user(url, add_user(replicated.database_url))


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_replica_halted_then_launched_streams_again(replicated, mode):
    replica = replicated.primary.start_replica()
    try:
        url = replica.dsn(replicated.dbname)
        replica.halt(mode)
        written_while_down = add_user(replicated.database_url)
        replica.launch()
        assert one(url, "SELECT status FROM pg_stat_wal_receiver") == "streaming"
        wait_for_user(url, written_while_down)
        wait_for_user(url, add_user(replicated.database_url))
    finally:
        replica.stop()


def test_a_promoted_replica_takes_writes_of_its_own_and_its_stop_drops_its_slot(replicated):
    replica = replicated.primary.start_replica()
    try:
        assert replica.slot in slots(replicated.primary)
        url = replica.dsn(replicated.dbname)
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            add_user(url)
        replica.promote()
        assert one(url, "SELECT pg_is_in_recovery()") is False
        email = add_user(url)
        assert has_user(url, email)
        assert not has_user(replicated.database_url, email)
    finally:
        replica.stop()
    assert replica.slot not in slots(replicated.primary)


def test_a_vacuum_on_the_primary_cancels_a_standby_query_that_still_reads_what_it_removed(
    replicated,
):
    """With max_standby_streaming_delay 0 replay waits for no query: the one whose snapshot
    still sees the rows that VACUUM removed is cancelled at once, SQLSTATE 40001."""
    replica = replicated.primary.start_replica({"max_standby_streaming_delay": "0"})
    table = f"doomed_{secrets.token_hex(4)}"
    try:
        with pgutil.autocommit(replicated.database_url) as cur:
            cur.execute(f"CREATE TABLE {table} AS SELECT generate_series(1, 1000) AS i")
        replica.catch_up()
        url = replica.dsn(replicated.dbname)
        reading = gevent.spawn(one, url, f"SELECT count(*), pg_sleep(5) FROM {table}")
        with pgutil.autocommit(url) as cur:
            deadline = time.monotonic() + DEADLINE_S
            while not pgutil.backends(cur, state="active"):
                assert time.monotonic() < deadline, "the read never started"
                time.sleep(0.01)
        with pgutil.autocommit(replicated.database_url) as cur:
            cur.execute(f"DELETE FROM {table}")
            cur.execute(f"VACUUM {table}")
        with pytest.raises(psycopg2.errors.SerializationFailure):
            reading.get(timeout=4)
    finally:
        with pgutil.autocommit(replicated.database_url) as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        replica.stop()
