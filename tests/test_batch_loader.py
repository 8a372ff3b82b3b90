"""Batched lookups (service/db/batch.py): concurrent `GET /users/<id>` of one worker sharing
queries, with real greenlets against the real server.

Through real gunicorn workers, tests/test_faults.py storms a stalled database with lookups
(every one answered 503 in time, the pools whole afterwards) and tests/test_metrics.py checks
that lookups and their queries add up across workers.
"""

import gc
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import gevent
from gevent.event import Event
from gevent.monkey import get_original
from gunicorn_proc import access_lines, wait_until
from pgutil import APP_NAME, seed_users, users_locked, waiting_on_lock
from prometheus_client import REGISTRY
from test_batch_writes import locked

from service import db
from service.api import users
from service.db import DatabaseUnavailable
from service.db.batch import BatchLoader

USERS = 30
LOCK_USERS = "LOCK TABLE users IN ACCESS EXCLUSIVE MODE"
POOL_APP = "test-pool"  # the application_name of make_pool's connections (tests/conftest.py)
QUEUED_LOCK = "queued-lock"


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_total") or 0.0


def lookups(
    pool,
    fetched: list,
    *,
    max_keys=500,
    sleep_s=0.0,
    failing=None,
    budgets=None,
    deadlines=None,
    answer_s=5.0,
    answered=None,
    told=None,
    extra=None,
) -> BatchLoader:
    """Lookups of users' emails through a real pool; each query's keys go into `fetched`. The
    first query sleeps `sleep_s` in the server; the others, once they hold a connection, raise
    `failing[0]` if there is one. A greenlet in `budgets` may wait that long for its query to
    get a connection, any other 5 s (its deadline goes into `deadlines`, if given); once it
    does, it waits `answer_s` for the answer.
    `answered(n)`, if given, runs in the sender once the n-th query has its rows; `told` gets
    how many lookups each query answered, as the metrics are told. `extra` adds to every
    query's rows."""

    def fetch(waited_s, connected):
        with pool.connection(autocommit=True) as cur:
            keys = connected()
            fetched.append(list(keys))
            if failing and len(fetched) > 1:
                raise failing[0]
            cur.execute(
                "SELECT id, email FROM users, pg_sleep(%s) WHERE id = ANY(%s)",
                (sleep_s if len(fetched) == 1 else 0, list(keys)),
            )
            rows = {row["id"]: row["email"] for row in cur.fetchall()} | (extra or {})
        if answered is not None:
            answered(len(fetched))
        return rows

    def turn_timeout():
        budget = (budgets or {}).get(gevent.getcurrent(), 5.0)
        if deadlines is not None:
            deadlines[gevent.getcurrent()] = time.perf_counter() + budget
        return budget

    return BatchLoader(
        fetch,
        turn_timeout=turn_timeout,
        answer_timeout=lambda: answer_s,
        timed_out=lambda: TimeoutError("no turn"),
        waited=lambda s: None,
        answered=told.append if told is not None else lambda n: None,
        max_keys=max_keys,
    )


def first_query(shared: BatchLoader, fetched: list, key) -> gevent.Greenlet:
    """A lookup of `key` whose query is running: the lookups' one turn is taken."""
    first = gevent.spawn(shared.get, key)
    wait_until(lambda: fetched, 5, "the first query")
    return first


def follower_in(shared: BatchLoader, key) -> gevent.Greenlet:
    """A lookup of `key` that joined the batch waiting for the turn."""
    before = shared.waiting
    follower = gevent.spawn(shared.get, key)
    wait_until(lambda: shared.waiting == before + 1, 5, "the follower to join")
    return follower


def batch_behind(shared: BatchLoader, key) -> gevent.Greenlet:
    """A lookup of `key` waiting for the turn, while later lookups join its batch."""
    sender = gevent.spawn(shared.get, key)
    wait_until(lambda: shared.waiting == 1, 5, "the sender to collect")
    return sender


@contextmanager
def lock_queued(database_url: str, admin) -> Iterator[None]:
    """A lock on `users` asked for now, behind the statements that wait on the lock held: once
    that is released, they run, and this lock stops every statement sent after them
    (PostgreSQL grants a lock in the order it was asked for), until the block ends."""
    release = Event()

    def hold():
        with users_locked(database_url, QUEUED_LOCK):
            release.wait(30)

    holder = gevent.spawn(hold)
    try:
        wait_until(lambda: waiting_on_lock(admin, QUEUED_LOCK) == 1, 5, "the lock to queue")
        yield
    finally:
        release.set()
        holder.get(timeout=10)


