"""A fair semaphore for the greenlets of one worker: permits handed out first come first served.

The pool (service/db/pool.py) lends one permit per connection lent or being opened: a greenlet
that finds none free joins a queue and waits, up to a timeout, and a permit released goes
straight to the oldest waiter, so that no newcomer can take it first (gevent's own Semaphore
lets a newcomer take a permit released while the oldest waiter is still to wake up).

Greenlet-safe, not thread-safe: the greenlets of a worker share one OS thread and switch only
at blocking calls, so nothing between a test and the change it guards needs a lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from gevent.event import Event


class FairSemaphore:
    """`size` permits, and the queue of greenlets waiting for one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._waiters: deque[Event] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def taken(self) -> int:
        return self.size - self._free

    def try_acquire(self) -> bool:
        """Take a free permit if there is one nobody waits for; never waits."""
        # Waiters present means the free permit is already promised to them.
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    def acquire(self, timeout: float, joined: Callable[[], None] | None = None) -> bool:
        """Queue for a permit up to `timeout` seconds; whether one was handed over. `joined` is
        called once this greenlet is in the queue, before it waits. Killed while waiting, it
        leaves the queue, and releases a permit handed over meanwhile."""
        waiter = Event()
        self._waiters.append(waiter)
        if joined is not None:
            joined()
        try:
            waiter.wait(timeout)
        except BaseException:  # killed while waiting: give back a permit handed over meanwhile
            if waiter.is_set():
                self.release()
            else:
                self._waiters.remove(waiter)
            raise
        if not waiter.is_set():
            self._waiters.remove(waiter)
            return False
        return True

    def release(self) -> bool:
        """Give a permit back; whether it went straight to a waiter."""
        if self._waiters:
            self._waiters.popleft().set()
            return True
        self._free += 1
        return False

    def wake_all(self) -> None:
        """Hand every waiter a permit, so that each wakes up and sees why (the pool's close)."""
        while self._waiters:
            self._waiters.popleft().set()
