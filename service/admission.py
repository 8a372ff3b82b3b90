"""The door to the app: at most `ADMITTED_PER_CONNECTION` requests per pooled connection are
inside one worker's app at once; the others wait at the door, first come first served.

Every request that needs the database waits for a connection somewhere. Without the door it
waited inside the app, in `get_db()`, and the work per request grew with the number waiting:
in one bench run the worker's CPU per `GET /users/<id>` went from 0.83 ms at 50 connections to
1.28 ms at 10,000, the database's from 0.17 to 0.20 ms, while `/healthz`, which never waits,
stayed at 0.6 ms. The gunicorn worker (service/worker.py) lets a request into the app only
through this door, before gunicorn has built anything for it; the few inside keep every
connection busy. Measured against the same code without the door, alternating runs on this
machine (2 cores shared by wrk, gunicorn and PostgreSQL): at 2,000 connections 1,149 against
908 requests/s (median ratio of 16 runs 1.20), 1.22 against 1.39 ms of worker CPU and 0.234
against 0.279 ms of database CPU per request; at 500 connections 1,691 against 1,579 (14
runs, 1.09), 0.944 against 1.005 and 0.169 against 0.182 ms.

Four per connection, not two: reads of one user by id share queries (service/lookups.py), and
every lookup inside can join the next one, so a wider door makes fewer, larger queries.
Measured with shared lookups, `GET /users/<id>` at 4 against 2 per connection, alternating
runs (2 workers, pool 10 each): 1.09 times the requests/s at 50 connections (8 runs), 1.14 at
500 (8 runs; worker CPU 0.63 against 0.75 ms per request), 0.98 at 5,000 (5 runs); 8 per
connection did worse at 5,000 (0.94).

The door keeps the pool's promises. A request waits at most DB_POOL_TIMEOUT for a connection
in all: `get_db()` takes the time waited at the door off the pool's wait. DB_POOL_MAX_WAITING
counts the requests waiting at the door with those waiting in the pool. A request the door
turns away, or that waited at it until DB_POOL_TIMEOUT, still goes in without a slot, and
`get_db()` answers it at once with the pool's 503 (same body, `Retry-After`, access line and
metrics); a request that needs no connection is served as usual.

The probes and `/metrics` go around it (`AROUND`): `/healthz` must answer while the database
stalls and the door is full, `/readyz` bounds its own wait, and a scrape should see a
saturated worker rather than queue behind it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from service.slots import Slots

# Requests inside the app per pooled connection: enough to keep each connection busy, and the
# shared lookups' queries full (see above).
ADMITTED_PER_CONNECTION = 4
AROUND = frozenset({"/healthz", "/readyz", "/metrics"})
EXTENSION = "service.admission"


@dataclass(frozen=True, slots=True)
class Ticket:
    """How a request came through the door: its wait, and why it got no slot, if it got none."""

    waited_s: float
    admitted: bool
    refused: str | None = None


# The ticket of the request this greenlet serves; None when it came in around the door (or
# no door is in front of the app, as in the tests' own clients).
current: ContextVar[Ticket | None] = ContextVar("service_admission", default=None)


class Door:
    """`limit` requests inside at a time, the next one in line let in as one leaves.

    `waiting_inside()` counts the requests already waiting inside (for a pooled connection),
    for the `max_waiting` cap; `timeout` bounds each wait at the door. `waiting_changed`, when
    given, hears the number waiting at the door whenever it changes (for /metrics).
    """

    def __init__(
        self,
        *,
        limit: int,
        timeout: float,
        max_waiting: int,
        waiting_inside: Callable[[], int],
        waiting_changed: Callable[[int], None] | None = None,
    ) -> None:
        self._timeout = timeout
        self._max_waiting = max_waiting
        self._waiting_inside = waiting_inside
        self._waiting_changed = waiting_changed
        self._slots = Slots(limit)

    @property
    def waiting(self) -> int:
        return self._slots.waiting

    @property
    def inside(self) -> int:
        return self._slots.taken

    def enter(self) -> Ticket:
        """Wait for a place inside; a ticket with `admitted` must be given back to `leave()`.

        The waiting cap is checked first, even with a place free: those inside may wait for a
        connection (in the pool, or gathered for a shared lookup), and a door wider than the
        cap would otherwise let more wait than it allows.
        """
        if self._max_waiting:
            waiting = self._slots.waiting + self._waiting_inside()
            if waiting >= self._max_waiting:
                refused = f"{waiting} requests already wait for a connection"
                return Ticket(0.0, False, refused)
        if self._slots.take_now():
            return Ticket(0.0, True)
        started = time.monotonic()
        admitted = False
        try:
            admitted = self._slots.wait(self._timeout, joined=self._changed)
        finally:
            if not admitted:  # left the queue on its own (an admitted one was counted off)
                self._changed()
        return Ticket(time.monotonic() - started, admitted)

    def leave(self) -> None:
        if self._slots.give():
            self._changed()

    def _changed(self) -> None:
        if self._waiting_changed is not None:
            self._waiting_changed(self._slots.waiting)