@contextmanager
def batch_sent_and_held(
    shared: BatchLoader, fetched: list, keys: list, database_url: str, admin
) -> Iterator[tuple[gevent.Greenlet, gevent.Greenlet, list[gevent.Greenlet]]]:
    """Lookups of `keys`: the first's query runs alone, the others collect in a batch behind
    it; then that batch's query is sent, and held in the server, on a lock, for the block.
    Yields the first lookup, the batch's sender and its followers."""
    with locked(database_url, LOCK_USERS) as release:
        first = first_query(shared, fetched, keys[0])
        sender = batch_behind(shared, keys[1])
        followers = [follower_in(shared, key) for key in keys[2:]]
        wait_until(lambda: waiting_on_lock(admin, POOL_APP) == 1, 5, "the first on the lock")
        with lock_queued(database_url, admin):
            release()
            wait_until(
                lambda: len(fetched) == 2 and waiting_on_lock(admin, POOL_APP) == 1,
                5,
                "the batch's query on the lock",
            )
            yield first, sender, followers


def test_lookups_arriving_while_a_query_runs_share_the_next_one(make_app, admin, database_url):
    ids = seed_users(admin, USERS)
    app = make_app(DB_POOL_MAX=5)
    client = app.test_client()
    lookups_before, queries_before = counted("db_lookups"), counted("db_lookup_queries")

    with users_locked(database_url):
        first = gevent.spawn(client.get, f"/users/{ids[0]}")
        wait_until(
            lambda: app.extensions[db.EXTENSION].stats()["in_use"] == 1, 5, "the first query"
        )
        rest = [gevent.spawn(client.get, f"/users/{uid}") for uid in ids[1:]]
        wait_until(lambda: app.extensions[users.LOADER].waiting == USERS - 1, 5, "them all")
    gevent.joinall([first, *rest], timeout=10, raise_error=True)

    answers = [g.value for g in (first, *rest)]
    assert [r.status_code for r in answers] == [200] * USERS
    seeded = [(uid, f"user{n}@example.com") for n, uid in enumerate(ids, 1)]
    assert [(r.json["id"], r.json["email"]) for r in answers] == seeded
    # The first went alone at once; the other 29 waited for it, together, and went as one.
    assert counted("db_lookups") - lookups_before == USERS
    assert counted("db_lookup_queries") - queries_before == 2
    assert app.extensions[users.LOADER].waiting == 0


def test_a_lookup_alone_goes_at_once_and_a_missing_user_is_404(client, admin):
    [uid] = seed_users(admin, 1)
    queries_before = counted("db_lookup_queries")
    assert client.get(f"/users/{uid}").json["email"] == "user1@example.com"
    assert client.get(f"/users/{uid + 1}").status_code == 404
    assert counted("db_lookup_queries") - queries_before == 2


def test_a_lookup_never_joins_a_query_already_sent(make_pool, admin):
    """A lookup asked after a write committed sees it, though a query sent before the write
    (which cannot see it) is still running: the lookup goes in a query of its own, later."""
    [uid] = seed_users(admin, 1)
    fetched = []
    shared = lookups(make_pool(), fetched, sleep_s=0.5)
    before = first_query(shared, fetched, uid)
    gevent.sleep(0.1)  # the first query's snapshot is taken: it sleeps in the server
    admin.execute("UPDATE users SET email = 'new@example.com' WHERE id = %s", (uid,))
    after = shared.get(uid)

    assert before.get(timeout=5) == "user1@example.com"
    assert after == "new@example.com"
    assert fetched == [[uid], [uid]]


def test_a_lookup_never_joins_a_collected_batch_once_its_query_is_sent(
    make_pool, admin, database_url
):
    """The batch behind a running query was collected, and its query sent: a lookup asked
    now starts the next batch. Added to the running one, it would get that query's answer,
    which cannot hold its row."""
    ids = seed_users(admin, 4)
    fetched = []
    shared = lookups(make_pool(), fetched)
    with batch_sent_and_held(shared, fetched, ids[:3], database_url, admin) as held:
        first, sender, [follower] = held
        before = shared.waiting
        late = gevent.spawn(shared.get, ids[3])
        wait_until(lambda: shared.waiting == before + 1, 5, "the late lookup to wait")

    assert late.get(timeout=5) == "user4@example.com"
    answers = [g.get(timeout=5) for g in (first, sender, follower)]
    assert answers == ["user1@example.com", "user2@example.com", "user3@example.com"]
    assert fetched == [ids[:1], ids[1:3], ids[3:]]
    assert shared.waiting == 0


