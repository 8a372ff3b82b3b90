"""The app's door (service/admission.py): real greenlets at the door, and `get_db()` honouring
a request's ticket against a real server.

Through real gunicorn workers the door is exercised by tests/test_faults.py: the storm on a
stalled database (every waiter answered DB_POOL_TIMEOUT after it arrived, /healthz answering
at once meanwhile, around the full door) and the waiting cap (exactly the connections and
DB_POOL_MAX_WAITING waiters admitted per worker, the rest turned away at once).
"""

import time

import gevent
import pytest
from gevent.event import Event
from gunicorn_proc import access_lines
from pgutil import only_connection_held

from service import admission
from service.admission import Door, Ticket


def a_door(limit=2, timeout=10.0, max_waiting=0, inside_waiting=0, waiting_changed=None) -> Door:
    return Door(
        limit=limit,
        timeout=timeout,
        max_waiting=max_waiting,
        waiting_inside=lambda: inside_waiting,
        waiting_changed=waiting_changed,
    )


def visit(door: Door, order: list, name, release: Event) -> Ticket:
    ticket = door.enter()
    if ticket.admitted:
        order.append(name)
        release.wait()
        door.leave()
    return ticket


def test_the_door_lets_in_its_limit_and_the_rest_in_the_order_they_came():
    counts = []
    door = a_door(limit=2, waiting_changed=counts.append)
    order, releases = [], [Event() for _ in range(6)]
    visitors = []
    for i in range(6):
        visitors.append(gevent.spawn(visit, door, order, i, releases[i]))
        gevent.sleep(0)  # arrive one after another
    gevent.sleep(0.01)
    assert (door.inside, door.waiting, order) == (2, 4, [0, 1])

    for release in releases:
        release.set()
        gevent.sleep(0.01)
    gevent.joinall(visitors, timeout=5, raise_error=True)
    assert order == [0, 1, 2, 3, 4, 5]
    assert (door.inside, door.waiting) == (0, 0)
    assert counts == [1, 2, 3, 4, 3, 2, 1, 0]  # what /metrics shows as db_pool_waiting_at_door


def test_a_wait_at_the_door_ends_at_the_timeout_without_a_place():
    door = a_door(limit=1, timeout=0.2)
    release = Event()
    holder = gevent.spawn(visit, door, [], "holder", release)
    gevent.sleep(0)
    started = time.monotonic()
    ticket = door.enter()
    assert not ticket.admitted and ticket.refused is None
    assert 0.18 <= ticket.waited_s <= time.monotonic() - started < 1
    assert door.waiting == 0
    release.set()
    holder.join(timeout=5)
    assert door.inside == 0


def test_past_the_waiting_cap_the_door_turns_a_request_away_at_once():
    """The cap counts the requests waiting at the door and those waiting inside, in the pool."""
    door = a_door(limit=1, max_waiting=3, inside_waiting=1)
    release = Event()
    visitors = [gevent.spawn(visit, door, [], i, release) for i in range(3)]
    gevent.sleep(0.01)
    assert (door.inside, door.waiting) == (1, 2)

    started = time.monotonic()
    ticket = door.enter()
    assert time.monotonic() - started < 0.1
    assert ticket == Ticket(0.0, False, "3 requests already wait for a connection")
    release.set()
    gevent.joinall(visitors, timeout=5, raise_error=True)


def test_the_waiting_cap_holds_with_places_free_when_enough_wait_inside():
    """A door wider than the cap: those inside wait for a connection, so the cap turns the next
    request away although a place is free."""
    inside = [0]
    door = Door(limit=8, timeout=10.0, max_waiting=3, waiting_inside=lambda: inside[0])
    assert door.enter() == Ticket(0.0, True)
    inside[0] = 3
    assert door.enter() == Ticket(0.0, False, "3 requests already wait for a connection")
    assert door.inside == 1
    inside[0] = 2
    assert door.enter() == Ticket(0.0, True)
    door.leave()
    door.leave()
    assert door.inside == 0


def test_a_request_killed_at_the_door_leaves_no_place_taken():
    door = a_door(limit=1)
    release = Event()
    holder = gevent.spawn(visit, door, [], "holder", release)
    gevent.sleep(0)
    killed = gevent.spawn(door.enter)
    gevent.sleep(0.01)
    assert door.waiting == 1
    killed.kill()
    assert door.waiting == 0
    release.set()
    holder.join(timeout=5)
    assert (door.inside, door.waiting) == (0, 0)
    assert door.enter().admitted  # the place is free again
    door.leave()


# get_db() and the access line, for a request that came through the door with a ticket


@pytest.fixture
def ticket():
    def give(ticket: Ticket):
        token = admission.current.set(ticket)
        tokens.append(token)

    tokens = []
    yield give
    for token in reversed(tokens):
        admission.current.reset(token)


def assert_pool_timeout(response) -> None:
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "pool_timeout"
    assert int(response.headers["Retry-After"]) >= 1


def test_a_request_turned_away_at_the_door_gets_the_pools_503_at_once(make_app, ticket, caplog):
    app = make_app(DB_POOL_TIMEOUT=5)
    ticket(Ticket(0.0, False, "12 requests already wait for a connection"))
    started = time.monotonic()
    response = app.test_client().get("/users")
    assert time.monotonic() - started < 1
    assert_pool_timeout(response)
    assert "503 pool_timeout: 12 requests already wait for a connection" in caplog.text


def test_a_request_that_waited_out_the_pool_timeout_at_the_door_gets_503_at_once(make_app, ticket):
    app = make_app(DB_POOL_TIMEOUT=0.5)
    ticket(Ticket(0.5, False))
    started = time.monotonic()
    assert_pool_timeout(app.test_client().get("/users"))
    assert time.monotonic() - started < 0.4


def test_the_wait_at_the_door_is_taken_off_the_pools_wait_and_logged(make_app, ticket, log_lines):
    app = make_app(DB_POOL_MAX=1, DB_POOL_MIN=1, DB_POOL_TIMEOUT=0.6)
    ticket(Ticket(0.4, True))
    with only_connection_held(app):
        started = time.monotonic()
        response = app.test_client().get("/users")
        waited = time.monotonic() - started

    assert_pool_timeout(response)
    assert 0.15 <= waited < 0.6  # 0.6 s in all, 0.4 of them at the door
    [line] = access_lines(log_lines())
    assert line["pool_wait_ms"] >= 400 + 150
