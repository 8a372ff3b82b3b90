"""Load for end-to-end tests: requests to the service on 127.0.0.1, each ending as an `Outcome`
(a complete response, or why none came) with its timings.

`get` sends one request, `burst` a fixed number of them a few at a time, `Load` keeps clients
looping while a test breaks something, and `connected` plus `storm` send one request on each of
thousands of connections at once. Every wait here is bounded: a hang fails the test instead of
stalling the run.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import gevent
from gevent.event import Event
from gunicorn_proc import HOST


@dataclass
class Outcome:
    """How one request ended: a complete response (`status`), or `error` saying why none came."""

    started: float
    ended: float
    sent: float | None  # when the request was written, if it was
    status: int | None = None
    code: str | None = None  # the error code of an error response
    retry_after: str | None = None
    error: str | None = None  # refused, reset, closed, incomplete, timeout, or an exception

    @property
    def label(self) -> str:
        return str(self.status) if self.status is not None else self.error

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def get(port: int, path: str, timeout: float = 20.0, conn=None) -> Outcome:
    """GET `path` on a fresh connection (or on `conn`, already connected) and classify the end.
    A `path` may start with another method and a space: "DELETE /users/1".

    Apart from tests/gunicorn_proc.py's `request`, the tests' one client, because a load test
    counts what `request` raises: this never raises, and records when the request started, was
    written and ended, which the storm tests need (see `while_waiting` in tests/test_faults.py).
    """
    started = time.monotonic()
    conn = conn or http.client.HTTPConnection(HOST, port, timeout=timeout)
    sent = None
    method, _, path = path.rpartition(" ")
    try:
        conn.request(method or "GET", path)
        sent = time.monotonic()
        response = conn.getresponse()
        body = json.loads(response.read())  # a cut body fails to read or to parse
    except ConnectionRefusedError:
        return Outcome(started, time.monotonic(), sent, error="refused")
    except http.client.RemoteDisconnected:  # closed with no response
        return Outcome(started, time.monotonic(), sent, error="closed")
    except (ConnectionResetError, BrokenPipeError):
        return Outcome(started, time.monotonic(), sent, error="reset")
    except (http.client.IncompleteRead, ValueError):
        return Outcome(started, time.monotonic(), sent, error="incomplete")
    except TimeoutError:
        return Outcome(started, time.monotonic(), sent, error="timeout")
    except OSError as exc:
        return Outcome(started, time.monotonic(), sent, error=type(exc).__name__)
    finally:
        conn.close()
    code = body["error"]["code"] if isinstance(body, dict) and "error" in body else None
    retry_after = response.getheader("Retry-After")
    return Outcome(started, time.monotonic(), sent, response.status, code, retry_after)


def join_all(greenlets: Iterable[gevent.Greenlet], timeout: float, what: str) -> list:
    """Wait for every greenlet, at most `timeout` seconds, and return their values in order.

    Raises the first greenlet's exception; fails (killing the rest) when any is still running
    after `timeout`.
    """
    greenlets = list(greenlets)
    try:
        done = gevent.joinall(greenlets, timeout=timeout, raise_error=True)
    finally:
        gevent.killall(greenlets, timeout=5)  # none left running: those done are untouched
    if len(done) < len(greenlets):
        running = len(greenlets) - len(done)
        raise AssertionError(
            f"{what}: {running} of {len(greenlets)} still running after {timeout:g} s"
        )
    return [greenlet.get(block=False) for greenlet in greenlets]


def burst(port: int, path: str, n: int, concurrency: int, limit_s: float = 60.0) -> list[Outcome]:
    """`n` requests for `path`, `concurrency` at a time, each on a fresh connection; fails when
    they are not all answered within `limit_s`."""
    todo = iter(range(n))

    def client() -> list[Outcome]:
        return [get(port, path) for _ in todo]  # shared: each index goes to one client

    clients = [gevent.spawn(client) for _ in range(min(n, concurrency))]
    return [o for outcomes in join_all(clients, limit_s, "a burst") for o in outcomes]


class Load:
    """`clients` greenlets each sending GET `path` again and again, on a fresh connection each
    time and `pause` seconds apart, until the block ends, `limit_s` passes or `max_each` requests
    were sent; a client that is refused stops (nothing listens any more)."""

    def __init__(self, port, path, clients: int, limit_s: float, pause=0.0, max_each=100_000):
        self.port, self.path, self.clients = port, path, clients
        self.limit_s, self.pause, self.max_each = limit_s, pause, max_each
        self.outcomes: list[Outcome] = []
        self._stop = Event()

    def __enter__(self) -> Load:
        self._greenlets = [gevent.spawn(self._client) for _ in range(self.clients)]
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        # A request under way ends within get()'s timeout (20 s).
        join_all(self._greenlets, 30, "the load's clients")

    def _client(self) -> None:
        deadline = time.monotonic() + self.limit_s
        for _ in range(self.max_each):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            outcome = get(self.port, self.path)
            self.outcomes.append(outcome)
            if outcome.error == "refused":
                return
            gevent.sleep(self.pause)  # 0: let the other clients (and the test) run

    def count(self, status: int) -> int:
        return sum(o.status == status for o in self.outcomes)


def connected(port: int, n: int) -> list[http.client.HTTPConnection]:
    """`n` open connections to the service, no request sent yet, opened 200 at a time."""
    todo = iter(range(n))
    conns = []  # in the order they were accepted

    def opener() -> None:
        for _ in todo:  # shared: each index goes to one opener
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            conn.connect()
            conns.append(conn)

    join_all([gevent.spawn(opener) for _ in range(min(n, 200))], 60, "the connects")
    return conns


def storm(port: int, conns: list, path: str, probe_every: float = 0.1) -> tuple[list, list, float]:
    """One request for `path` on each of `conns` at once, and /healthz probed meanwhile, on
    connections of its own; returns the storm's outcomes, the probes' and the storm's length in
    seconds."""
    started = time.monotonic()
    requests = [gevent.spawn(get, port, path, conn=conn) for conn in conns]
    probes = []
    while not all(r.ready() for r in requests) and len(probes) < 100:
        probes.append(get(port, "/healthz", timeout=5))
        gevent.sleep(probe_every)
    outcomes = join_all(requests, 60, "the storm's requests")
    return outcomes, probes, max(o.ended for o in outcomes) - started


def statuses(outcomes: list[Outcome]) -> dict[str, int]:
    return dict(sorted(Counter(o.label for o in outcomes).items()))


def latency(outcomes: list[Outcome]) -> dict[str, float]:
    seconds = sorted(o.seconds for o in outcomes)
    if not seconds:
        return {}
    p99 = seconds[min(len(seconds) - 1, int(len(seconds) * 0.99))]
    return {
        "p50_ms": round(statistics.median(seconds) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(seconds[-1] * 1000, 1),
    }