def test_a_batch_whose_query_is_sent_counts_no_longer_as_waiting(make_pool, admin, database_url):
    """Its lookups wait for an answer now, not for a connection: DB_POOL_MAX_WAITING counts
    them no longer. Only lookups whose query is not sent yet count."""
    ids = seed_users(admin, 5)
    fetched = []
    shared = lookups(make_pool(), fetched)
    with batch_sent_and_held(shared, fetched, ids[:4], database_url, admin) as held:
        first, sender, followers = held
        assert shared.waiting == 0
        late = gevent.spawn(shared.get, ids[4])
        wait_until(lambda: shared.waiting == 1, 5, "the late lookup to count")

    gevent.joinall([first, sender, *followers, late], timeout=10, raise_error=True)
    assert fetched == [ids[:1], ids[1:4], ids[4:]]
    assert shared.waiting == 0


def test_lookups_whose_query_is_sent_leave_room_under_the_waiting_cap(
    make_app, admin, database_url
):
    """DB_POOL_MAX_WAITING 3: three lookups collected behind a running query fill it; once
    their query is sent, two more requests may wait, and none is turned away with a 503."""
    ids = seed_users(admin, 6)
    app = make_app(DB_POOL_MAX=5, DB_POOL_MAX_WAITING=3)
    client = app.test_client()
    loader = app.extensions[users.LOADER]

    def get(uid):
        return gevent.spawn(client.get, f"/users/{uid}")

    with locked(database_url, LOCK_USERS) as release:
        first = get(ids[0])
        wait_until(lambda: waiting_on_lock(admin, APP_NAME) == 1, 5, "the first on the lock")
        batch = []
        for uid in ids[1:4]:
            batch.append(get(uid))
            wait_until(lambda: loader.waiting == len(batch), 5, "the batch to collect")
        with lock_queued(database_url, admin):
            release()
            wait_until(
                lambda: first.ready() and waiting_on_lock(admin, APP_NAME) == 1,
                5,
                "the batch's query on the lock",
            )
            late = [get(uid) for uid in ids[4:]]
            wait_until(
                lambda: loader.waiting == len(late) or any(g.ready() for g in late),
                5,
                "the late lookups to wait, or be turned away",
            )

    answers = [g.get(timeout=10) for g in (first, *batch, *late)]
    assert [(a.status_code, a.json.get("email")) for a in answers] == [
        (200, f"user{n}@example.com") for n in range(1, 7)
    ]
    assert loader.waiting == 0


def test_lookups_whose_time_runs_out_as_their_answer_comes_all_get_it(make_pool, admin):
    """The shared query holds a connection and its answer comes in the loop turn in which every
    follower's own deadline passes, the sender woken first. gevent (26.9) loses a greenlet that
    waits on an Event already set but whose waiters are not yet woken, when the last of those
    then leaves by its timeout: here all but one of the followers waited for ever."""
    ids = seed_users(admin, 6)
    fetched, budgets, deadlines, rows_at, woken = [], {}, {}, [], []
    stall = get_original("time", "sleep")  # blocks the whole worker, as a busy worker does

    def stall_past_the_deadlines(n):
        if n == 2:  # the shared query has its rows: the worker stalls past every deadline
            rows_at.append(time.perf_counter())
            last = max(deadlines[g] for g in followers)
            gevent.spawn(stall, last + 0.2 - rows_at[0])
            gevent.sleep(0.001)  # and this sender's timer is the first due once it ends
            woken.append(time.perf_counter())

    shared = lookups(
        make_pool(),
        fetched,
        sleep_s=0.2,
        budgets=budgets,
        deadlines=deadlines,
        answered=stall_past_the_deadlines,
    )
    first = first_query(shared, fetched, ids[0])
    sender = batch_behind(shared, ids[1])
    followers = [gevent.Greenlet(shared.get, uid) for uid in ids[2:]]
    for follower in followers:
        budgets[follower] = 2.0
        follower.start()
    wait_until(lambda: shared.waiting == len(ids) - 1, 5, "the followers to join")
    gevent.joinall([first, sender, *followers], timeout=8)

    # The case meant: the sender's timer was due before any follower's deadline, and it woke
    # after the last of them had passed.
    assert rows_at[0] + 0.001 < min(deadlines[g] for g in followers)
    assert woken[0] > max(deadlines[g] for g in followers)
    emails = [f"user{i}@example.com" for i in range(1, 7)]
    assert [g.value for g in (first, sender, *followers)] == emails
    assert fetched == [ids[:1], ids[1:]]
    assert shared.waiting == 0


