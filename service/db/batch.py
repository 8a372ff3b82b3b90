"""A batch loader: concurrent requests for one kind of statement, answered by one statement.

A worker under load spends its time in Python, and each database round trip costs it a pool
checkout, a statement to build and send, and a wake-up when the answer comes, besides the
server's own work for the statement. `BatchLoader` lets one lookup query of a worker run at a
time (`IN_FLIGHT`), or, given `permits`, takes a permit of a semaphore that several loaders
share, so that their queries together hold at most that many connections and each kind waits
for the others' turns; given `turns` too, loaders of different permits take turns as well,
each waiting a bounded time for the other's query. A lookup that finds them all running does
not queue alone: it joins the batch of every lookup that arrives while it waits, and when a
query returns, one query (`WHERE id = ANY(...)`) answers the whole batch. Under load the
batches grow by themselves; at low load a lookup finds a free permit and goes at once, alone,
and waits for nothing. What it is worth on the realistic mix: docs/performance.md.

A lookup never joins a query already sent, so it sees every write committed before it was
asked, just as a query of its own would.

A key may be a write (service/api/users.py batches creates and updates this way): the keys a
query is sent for are read once it holds its connection, so a write whose request gave up
before that is not made; and `fetch` may answer a key with an exception, which that key's
lookup alone raises (a write that must run on its own, say).

Each lookup keeps its own deadline for waiting: until its query holds a connection it may
leave, with the pool's 503, when its time (`turn_timeout()`, DB_POOL_TIMEOUT) runs out; after
that `answer_timeout()` bounds the wait (the statement's deadline, for a query sent once).
When the lookup that was to send the query gives up before it holds a connection (its own time
ran out, it got no connection, it was killed), the others go on, with their own time, in the
next batch. A query that fails once sent fails every lookup it answers: a connection found
broken costs the whole batch its 503, where each request with a query of its own would have
paid for its own connection only.

With `tracing` (service/db/tracing.py), each lookup runs inside `tracing.lookup()`,
which yields what its batch's query must link to (its request's span context); the query runs
inside `tracing.serving(links)`, `links` being the list of those of the lookups in its batch,
which grows as lookups join until it is sent.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from gevent.event import Event

from service.db.errors import DatabaseUnavailable
from service.db.semaphore import FairSemaphore

IN_FLIGHT = 1
MAX_KEYS = 500  # a batch this large is sent as it is; later lookups start the next one


class _Batch:
    """Lookups that go in one query, and, once it returned, its answer."""

    __slots__ = (
        "at_least",
        "closed",
        "counted",
        "done",
        "error",
        "keys",
        "links",
        "position",
        "rows",
        "sent_at",
        "server",
    )

    def __init__(self, key: Hashable, at_least: int = 0, link: object = None) -> None:
        self.keys = [key]  # of the lookups in it: one that gives up before it is sent leaves
        self.links = [] if link is None else [link]  # theirs, with tracing: likewise
        self.counted = 0  # its lookups counted in `BatchLoader.waiting`
        self.closed = False  # sent or given up: it counts no longer, and takes no one in
        self.sent_at = 0.0  # when its query got a connection (0: it did not)
        self.done = Event()
        self.rows: dict[Hashable, Any] = {}
        self.error: BaseException | None = None
        self.at_least = at_least  # the latest position a lookup in it must see
        self.position: int | None = None  # the position its query wrote or saw
        self.server: str | None = None  # the server its read ran on


class Sending:
    """What `fetch` gets for its batch: called once the query holds a connection, the keys to
    answer; `at_least()`, the latest position a lookup in it must see (replicas: `get_db`'s
    `at_least`); `saw(position, server)`, to hand every lookup the position the query wrote or
    saw, and the server a read ran on (None for a write)."""

    __slots__ = ("_batch", "_loader")

    def __init__(self, loader: BatchLoader, batch: _Batch) -> None:
        self._loader = loader
        self._batch = batch

    def __call__(self) -> list[Hashable]:
        return self._loader._sent(self._batch)

    def at_least(self) -> int:
        return self._batch.at_least

    def saw(self, position: int | None, server: str | None = None) -> None:
        self._batch.position = position
        self._batch.server = server


class Tracing(Protocol):
    """What a batch loader asks of tracing (module doc)."""

    def lookup(self) -> AbstractContextManager[object]: ...

    def serving(self, links: list) -> AbstractContextManager[object]: ...


class BatchLoader:
    """Lookups by key for one worker's greenlets: one query at a time, or one per permit of
    `permits`.

    `fetch(waited_s, connected)` runs one query and returns its rows by key, a key without a
    row left out, or an exception for a key whose lookup alone should raise it. `waited_s` is
    how long the lookup that sends it already waited for its turn, to be taken off its wait
    for a connection; `connected()` must be called once it holds one, and returns the keys to
    answer: those of the lookups still in the batch, a key asked twice there twice.
    `turn_timeout()` is how long a lookup may wait for its query to get a connection, and
    `timed_out()` the error when it did not; `answer_timeout()` is how long it then waits for
    the answer (as long as the sender may take for its query once it holds a connection, and a
    little more), after which it gets `DatabaseUnavailable`, never a wait without end.
    `waited(seconds)` is told, in each lookup's greenlet, how long it waited for that, and
    `answered(lookups)`, if given, per query, how many lookups it answered (a `fetch` may count
    what it sends itself instead).

    `permits`, when given, is the semaphore whose permits its queries take instead of one of
    its own of `IN_FLIGHT`: loaders that share one take turns, first come first served, and
    each collects its lookups while the others' queries run. A query that waits (for a lock,
    for a replica to catch up) then holds up every loader sharing its semaphore, for the
    catch-up wait and the statement's deadline at most.

    `turns`, when given, is a semaphore of one permit that loaders with different `permits`
    share: a query with its permit then waits for the turn, still collecting lookups, but for
    `turn_wait_s` at most, and goes without it after that. So their queries normally run one
    at a time, and a query that waits holds up the others by `turn_wait_s` at most, each.

    With replicas, `at_least()` is asked, in each lookup's greenlet, the position its request
    must see, and the batch must see the latest of them (`Sending.at_least`); `saw(position)`
    is told, in each lookup's greenlet, the position its query wrote or saw and the server
    its read ran on.
    """

    def __init__(
        self,
        fetch: Callable[[float, Callable[[], list[Hashable]]], dict[Hashable, Any]],
        *,
        turn_timeout: Callable[[], float],
        answer_timeout: Callable[[], float],
        timed_out: Callable[[], Exception],
        waited: Callable[[float], None],
        answered: Callable[[int], None] | None = None,
        at_least: Callable[[], int] | None = None,
        saw: Callable[[int | None, str | None], None] | None = None,
        permits: FairSemaphore | None = None,
        turns: FairSemaphore | None = None,
        turn_wait_s: float = 0.0,
        max_keys: int = MAX_KEYS,
        tracing: Tracing | None = None,
    ) -> None:
        self._fetch = fetch
        self._turn_timeout = turn_timeout
        self._answer_timeout = answer_timeout
        self._timed_out = timed_out
        self._waited = waited
        self._answered = answered
        self._at_least = at_least
        self._saw = saw
        self._slots = permits if permits is not None else FairSemaphore(IN_FLIGHT)
        self._turns = turns
        self._turn_wait_s = turn_wait_s
        self._max_keys = max_keys
        self._tracing = tracing
        self._batch: _Batch | None = None
        self._batched = 0

    @property
    def waiting(self) -> int:
        """Lookups whose query holds no connection yet: they wait for one, in effect. A sender
        waiting in the pool is the pool's to count, not counted here too."""
        return self._batched

    def get(self, key: Hashable) -> Any:
        """The row for `key`, or None when there is none. Raises what the query raised, for
        every lookup it was sent for, and `timed_out()` when it got no connection in time."""
        if self._tracing is None:
            return self._get(key, None)
        with self._tracing.lookup() as link:
            return self._get(key, link)

    def _get(self, key: Hashable, link: object) -> Any:
        asked = time.perf_counter()
        deadline = asked + self._turn_timeout()  # raises for a request that may wait no more
        at_least = self._at_least() if self._at_least is not None else 0
        while True:
            batch = self._batch
            if batch is None:
                batch = _Batch(key, at_least, link)
                answer = self._send(batch, key, asked, deadline)
                break
            batch.at_least = max(batch.at_least, at_least)
            if self._join(batch, key, link, asked, deadline):
                if batch.error is not None:
                    raise _again(batch.error) from batch.error
                answer = batch.rows.get(key)
                break
            # Its sender gave up before the query held a connection: this one goes on.
        if self._saw is not None:  # a key answered with an exception too: it was in the query
            self._saw(batch.position, batch.server)
        if isinstance(answer, BaseException):
            try:
                raise answer
            finally:
                # Raised, the exception holds this frame (its traceback): were the answer or
                # the batch, whose rows hold it, still in the frame, the exception, the batch
                # and every row of it would be a reference cycle, left for the cyclic collector.
                answer = batch = None
        return answer

    def _join(
        self, batch: _Batch, key: Hashable, link: object, asked: float, deadline: float
    ) -> bool:
        """Wait in `batch` for its query; whether it was sent (False: it was given up)."""
        batch.keys.append(key)
        if link is not None:
            batch.links.append(link)
        self._count(batch, 1)
        if len(batch.keys) >= self._max_keys:
            self._batch = None
        try:
            _wait(batch.done, max(0.0, deadline - time.perf_counter()))
            if not batch.done.is_set():
                if not batch.sent_at:
                    raise self._timed_out()  # its own time ran out first
                # Its query holds a connection: the statement's deadline bounds the sender's
                # wait for the answer, and this one waits that long from then, no longer.
                answer_by = batch.sent_at + self._answer_timeout()
                _wait(batch.done, max(0.0, answer_by - time.perf_counter()))
                if not batch.done.is_set():
                    raise DatabaseUnavailable("the query for this lookup got no answer in time")
        except BaseException:
            self._waited(time.perf_counter() - asked)
            raise
        finally:
            if not batch.closed:  # leaving, out of time or killed
                self._count(batch, -1)
                batch.keys.remove(key)
                if link is not None:
                    batch.links.remove(link)
        if not batch.sent_at:
            return False  # its wait goes on, and is told once it ends
        self._waited(batch.sent_at - asked)
        return True

    def _send(self, batch: _Batch, key: Hashable, asked: float, deadline: float) -> Any:
        try:
            turns = self._turns
            if not self._slots.try_acquire():
                has_turn = self._collect(batch, asked, deadline)
            elif turns is not None and not turns.try_acquire():
                has_turn = self._collect(batch, asked, deadline, holding=True)
            else:
                has_turn = turns is not None
            waited_s = time.perf_counter() - asked
            try:
                self._waited(waited_s)
                tracing = self._tracing
                with tracing.serving(batch.links) if tracing is not None else nullcontext():
                    batch.rows = self._fetch(waited_s, Sending(self, batch))
            finally:
                if has_turn:
                    turns.release()
                self._slots.release()
            if self._answered is not None:
                self._answered(len(batch.keys))
        except Exception as exc:
            if batch.sent_at:  # the query's own failure; before that, the others go on
                batch.error = exc
            raise
        except BaseException:  # killed: a query sent for the others will not be answered
            if batch.sent_at:
                batch.error = DatabaseUnavailable("the query for this lookup was abandoned")
            raise
        finally:
            self._close(batch)  # given up unsent, if it got no connection
            batch.done.set()
        return batch.rows.get(key)  # an exception too: `_get` raises it

    def _collect(self, batch: _Batch, asked: float, deadline: float, holding: bool = False) -> bool:
        """Wait for a permit (unless `holding` one), then for the worker's turn, up to
        `turn_wait_s`, while later lookups join `batch`; whether it got the turn. Raises
        `timed_out()` when no permit came by `deadline`."""
        self._batch = batch
        self._count(batch, 1)
        try:
            if not holding and not self._slots.acquire(max(0.0, deadline - time.perf_counter())):
                self._waited(time.perf_counter() - asked)
                raise self._timed_out()
            if self._turns is None:
                return False
            if self._turns.try_acquire():  # free: nobody else's query runs
                return True
            try:
                wait_s = min(self._turn_wait_s, max(0.0, deadline - time.perf_counter()))
                return self._turns.acquire(wait_s)
            except BaseException:  # killed: the permit goes back
                self._slots.release()
                raise
        finally:
            self._count(batch, -1)  # the pool counts it, if it now waits for a connection
            if self._batch is batch:
                self._batch = None

    def _sent(self, batch: _Batch) -> list[Hashable]:
        batch.sent_at = time.perf_counter()
        self._close(batch)
        return batch.keys

    def _close(self, batch: _Batch) -> None:
        if not batch.closed:
            batch.closed = True
            self._count(batch, -batch.counted)
            if self._batch is batch:
                self._batch = None

    def _count(self, batch: _Batch, n: int) -> None:
        batch.counted += n
        self._batched += n


def _wait(event: Event, timeout: float) -> None:
    """Wait for `event` up to `timeout`, unless it is already set.

    Not just `event.wait(timeout)`: gevent (26.9) loses a greenlet that calls `wait()` on an
    Event that is set while its waiters are still to be woken, when the last of those waiters
    then leaves by its own timeout (`AbstractLinkable.unlink` stops the pending notifier, and
    the greenlets queued on it are never woken). That greenlet waits for ever, whatever its
    timeout. Followers woken by their own timeouts in the loop turn in which their query's
    answer came were lost that way (tests/test_batch_loader.py reproduces that turn, and
    tests/test_faults.py the hang it caused after a network cut).
    """
    if not event.is_set():
        event.wait(timeout)


def _again(error: BaseException) -> BaseException:
    """The error of a shared query, for one more of its lookups: a copy of its own, so that
    the lookups' tracebacks do not pile up on one exception."""
    try:
        again = copy.copy(error)
    except Exception:  # one that cannot be copied: what the service answers it with
        again = DatabaseUnavailable(str(error))
    again.__traceback__ = None
    return again
