"""Places shared by the greenlets of one worker, handed out first come first served.

The pool's connections (service/pool.py) and the app's door (service/admission.py) both lend a
fixed number of places: a greenlet that finds none free joins a queue and waits, up to a
timeout, and a place given back goes straight to the oldest waiter, so that no newcomer can
take it first.

Greenlet-safe, not thread-safe: the greenlets of a worker share one OS thread and switch only
at blocking calls, so nothing between a test and the change it guards needs a lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from gevent.event import Event


class Slots:
    """`size` places, and the queue of greenlets waiting for one."""

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

    def take_now(self) -> bool:
        """Take a free place if there is one nobody waits for; never waits."""
        # Waiters present means the free place is already promised to them.
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    def wait(self, timeout: float, joined: Callable[[], None] | None = None) -> bool:
        """Queue for a place up to `timeout` seconds; whether one was handed over. `joined` is
        called once this greenlet is in the queue, before it waits."""
        waiter = Event()
        self._waiters.append(waiter)
        if joined is not None:
            joined()
        try:
            waiter.wait(timeout)
        except BaseException:  # killed while waiting: give back a place handed over meanwhile
            if waiter.is_set():
                self.give()
            else:
                self._waiters.remove(waiter)
            raise
        if not waiter.is_set():
            self._waiters.remove(waiter)
            return False
        return True

    def give(self) -> bool:
        """Give a place back; whether it went straight to a waiter."""
        if self._waiters:
            self._waiters.popleft().set()
            return True
        self._free += 1
        return False

    def wake_all(self) -> None:
        """Hand every waiter a place, so that each wakes up and sees why (the pool's close)."""
        while self._waiters:
            self._waiters.popleft().set()