def test_lookups_wait_for_a_sent_query_no_longer_than_the_answer_timeout(make_pool, admin):
    """The sender holds its connection and its answer is late: each follower waits
    `answer_timeout()` from then (its own time for a connection ended earlier) and gets
    DatabaseUnavailable; the sender its row later. A sender lost for good costs its
    followers a 503, never a wait without end."""
    ids = seed_users(admin, 4)
    fetched, budgets, sent = [], {}, []

    def late(n):
        if n == 2:
            sent.append(time.monotonic())
            gevent.sleep(4.0)

    shared = lookups(
        make_pool(), fetched, sleep_s=0.2, budgets=budgets, answer_s=1.5, answered=late
    )
    first = first_query(shared, fetched, ids[0])
    sender = batch_behind(shared, ids[1])
    followers = [gevent.Greenlet(shared.get, uid) for uid in ids[2:]]
    for follower in followers:
        budgets[follower] = 1.0
        follower.start()
    gevent.joinall(followers, timeout=8)
    left = time.monotonic()

    assert [str(g.exception) for g in followers] == [
        "the query for this lookup got no answer in time"
    ] * 2
    assert all(isinstance(g.exception, DatabaseUnavailable) for g in followers)
    assert 1.4 <= left - sent[0] < 2.1  # 1.5 s from the send, not their own time + 1.5 s
    assert not sender.ready()
    assert sender.get(timeout=8) == "user2@example.com"
    assert first.get(timeout=5) == "user1@example.com"
    assert shared.waiting == 0


def test_a_batch_is_sent_once_it_holds_max_keys(make_pool, admin):
    ids = seed_users(admin, 8)
    fetched = []
    shared = lookups(make_pool(), fetched, max_keys=3, sleep_s=0.3)
    first = first_query(shared, fetched, ids[0])
    rest = [gevent.spawn(shared.get, uid) for uid in ids[1:]]
    gevent.joinall([first, *rest], timeout=10, raise_error=True)

    assert [g.value for g in (first, *rest)] == [f"user{i}@example.com" for i in range(1, 9)]
    assert fetched == [ids[:1], ids[1:4], ids[4:7], ids[7:]]


def test_a_lookup_leaves_a_batch_when_its_own_wait_runs_out(make_pool, admin):
    """A later lookup may have less time left than the one that will send the query (it
    was given a shorter deadline): it gives up at its own deadline."""
    ids = seed_users(admin, 3)
    fetched, budgets, told = [], {}, []
    shared = lookups(make_pool(), fetched, sleep_s=1.0, budgets=budgets, told=told)
    first = first_query(shared, fetched, ids[0])
    sender = batch_behind(shared, ids[1])
    late = gevent.spawn(shared.get, ids[2])
    budgets[late] = 0.2
    late.join(timeout=5)

    assert isinstance(late.exception, TimeoutError)
    assert not first.ready()  # it left while the query before its own still ran
    assert shared.waiting == 1
    gevent.joinall([first, sender], timeout=10, raise_error=True)
    assert (first.value, sender.value) == ("user1@example.com", "user2@example.com")
    # The second query was not sent for the lookup that left: a write it asked is not made.
    assert fetched == [ids[:1], ids[1:2]]
    assert told == [1, 1]
    assert shared.waiting == 0


def test_a_failed_query_fails_every_lookup_it_was_sent_for(make_pool, admin):
    ids = seed_users(admin, 4)
    fetched, failing = [], [DatabaseUnavailable("the server went away")]
    shared = lookups(make_pool(), fetched, sleep_s=0.3, failing=failing)
    first = first_query(shared, fetched, ids[0])
    rest = [gevent.spawn(shared.get, uid) for uid in ids[1:]]
    gevent.joinall([first, *rest], timeout=10)

    assert first.value == "user1@example.com"
    errors = [g.exception for g in rest]
    assert [(type(e), e.args) for e in errors] == [(DatabaseUnavailable, failing[0].args)] * 3
    # Each its own copy, tied to the query's: tracebacks do not pile up on one exception.
    assert all(e.__cause__ is failing[0] for e in errors[1:])
    assert fetched == [ids[:1], ids[1:]]
    assert shared.waiting == 0
    failing.clear()
    assert shared.get(ids[1]) == "user2@example.com"  # and the next lookup goes as usual


