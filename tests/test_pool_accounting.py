"""The pool's counts match the server's after a holder is killed at any greenlet switch.

Each case runs one holder and kills it at its first switch, then at its second, and so on,
until it runs to the end without being killed: that walks every place it can wait (for a
permit, while connecting, pinging, querying, committing, rolling back, returning). After each
kill `stats()` must say what `pg_stat_activity` says: as many connections open, none lent, and
the pool must still lend a connection.
"""

from __future__ import annotations

import itertools
from functools import partial

import gevent
import greenlet
import pytest
from gunicorn_proc import wait_until
from pgutil import backends

from service.db import Pool

KILLS = [gevent.GreenletExit, gevent.Timeout]
MAX_SWITCHES = 60  # no case takes as many: a case that never completes fails, not loops


class Rollback(Exception):
    pass


def commits(pool: Pool) -> None:
    with pool.connection() as db:
        db.execute("SELECT pg_sleep(0.01)")


def rolls_back(pool: Pool) -> None:
    try:
        with pool.connection() as db:
            db.execute("SELECT pg_sleep(0.01)")
            raise Rollback
    except Rollback:
        pass


def in_autocommit(pool: Pool) -> None:
    with pool.connection(autocommit=True) as db:
        db.execute("SELECT pg_sleep(0.01)")


def waits_behind_another(pool: Pool) -> None:
    """Waits for the permit of the pool's one connection, which a sibling holds for a moment."""
    sibling = gevent.spawn(commits, pool)
    try:
        gevent.sleep(0)
        commits(pool)
    finally:
        sibling.join(timeout=10)


CASES = [commits, rolls_back, in_autocommit, waits_behind_another]


def server_connections(admin, application_name: str) -> dict[str, int]:
    found = backends(admin, application_name)
    # A backend still starting has no state yet: open, not in use.
    return {"size": len(found), "in_use": sum(b["state"] not in ("idle", None) for b in found)}


def pool_counts(pool: Pool) -> dict[str, int]:
    stats = pool.stats()
    return {"size": stats["size"], "in_use": stats["in_use"]}


def kill_at_switch(target, n: int, kill: type[BaseException]) -> bool:
    """Run `target` in a greenlet and kill it with `kill` when it switches out for the `n`th
    time; whether it was killed (False: it finished first)."""
    finished = []
    holder = gevent.spawn(lambda: finished.append(target()))
    switches = 0

    def trace(event, args):
        nonlocal switches
        if event in ("switch", "throw") and args[0] is holder:
            switches += 1
            if switches == n:
                gevent.get_hub().loop.run_callback(partial(holder.kill, kill, block=False))

    previous = greenlet.settrace(trace)
    try:
        holder.join(timeout=20)
    finally:
        greenlet.settrace(previous)
    assert holder.dead, "the holder neither finished nor died"
    if finished:
        return False
    # gevent counts a GreenletExit as a clean end; anything else it died of must be the kill.
    assert isinstance(holder.value, gevent.GreenletExit) or isinstance(holder.exception, kill), (
        holder.exception
    )
    return True


@pytest.mark.parametrize("kill", KILLS, ids=lambda kill: kill.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
@pytest.mark.parametrize("warm", [False, True], ids=["connecting", "pinging"])
def test_a_holder_killed_at_any_switch_leaves_counts_that_match_the_server(
    make_pool, admin, case, kill, warm
):
    killed_at = []
    for n in itertools.count(1):
        assert n < MAX_SWITCHES
        name = f"kill-{case.__name__[:10]}-{n}"
        # ping_after_idle_s=0: every idle connection is pinged before it is lent.
        pool = make_pool(
            max_size=1, min_size=1 if warm else 0, ping_after_idle_s=0, application_name=name
        )
        pool.warm()
        if not kill_at_switch(lambda pool=pool: case(pool), n, kill):
            break
        killed_at.append(n)
        counts = wait_until(
            lambda pool=pool, name=name: (
                pool_counts(pool) == server_connections(admin, name) and pool_counts(pool)
            ),
            10,
            f"the pool's counts to match the server's after a kill at switch {n}: "
            f"{pool_counts(pool)} against {server_connections(admin, name)}",
        )
        assert counts["in_use"] == 0
        assert pool.stats()["idle"] == counts["size"]
        commits(pool)  # the pool still lends its one connection
        assert pool_counts(pool)["size"] == server_connections(admin, name)["size"] == 1
        pool.close()
    assert len(killed_at) >= 2  # it was killed at several places before it could finish
