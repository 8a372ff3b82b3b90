"""Reads on streaming replicas: which server a read-only block runs on, known without a round
trip, and the WAL positions that keep a client from reading older data than it has seen.

A position is a WAL location (an LSN) as an int. Every write block on the primary ends by
reading `pg_current_wal_insert_lsn()`, at least the end of its commit record; every read block
ends by reading the position of what it could have seen: on a replica the WAL it has received
(`pg_last_wal_receive_lsn()`, never less than what it has replayed, and so than any snapshot
it gave), on the primary its insert position. The API hands these to clients as tokens
(service/api/consistency.py); a read that presents one runs only on a server that has replayed
that far.

`ReplicaSet` keeps, per worker, one pool per replica and a monitor greenlet per server that
reads, every REPLICA_POLL_INTERVAL_S, each replica's replay position and whether it is still in
recovery, and the primary's insert position (for lag in bytes and seconds). Blocks tell it the
same in passing: a read that selects its position (service.db.with_position) selects those two
of its replica too, and every block on the primary reads the primary's position; a monitor
that heard as much since its last poll skips the next (it still polls once a second), so under
load the monitors cost next to no round trips. A replica is in rotation while its last poll
answered within `PROBE_DEADLINE_S`, it is in recovery, and it lags
at most REPLICA_MAX_LAG_S; a replica that fails a request's connection is taken out at once,
until its monitor sees it answer again. So a replica that refuses connections, stops
answering, lags or is promoted leaves the rotation within two poll intervals (a read that
answered just before may spare its monitor one poll) and the probe deadline. One that comes
back rejoins over `RAMP_S`: it takes a growing share of the reads meant for it, the rest
going to the primary, so that every worker does not open its connections to it at once.

What the monitors know can be old: a replica's server that restarts between two polls may come
back having replayed less than it had (a crash before its pages were written, an older copy
started at the same address), and behind a PgBouncer the pool's connections outlive the
server's. So a read that must see a position runs on a replica only behind a guard: its first
statement goes in one round trip after `SELECT` of a division by zero unless the server has
replayed that position (`_guarded`). The guard's snapshot-free check comes before the read's
snapshot; a replica that fails it leaves the rotation, as one whose connection fails, and the
read runs on the primary.

Choosing a server is a lookup in memory. A read whose position no replica in rotation has
replayed wakes the monitors at once and waits up to REPLICA_CATCH_UP_S for one to catch up,
then runs on the primary; when every replica in rotation lags by more than that wait (a lag
spike), it runs on the primary at once. A position ahead of the primary's own (as last read, plus
`AHEAD_SLACK_BYTES`) cannot come from a write this service acknowledged: it is read on the
primary at once, counted. So the primary's share of reads is bounded by the reads whose
position no replica had replayed within the catch-up wait, those that find no replica in
rotation, and a rejoining replica's ramp.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from typing import Protocol

import gevent
import psycopg2
import psycopg2.extensions
from gevent.event import Event
from psycopg2 import sql

from service.db.errors import DatabaseUnavailable, TransactionConflict, translate
from service.db.lsn import format_lsn, parse_lsn
from service.db.pool import Cursor, Pool, connect, deadline

log = logging.getLogger(__name__)

# A monitor's poll that gets no answer within this is a replica down (a paused server, a
# silent network): with the poll interval, the time a dead replica stays in rotation.
PROBE_DEADLINE_S = 0.5
# A monitor that keeps hearing from blocks still polls this often: its own connection stays in
# use (no idle timeout closes it), and the primary's history gets the positions heard.
POLL_AT_LEAST_EVERY_S = 1.0
# A replica that comes back takes this long to take its whole share of the reads.
RAMP_S = 2.0
RAMP_FLOOR = 0.05
# The position of a read that must run on the primary (a token the service cannot read).
ON_PRIMARY = 1 << 64
# A position this far ahead of the primary's insert position as last read is no client's:
# the primary writes far less than this between two polls.
AHEAD_SLACK_BYTES = 64 << 20
# How long the primary's positions are kept, to tell a replica's lag in seconds.
HISTORY_S = 120.0
# How often each worker resolves the replicas' host names again (a headless service's members
# come and go).
RESOLVE_EVERY_S = 10.0

PRIMARY = "primary"
# What a block wrote or could have seen, on either kind of server: on a replica the WAL it has
# received (never less than it replayed, and so than any snapshot it gave), on the primary its
# insert position (the end of every commit record, visible or not yet).
POSITION_SQL = (
    "CASE WHEN pg_is_in_recovery()"
    " THEN GREATEST(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())"
    " ELSE pg_current_wal_insert_lsn() END"
)
_REPLICA_POLL = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text"
# What a read selects as one column more (service.db.with_position): the position it could have
# seen, then what a replica monitor's poll reads, whether its server is in recovery and how far
# it has replayed (`ReplicaSet.heard`).
READ_POSITION_SQL = (
    f"concat_ws(' ', ({POSITION_SQL})::text, pg_is_in_recovery()::text,"
    " pg_last_wal_replay_lsn()::text)"
)
_PRIMARY_POLL = "SELECT pg_current_wal_insert_lsn()::text"

# Why a read went to the primary (a metrics label).
NO_REPLICA = "no_replica"  # none in rotation
BEHIND = "behind"  # none had replayed the read's position within the catch-up wait
AHEAD = "ahead"  # a position ahead of the primary's own
UNREADABLE = "unreadable"  # a token the service cannot read
RAMP = "ramp"  # the replica meant for it is rejoining
RETRY = "retry"  # its replica failed before it answered anything
# The SQLSTATE of the guard's refusal: division_by_zero (`_guarded`).
_BEHIND_SQLSTATE = "22012"


def resolve_url(url: str) -> list[tuple[str, str]]:
    """The replicas a URL names, as (label, DSN): one per address its host name resolves to
    (a Kubernetes headless service names every ready replica), each DSN connecting to that
    address (libpq's `hostaddr`) and keeping the name as `host` (for TLS and the password
    file). A URL whose host is an address, a socket folder or a list of hosts (libpq's
    failover syntax) is one replica. Raises OSError when the name does not resolve."""
    params = psycopg2.extensions.parse_dsn(url)
    host, port = params.get("host", ""), params.get("port", "5432")
    if not host or "," in host or host.startswith("/") or "hostaddr" in params or _is_ip(host):
        return [(f"{host or 'localhost'}:{port}", url)]
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    addresses = sorted({info[4][0] for info in infos})
    return [
        (f"{host}/{address}:{port}", psycopg2.extensions.make_dsn(url, hostaddr=address))
        for address in addresses
    ]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host(url: str) -> str:
    params = psycopg2.extensions.parse_dsn(url)
    return f"{params.get('host', 'localhost')}:{params.get('port', '5432')}"


class ReplicaEvents(Protocol):
    """What the replica set reports, for metrics; quick, never raising."""

    def read_on(self, server: str) -> None:
        """A read block ran on `server` (a replica's label, or "primary")."""

    def fell_back(self, reason: str) -> None:
        """A read went to the primary, for `reason`."""

    def caught_up(self, waited_s: float, ok: bool) -> None:
        """A read waited `waited_s` for a replica to catch up; `ok` when one did."""

    def replica_state(self, label: str, up: bool, lag_bytes: int, lag_s: float) -> None:
        """A replica's state after a poll."""

    def retried(self, label: str) -> None:
        """A read's first statement failed on replica `label` and ran once more elsewhere."""


@dataclass
class Replica:
    """One streaming replica as this worker sees it: its pool and what its monitor last read."""

    label: str
    dsn: str
    pool: Pool
    replay: int = 0
    up: bool = False
    state: str = "joining"  # up, down, lagging, promoted, joining
    lag_bytes: int = 0
    lag_s: float = 0.0
    up_since: float = 0.0  # time.monotonic() it last came into rotation
    heard_at: float = 0.0  # time.monotonic() a read last told its replay position (`heard`)
    ever_up: bool = False
    removed: bool = False  # its address no longer resolves, or the set is closed
    monitor: gevent.Greenlet | None = None

    def weight(self, now: float) -> float:
        """Its share of the reads meant for it: 1, or less while it rejoins."""
        if now - self.up_since >= RAMP_S:
            return 1.0
        return max(RAMP_FLOOR, (now - self.up_since) / RAMP_S)

    def report(self) -> dict:
        return {
            "state": self.state,
            "lag_bytes": self.lag_bytes,
            "lag_seconds": round(self.lag_s, 3),
        }


class ReplicaSet:
    """The replicas of one worker, and the primary's position, kept fresh in the background.

    `route(at_least)` names the server for a read that must see `at_least` (see the module
    docstring); `failed(label)` takes a replica out until its next good poll. `start()` spawns
    the monitors and warms the replicas' pools, `close()` stops them and closes the pools.
    """

    def __init__(
        self,
        primary: Pool,
        urls: list[str],
        *,
        make_pool: Callable[[str], Pool],
        poll_interval_s: float,
        max_lag_s: float,
        catch_up_s: float,
        connect_timeout: float,
        events: ReplicaEvents | None = None,
        resolve: Callable[[str], list[tuple[str, str]]] | None = None,
    ) -> None:
        self.primary = primary
        self.replicas: list[Replica] = []  # replaced whole, never changed in place
        self._urls = urls
        self._members: dict[str, list[str]] = {url: [] for url in urls}  # the labels of each
        self._make_pool = make_pool
        self._resolve = resolve or resolve_url
        self._primary_dsn = primary.dsn
        self._poll_interval_s = poll_interval_s
        self._max_lag_s = max_lag_s
        self._catch_up_s = catch_up_s
        self._connect_timeout = min(connect_timeout, PROBE_DEADLINE_S)
        self._events = events
        self.primary_position = 0
        self._primary_heard_at = 0.0  # when a block on the primary last told its position
        self._history: deque[tuple[float, int]] = deque()
        self._advanced = Event()  # set, and replaced, after every poll
        self._wake = Event()  # set to make the monitors poll now
        self._greenlets: list[gevent.Greenlet] = []
        self.closed = False

    def start(self) -> None:
        """Resolve the URLs, start a monitor for the primary and for each replica, warm the
        replicas' pools (in the background), and re-resolve every `RESOLVE_EVERY_S`."""
        self.refresh()
        self._greenlets += [gevent.spawn(self._monitor_primary), gevent.spawn(self._resolver)]

    def close(self) -> None:
        self.closed = True
        gevent.killall(self._greenlets, block=False)
        for replica in self.replicas:
            replica.removed = True
            if replica.monitor is not None:
                replica.monitor.kill(block=False)
            replica.pool.close()

    def refresh(self) -> None:
        """Resolve every URL again: an address that appeared becomes a replica, one that went
        away stops being one (its pool closed, its lent connections closed as they come back).
        A URL that does not resolve now keeps the replicas it had."""
        wanted: dict[str, str] = {}
        for url in self._urls:
            try:
                found = self._resolve(url)
            except OSError as exc:
                log.warning("replica %s does not resolve now: %s", _host(url), exc)
                current = {r.label: r.dsn for r in self.replicas}
                found = [(label, current[label]) for label in self._members[url]]
            self._members[url] = [label for label, _ in found]
            wanted.update(found)
        have = {r.label: r for r in self.replicas}
        kept = [r for r in self.replicas if r.label in wanted]
        added = [
            Replica(label, dsn, self._make_pool(dsn))
            for label, dsn in wanted.items()
            if label not in have
        ]
        for replica in added:
            replica.monitor = gevent.spawn(self._monitor, replica)
            gevent.spawn(replica.pool.warm)
            log.info("replica %s: added", replica.label)
        for replica in self.replicas:
            if replica.label not in wanted:
                replica.removed = True
                replica.up = False
                if replica.monitor is not None:
                    replica.monitor.kill(block=False)
                replica.pool.close()
                log.info("replica %s: removed, its address no longer resolves", replica.label)
        self.replicas = kept + added

    def _resolver(self) -> None:
        while not self.closed:
            gevent.sleep(RESOLVE_EVERY_S)
            self.refresh()

    def read_s(self, timeout: float) -> float:
        """How long a read-only block (`ReadCursor`) whose waits for a connection are bounded by
        `timeout` may take, at most, from its first connection to its end, each server taking
        its deadlines in full: the first statement; then, run once more elsewhere, the
        catch-up wait, a connection (a replica's, and the primary's when that one cannot be
        had) and the statement; then, its replica lost before its position was read, the
        primary's position (a connection and a statement); or, its guard refused on the
        replica it ran on again, the primary (a connection and the statement). Taking a
        connection is the wait for one and then its opening (`connect_timeout`) and the read of
        its statement timeout (as long), or the check that an idle one is alive."""
        lend_s = timeout + 2 * self.primary.connect_timeout
        return 3 * self.primary.statement_deadline_s + self._catch_up_s + 3 * lend_s

    def replica(self, label: str) -> Replica | None:
        return next((r for r in self.replicas if r.label == label), None)

    def route(self, at_least: int, exclude: str | None = None) -> tuple[Pool, str, str | None]:
        """The pool for a read that must see `at_least`, its server's label, and why it is the
        primary's (None for a replica). Waits up to the catch-up wait for a replica to replay
        `at_least`; never does I/O itself."""
        if at_least >= ON_PRIMARY:
            return self.fell_back(UNREADABLE)
        if at_least > self.primary_position + AHEAD_SLACK_BYTES and self.primary_position:
            return self.fell_back(AHEAD)
        found = self._choose(at_least, exclude)
        if found is None:
            rotation = [r for r in self.replicas if r.up and r.label != exclude]
            if not rotation:
                return self.fell_back(NO_REPLICA)
            # One that lags by more than the wait (a lag spike) will not replay a fresh write
            # within it: the read goes to the primary at once.
            if all(r.lag_s > self._catch_up_s for r in rotation):
                return self.fell_back(BEHIND)
            found = self._catch_up(at_least, exclude)
            if found is None:
                return self.fell_back(BEHIND)
        if random.random() > found.weight(time.monotonic()):
            return self.fell_back(RAMP)
        return found.pool, found.label, None

    def _catch_up(self, at_least: int, exclude: str | None) -> Replica | None:
        """Wake the monitors, and wait up to the catch-up wait for a replica to replay
        `at_least`; the one that did, or None."""
        waited = time.monotonic()
        until = waited + self._catch_up_s
        self._wake.set()
        found = None
        while found is None and (left := until - time.monotonic()) > 0:
            self._advanced.wait(left)
            found = self._choose(at_least, exclude)
        if self._events is not None:
            self._events.caught_up(time.monotonic() - waited, found is not None)
        return found

    def _choose(self, at_least: int, exclude: str | None) -> Replica | None:
        eligible = [
            r for r in self.replicas if r.up and r.replay >= at_least and r.label != exclude
        ]
        return random.choice(eligible) if eligible else None

    def fell_back(self, reason: str) -> tuple[Pool, str, str]:
        """The primary, for a read that goes there for `reason` (counted)."""
        if self._events is not None:
            self._events.fell_back(reason)
        return self.primary, PRIMARY, reason

    def retried(self, label: str) -> None:
        """A read's first statement failed on replica `label` and runs once more elsewhere."""
        if self._events is not None:
            self._events.retried(label)

    def failed(self, label: str, error: BaseException) -> None:
        """A request found `label` broken (`error`): out of rotation until its monitor's next
        good poll."""
        replica = self.replica(label)
        if replica is not None and replica.up:
            replica.heard_at = 0.0
            replica.up = False
            replica.state = "down"
            log.info("replica %s: down, a request found it broken: %s", label, error)
            self._wake.set()

    # What blocks tell: each read on a replica selects what its monitor polls for, and each
    # block on the primary reads the primary's position; while they keep coming, the monitors
    # skip their polls.

    def heard(self, label: str, in_recovery: bool, replay: int) -> None:
        """A read on replica `label` found it `in_recovery` and replayed up to `replay`, as its
        monitor's poll would have. Only a replica in rotation hears it: a read that started
        before the replica failed or was promoted never brings it back. One no longer in
        recovery leaves the rotation at once."""
        replica = self.replica(label)
        if replica is None or not replica.up:
            return
        if not in_recovery:
            self._update(replica, False, None)
            return
        replica.replay = max(replica.replay, replay)
        replica.heard_at = time.monotonic()

    def heard_primary(self, position: int | None) -> None:
        """A block on the primary read its insert position, `position` (None: it read none)."""
        if position is None:
            return
        self._primary_heard_at = time.monotonic()
        self._note_primary(position, self._primary_heard_at)

    def _note_primary(self, position: int, now: float) -> None:
        """The primary was at `position` by `now`. Blocks and polls answer out of order: the
        latest position counts. The history, for lag in seconds, takes an entry per half poll
        interval at most, as a poll did; a position heard in between is entered by the
        primary's monitor at its next tick (`_enter_primary`)."""
        if position > self.primary_position:
            self.primary_position = position
        self._enter_primary(now)

    def _enter_primary(self, now: float) -> None:
        last = self._history[-1] if self._history else None
        position = self.primary_position
        if last is None or (position > last[1] and now - last[0] >= self._poll_interval_s / 2):
            self._history.append((now, position))
        while self._history and self._history[0][0] < now - HISTORY_S:
            self._history.popleft()

    def _skips(self, woken: bool, heard_at: float, polled_at: float) -> bool:
        """Whether a monitor may skip this poll: not woken by a read that waits, told as much
        within a poll interval, and polled itself within POLL_AT_LEAST_EVERY_S."""
        now = time.monotonic()
        return (
            not woken
            and now - heard_at < self._poll_interval_s
            and now - polled_at < POLL_AT_LEAST_EVERY_S
        )

    # The monitors: one greenlet per server, each with a connection of its own. Each polls
    # every poll interval, unless blocks told it as much since the last (`heard`), and at once
    # when a read waits for a replica to catch up.

    def _monitor(self, replica: Replica) -> None:
        with _Poller(replica.dsn, self._connect_timeout) as poller:
            woken, polled_at = True, 0.0
            while not self.closed and not replica.removed:
                if replica.up and self._skips(woken, replica.heard_at, polled_at):
                    self._update(replica, True, replica.replay)
                else:
                    polled_at = time.monotonic()
                    row = poller.poll(_REPLICA_POLL)
                    if row is None:
                        self._update(replica, None, None)
                    else:
                        in_recovery, replay = row
                        self._update(replica, in_recovery, parse_lsn(replay) if replay else 0)
                woken = self._tick()

    def _monitor_primary(self) -> None:
        with _Poller(self._primary_dsn, self._connect_timeout) as poller:
            woken, polled_at = True, 0.0
            while not self.closed:
                if self._skips(woken, self._primary_heard_at, polled_at):
                    self._enter_primary(time.monotonic())
                else:
                    polled_at = time.monotonic()
                    row = poller.poll(_PRIMARY_POLL)
                    if row is not None:
                        self._note_primary(parse_lsn(row[0]), time.monotonic())
                woken = self._tick()

    def _tick(self) -> bool:
        """Tell waiting reads that positions moved, then sleep until the next poll or a wake;
        whether it was a wake."""
        advanced, self._advanced = self._advanced, Event()
        advanced.set()
        self._wake.clear()
        return self._wake.wait(self._poll_interval_s * random.uniform(0.9, 1.1))

    def _update(self, replica: Replica, in_recovery: bool | None, replay: int | None) -> None:
        now = time.monotonic()
        if in_recovery is None:
            state = "down"
        elif not in_recovery:
            state = "promoted"
        else:
            replica.replay = max(replica.replay, replay or 0) if replica.up else replay or 0
            replica.lag_bytes = max(0, self.primary_position - replica.replay)
            replica.lag_s = self._lag_s(replica.replay, now)
            state = "lagging" if replica.lag_s > self._max_lag_s else "up"
        up = state == "up"
        if up and not replica.up:
            # The first time in is not a return: every worker starts at once anyway.
            replica.up_since = now if replica.ever_up else now - RAMP_S
            replica.ever_up = True
        if state != replica.state:
            log.info("replica %s: %s", replica.label, state)
        replica.up, replica.state = up, state
        if self._events is not None:
            self._events.replica_state(replica.label, up, replica.lag_bytes, replica.lag_s)

    def _lag_s(self, replay: int, now: float) -> float:
        """Since when the primary has been past `replay`: 0 when it is not. From the newest
        entry back, so a replica that keeps up costs one step, not the whole history."""
        since = now
        for seen_at, position in reversed(self._history):
            if position <= replay:
                break
            since = seen_at
        return now - since

    def report(self) -> dict[str, dict]:
        return {r.label: r.report() for r in self.replicas}


class ReadCursor:
    """The cursor of a read-only block (`get_db(read_only=True)`) while replicas are configured:
    a `Cursor` on the server `ReplicaSet.route` names, which may change before the block's
    first statement has answered, never after.

    Before that first statement, the position the read must see is asked again (a batch
    takes in lookups until its query is sent): on a replica that has not replayed it, the
    block moves to another server; so does one whose replica left the rotation since. On a
    replica, the first statement of a read that must see a position runs behind the guard
    (`_guarded`); a replica that refuses it leaves the rotation and the statement runs on the
    primary. A first statement that fails on a replica with the connection
    (`DatabaseUnavailable`) or in a conflict with recovery (`TransactionConflict`) runs once
    more elsewhere, the replica taken out of rotation in the first case; so does a replica
    whose connection cannot be had. After the first answer, errors are the block's.
    Only the block's first connection asks whether its client hung up (`ClientGone`, nothing
    sent): once it holds one, the read is under way, and a batch's read answers other requests
    too, so the connections it takes to run again elsewhere, or to read its position, do not.
    Every other attribute is the current cursor's.
    """

    def __init__(self, replicas: ReplicaSet, timeout: float | None, at_least: Callable[[], int]):
        self._replicas = replicas
        self._timeout = timeout
        self._at_least = at_least
        self._lent: AbstractContextManager[Cursor] | None = None  # the current connection's block
        self._cursor: Cursor | None = None
        self._answered = False
        self.server = PRIMARY
        self._open(at_least(), None)

    # A read may take its position in its own statement, evaluated after that statement's
    # snapshot (service.db.with_position): no round trip more.
    position_sql = READ_POSITION_SQL

    @property
    def position(self) -> int | None:
        return self._cursor.position if self._cursor is not None else None

    @position.setter
    def position(self, value: int) -> None:
        self._cursor.position = value

    def took_position(self, column: str) -> None:
        """What the read selected as `position_sql`: its position, and what its server told
        of itself, which keeps the monitors' picture fresh (`ReplicaSet.heard`)."""
        position, _, rest = column.partition(" ")
        self._cursor.position = parse_lsn(position)
        if self.server != PRIMARY:
            in_recovery, _, replay = rest.partition(" ")
            replayed = parse_lsn(replay) if replay else 0
            self._replicas.heard(self.server, in_recovery == "true", replayed)

    def _open(
        self, at_least: int, exclude: str | None, ask_client: bool = True, primary: bool = False
    ) -> None:
        if primary:
            pool, label, _ = self._replicas.fell_back(RETRY)
        else:
            pool, label, _ = self._replicas.route(at_least, exclude)
        if label != PRIMARY:
            try:
                self._enter(pool, label, ask_client)
                return
            except DatabaseUnavailable as exc:
                self._replicas.failed(label, exc)
                pool, label, _ = self._replicas.fell_back(RETRY)
        self._enter(pool, label, ask_client)

    def _enter(self, pool: Pool, label: str, ask_client: bool) -> None:
        lent = pool.connection(self._timeout, True, POSITION_SQL, ask_client)
        self._cursor = lent.__enter__()
        self._lent = lent
        self.server = label

    def _move(self, at_least: int, exc: BaseException | None, primary: bool = False) -> None:
        """Give the current connection back (with `exc`, if it failed) and open another, on
        the primary if `primary`."""
        left = self.server
        # The pool hands back the failed connection, raising its error translated: the error
        # this move is already answering.
        with suppress(psycopg2.Error, DatabaseUnavailable, TransactionConflict):
            self._lent.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
        self._open(at_least, left, ask_client=False, primary=primary)

    def execute(self, query, vars=None):
        if self._answered:
            return self._cursor.execute(query, vars)
        at_least = self._at_least()
        replica = self._replicas.replica(self.server)
        if replica is not None and (not replica.up or replica.replay < at_least):
            self._move(at_least, None)  # it left the rotation, or fell behind, since routed
        try:
            result = self._run(query, vars, at_least)
        except (psycopg2.Error, DatabaseUnavailable) as exc:
            self._answer_failure(exc, at_least)
            try:
                result = self._run(query, vars, at_least)
            except psycopg2.Error as again:
                if not self._refused(again, at_least):
                    raise
                self._answer_failure(again, at_least)
                result = self._run(query, vars, at_least)
        self._answered = True
        return result

    def _run(self, query, vars, at_least: int):
        """The first statement, behind the guard on a replica when the read must see a
        position."""
        if self.server == PRIMARY or not at_least:
            return self._cursor.execute(query, vars)
        return self._cursor.execute(_guarded(query, at_least), vars)

    def _refused(self, exc: BaseException, at_least: int) -> bool:
        """Whether `exc` is the guard's refusal: the replica has not replayed `at_least`."""
        return (
            self.server != PRIMARY
            and at_least > 0
            and getattr(exc, "pgcode", None) == _BEHIND_SQLSTATE
        )

    def _answer_failure(self, exc: BaseException, at_least: int) -> None:
        """After the first statement failed with `exc` on the current server: move to where it
        runs once more (the primary, when the guard refused), or raise `exc`."""
        if self._refused(exc, at_least):
            self._replicas.failed(self.server, ReplicaBehind(at_least))
            self._replicas.retried(self.server)
            self._move(at_least, exc, primary=True)
            return
        ours = translate(exc) if isinstance(exc, psycopg2.Error) else exc
        if self.server == PRIMARY or not isinstance(
            ours, (DatabaseUnavailable, TransactionConflict)
        ):
            raise exc
        if isinstance(ours, DatabaseUnavailable):
            self._replicas.failed(self.server, ours)
        self._replicas.retried(self.server)
        self._move(at_least, exc)

    def close(self, exc: BaseException | None) -> None:
        """End the block: read the position, give the connection back; or, with `exc`, hand it
        the error. Raises what the pool raises. A position read on the primary tells the
        primary's monitor (`ReplicaSet.heard_primary`), as `took_position` tells a replica's.

        A replica lost after the block's answers and before its position was read (killed in
        between) leaves the rotation, and the position is the primary's: no replica has
        replayed more than the primary has written."""
        if exc is not None:
            self._lent.__exit__(type(exc), exc, exc.__traceback__)
            return
        try:
            self._lent.__exit__(None, None, None)
        except DatabaseUnavailable as exc:
            if self.server == PRIMARY:
                raise
            self._replicas.failed(self.server, exc)
            primary_block = self._replicas.primary.connection(
                self._timeout, True, POSITION_SQL, ask_client=False
            )
            with primary_block as primary:
                pass
            self._cursor = primary
            return
        if self.server == PRIMARY:
            self._replicas.heard_primary(self.position)

    def __getattr__(self, name: str):
        return getattr(self._cursor, name)

    def __iter__(self):
        return iter(self._cursor)


class ReplicaBehind(Exception):
    """A replica refused a read's guard: it has not replayed a position its monitor, or a read,
    had seen it replay (its server restarted since), or a token it was routed for."""

    def __init__(self, at_least: int) -> None:
        super().__init__(f"it has not replayed {format_lsn(at_least)}, which it was taken to have")


def _guarded(query, at_least: int):
    """`query`, sent in the same round trip after a statement that fails (division by zero)
    unless its server has replayed `at_least`: statements sent together run one after the
    other, so the query's snapshot, taken after the check, holds every commit up to there. A
    server that never was in recovery has replayed nothing (NULL): refused too. `query` is
    `str`, `bytes` or a `psycopg2.sql.Composable`; the guard holds no `%`, so parameters bind
    as before."""
    # Not CASE ... ELSE 1 / 0: the planner folds that constant, and refuses every time.
    guard = (
        "SELECT 1 / coalesce((pg_last_wal_replay_lsn() >= "
        f"'{format_lsn(at_least)}'::pg_lsn)::int, 0); "
    )
    if isinstance(query, sql.Composable):
        return sql.SQL(guard) + query
    if isinstance(query, bytes):
        return guard.encode() + query
    return guard + query


class _Poller:
    """A monitor's own connection to one server, opened again after any failure."""

    def __init__(self, dsn: str, connect_timeout: float) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._conn: psycopg2.extensions.connection | None = None

    def poll(self, sql: str) -> tuple | None:
        """The one row `sql` answers, or None when the server cannot be reached or gives no
        answer within `PROBE_DEADLINE_S` (the connection is then closed, opened again next)."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(
                    self._dsn, self._connect_timeout, application_name="service-monitor"
                )
                self._conn.autocommit = True
            with deadline(PROBE_DEADLINE_S, _NoAnswer), self._conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchone()
        except (psycopg2.Error, _NoAnswer):
            self.close()
            return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> _Poller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NoAnswer(Exception):
    """A poll got no answer in time."""