def test_a_killed_sender_leaves_no_lookup_waiting(make_pool, admin):
    """The lookup that was to send the query is killed before its turn: the others go on."""
    ids = seed_users(admin, 3)
    fetched = []
    shared = lookups(make_pool(), fetched, sleep_s=0.5)
    first = first_query(shared, fetched, ids[0])
    sender = batch_behind(shared, ids[1])
    follower = follower_in(shared, ids[2])
    sender.kill(timeout=5)
    wait_until(lambda: shared.waiting == 1, 5, "the follower, in a batch of its own now")

    assert follower.get(timeout=5) == "user3@example.com"
    assert first.get(timeout=5) == "user1@example.com"
    assert fetched == [ids[:1], ids[2:]]
    assert shared.waiting == 0


def test_a_killed_follower_is_not_in_the_query_its_batch_sends(make_pool, admin):
    ids = seed_users(admin, 4)
    fetched = []
    shared = lookups(make_pool(), fetched, sleep_s=0.5)
    first = first_query(shared, fetched, ids[0])
    sender = batch_behind(shared, ids[1])
    killed = follower_in(shared, ids[2])
    follower = follower_in(shared, ids[3])
    killed.kill(timeout=5)

    assert follower.get(timeout=5) == "user4@example.com"
    assert (first.get(timeout=5), sender.get(timeout=5)) == (
        "user1@example.com",
        "user2@example.com",
    )
    assert fetched == [ids[:1], [ids[1], ids[3]]]
    assert shared.waiting == 0


def test_a_key_answered_with_an_exception_raises_it_in_its_lookup_alone(make_pool, admin):
    """How a batch of writes sends one write back to run on its own (service/api/users.py)."""
    ids = seed_users(admin, 3)
    fetched = []
    alone = {ids[2]: LookupError(f"{ids[2]} alone")}
    shared = lookups(make_pool(), fetched, sleep_s=0.3, extra=alone)
    first = first_query(shared, fetched, ids[0])
    rest = [gevent.spawn(shared.get, uid) for uid in ids[1:]]
    gevent.joinall([first, *rest], timeout=10)

    assert [first.value, rest[0].value] == ["user1@example.com", "user2@example.com"]
    assert isinstance(rest[1].exception, LookupError)
    assert rest[1].exception.args == (f"{ids[2]} alone",)
    assert shared.waiting == 0


def test_an_exception_a_lookup_raises_is_freed_once_its_caller_lets_go_of_it():
    """No reference cycle keeps a raised answer, its batch and the batch's rows until the
    cyclic garbage collector runs, whether the lookup sent its query or joined a batch; and a
    lookup that raises is told what its query saw, as every lookup in it is."""
    started, release, raised, told = [], Event(), [], []

    class Alone(Exception):
        pass

    def fetch(waited_s, connected):
        keys = connected()
        started.append(keys)
        release.wait(5)
        connected.saw(len(started), "primary")
        answers = {key: Alone(key) for key in keys}
        raised.extend(weakref.ref(answer) for answer in answers.values())
        return answers

    shared = BatchLoader(
        fetch,
        turn_timeout=lambda: 5.0,
        answer_timeout=lambda: 5.0,
        timed_out=lambda: TimeoutError("no turn"),
        waited=lambda s: None,
        saw=lambda position, server: told.append((position, server)),
    )

    def ask(key):
        try:
            shared.get(key)
        except Alone as exc:
            return exc.args
        return None

    gc.disable()
    try:
        first = gevent.spawn(ask, 1)  # finds the permit free: its query runs at once
        wait_until(lambda: started, 5, "the first query")
        sender = gevent.spawn(ask, 2)
        wait_until(lambda: shared.waiting == 1, 5, "the sender to collect")
        follower = gevent.spawn(ask, 3)
        wait_until(lambda: shared.waiting == 2, 5, "the follower to join")
        release.set()
        gevent.joinall([first, sender, follower], timeout=10)

        assert [g.value for g in (first, sender, follower)] == [(1,), (2,), (3,)]
        assert started == [[1], [2, 3]]
        assert [answer() for answer in raised] == [None, None, None]
        assert sorted(told) == [(1, "primary"), (2, "primary"), (2, "primary")]
    finally:
        gc.enable()


def test_when_the_sender_runs_out_of_time_the_others_go_on_with_theirs(make_pool, admin):
    ids = seed_users(admin, 3)
    fetched, budgets = [], {}
    shared = lookups(make_pool(), fetched, sleep_s=0.6, budgets=budgets)
    first = first_query(shared, fetched, ids[0])
    sender = gevent.spawn(shared.get, ids[1])
    budgets[sender] = 0.2  # a deadline shorter than the others'
    wait_until(lambda: shared.waiting == 1, 5, "the sender to collect")
    follower = gevent.spawn(shared.get, ids[2])
    sender.join(timeout=5)

    assert isinstance(sender.exception, TimeoutError)
    assert not first.ready() and not follower.ready()
    assert follower.get(timeout=5) == "user3@example.com"
    assert fetched == [ids[:1], ids[2:]]
    assert shared.waiting == 0


def test_a_lookup_leaves_at_its_deadline_while_its_query_waits_for_a_connection(make_pool, admin):
    """Its turn came, but the pool's one connection is taken: until the query holds it, the
    lookups in it wait for a connection, each no longer than its own time."""
    ids = seed_users(admin, 3)
    pool = make_pool(max_size=1)
    fetched, budgets = [], {}
    shared = lookups(pool, fetched, sleep_s=0.3, budgets=budgets)
    first = first_query(shared, fetched, ids[0])
    released = Event()

    def hold():  # queues for the connection now, and gets it when the first query is done
        with pool.connection():
            released.wait(5)

    holder = gevent.spawn(hold)
    sender = batch_behind(shared, ids[1])
    late = gevent.spawn(shared.get, ids[2])
    budgets[late] = 0.8
    started = time.monotonic()
    late.join(timeout=5)

    assert isinstance(late.exception, TimeoutError)
    assert time.monotonic() - started < 1.5
    assert first.ready() and not sender.ready()  # the turn came; the connection did not
    assert (shared.waiting, pool.waiting) == (0, 1)  # the sender, counted once, by the pool
    released.set()
    assert sender.get(timeout=5) == "user2@example.com"
    holder.join(timeout=5)
    assert shared.waiting == 0


def test_a_key_asked_twice_answers_each_asker_its_own_row(make_pool, admin):
    """A lookup that leaves takes out nothing that another lookup of the same key needs."""
    ids = seed_users(admin, 3)
    fetched, budgets = [], {}
    shared = lookups(make_pool(), fetched, sleep_s=0.5, budgets=budgets)
    first = first_query(shared, fetched, ids[0])
    sender = batch_behind(shared, ids[1])
    other = gevent.spawn(shared.get, ids[2])
    same = gevent.spawn(shared.get, ids[1])
    budgets[same] = 0.1
    gevent.joinall([first, sender, other, same], timeout=10)

    assert isinstance(same.exception, TimeoutError)
    assert (sender.value, other.value) == ("user2@example.com", "user3@example.com")
    assert shared.waiting == 0


def test_a_killed_lookup_stops_counting_at_once(make_pool, admin):
    ids = seed_users(admin, 3)
    fetched = []
    shared = lookups(make_pool(), fetched, sleep_s=0.5)
    first = first_query(shared, fetched, ids[0])
    sender = batch_behind(shared, ids[1])
    follower = follower_in(shared, ids[2])
    follower.kill(timeout=5)

    assert shared.waiting == 1
    gevent.joinall([first, sender], timeout=10, raise_error=True)
    assert shared.waiting == 0


def test_a_lookup_with_no_turn_in_time_gets_503_and_logs_its_wait(
    make_app, admin, database_url, log_lines
):
    [uid] = seed_users(admin, 1)
    app = make_app(DB_POOL_MAX=5, DB_POOL_TIMEOUT=0.4, DB_STATEMENT_TIMEOUT_MS=3000)
    client = app.test_client()
    timeouts_before = counted("db_pool_timeouts")
    with users_locked(database_url):
        held = gevent.spawn(client.get, f"/users/{uid}")
        wait_until(
            lambda: app.extensions[db.EXTENSION].stats()["in_use"] == 1, 5, "the first query"
        )
        started = time.monotonic()
        late = client.get(f"/users/{uid}", headers={"X-Request-ID": "late"})
        waited = time.monotonic() - started
    assert held.get(timeout=10).status_code == 200

    assert (late.status_code, late.json["error"]["code"]) == (503, "pool_timeout")
    assert late.headers["Retry-After"]
    assert 0.3 <= waited < 2.0
    assert counted("db_pool_timeouts") - timeouts_before == 1
    [line] = access_lines(log_lines(), "late")
    assert line["status"] == 503
    assert line["pool_wait_ms"] >= 400 * 0.9
    assert app.extensions[users.LOADER].waiting == 0
