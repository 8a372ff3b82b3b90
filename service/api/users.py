"""The users resource: `/users` and `/users/<id>`.

Each route is one declaration (service/api/operations.py): its body and query are validated
by the models of service/api/models.py and service/api/pagination.py, and the same
declaration documents it in /openapi.json. Input is checked completely before any SQL runs,
so bad input stores nothing. Every request is one statement, so each uses
`get_db(autocommit=True)`: one round trip, no BEGIN or COMMIT.

`GET /users/<id>`, `GET /users`, `POST /users` and `PATCH /users/<id>` go through batch
loaders of the worker (service/db/batch.py), so that under load concurrent requests of one
kind share a statement: reads one `WHERE id = ANY(...)`, pages one `CROSS JOIN LATERAL` over
the pages asked for (requests for the same page share its rows), creates one `INSERT ...
SELECT FROM unnest(...) ON CONFLICT (email) DO NOTHING`, updates one `UPDATE ... FROM
unnest(...)`. A request never joins a statement already sent, so it sees every write
committed before it was asked. A delete is a statement of its own. A worker's reads by id and
pages take turns, one statement at a time, and so do its creates and updates: each kind
collects its requests while the other's statement runs. Reads and writes take turns too, but a
read's statement waits for a write's (or the reverse) TURN_WAIT_S at most, and then goes: a
write stuck on a lock, or a read waiting for a replica, holds up the other side that long per
statement, no longer (`batch_loaders`).

A statement is one transaction: a batch's writes are stored together or not at all, and each
request is answered once its statement committed. Concurrent requests have no order among
them, so a batch may make its writes in any order; it makes each exactly once, or not at all:

* creates of an email already taken, or taken by an earlier create of the same batch, get 409
  (`ON CONFLICT DO NOTHING` stores the others);
* an update of a user that an earlier update of the same batch changes runs alone, after
  that batch, so that each update's answer is the row as its own update left it;
* an update batch skips rows locked by another transaction (`SKIP LOCKED`): an update of such
  a row runs alone and waits for that lock by itself; an update of a missing user also runs
  alone, to its 404;
* an update batch that fails on a conflict (an email taken, a deadlock) stored nothing, and
  each of its updates runs alone, with its own answer (200, 404, 409);
* a request whose wait ran out before its batch's statement held a connection is not in the
  statement (503), nor is one whose client hung up by then (499, as with `get_db()`).

Reads are not asked whether their client hung up while they waited in a batch: such a read
stays in its shared query, and its answer goes nowhere. A row is answered as the cursor gave
it, and requests for the same user or page share it: nothing may change a row once fetched.

What a batch cannot promise better than a single statement: a create or an email change whose
email another transaction has inserted and not yet committed waits for that transaction, and
its batch with it. A statement whose answer is lost (the connection breaks after sending it,
or no answer comes within the statement deadline) answers 503 to every write of its batch,
though the server may have committed them.

A write that runs alone waits for a connection only what is left of DB_POOL_TIMEOUT (503 at
once when nothing is left), then up to the statement timeout for its statement: at worst the
pool timeout and two statement timeouts in all, where a single statement takes one.
Uniqueness of email is the database's job (a unique index): a race between two creators ends
in one 201 and one 409, never in two rows.

With streaming replicas (DATABASE_REPLICA_URLS), writes are as above, on the primary; reads by
id and pages run on a replica (`get_db(read_only=True)`), and a read "sees every write
committed before it was asked" only for writes its client's consistency token covers: its own
and what it read before, when it carries its last token (service/api/consistency.py). A read
without a token may miss others' writes by up to REPLICA_MAX_LAG_S.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg2.errors
from flask import Blueprint, current_app

from service.api import client
from service.api.errors import ApiError
from service.api.models import NewUser, User, UserChange, UserPage
from service.api.operations import BUSY, Answer, Header, route
from service.api.pagination import BIGINT_MAX, PageQuery, encode_cursor
from service.db import (
    ClientGone,
    Cursor,
    PoolTimeout,
    current_pool,
    current_replicas,
    fetch_with_position,
    get_db,
    request_position,
    seen,
    with_position,
)
from service.db.batch import MAX_KEYS, BatchLoader, Sending, Tracing
from service.db.semaphore import FairSemaphore
from service.observability import logs, metrics

bp = Blueprint("users", __name__, url_prefix="/users")
LOADER = "service.api.users.loader"
PAGES = "service.api.users.pages"
CREATES = "service.api.users.creates"
UPDATES = "service.api.users.updates"

PAGES_PER_QUERY = 50  # requests; a page asked twice is fetched once
TURN_WAIT_S = 0.05  # the longest a read's query waits for a write's to end, and the reverse
_COLUMNS = "id, name, email, created_at"
_USER_ID = {"user_id": "a user id; anything that is not one gives 404"}
_TAKEN = {409: "email already taken"}
_NO_USER = {404: "no such user"}
_LOCATION = Header("/users/<id> of the new user")


# A batch statement that fails with one of these (SQLSTATE: unique violation, serialization
# failure, deadlock, lock not available) stored nothing: each of its writes then runs alone.
_CONFLICTS = frozenset({"23505", "40001", "40P01", "55P03"})


class _Write:
    """One request's create or update, a key of a batch loader: equal to itself alone."""

    __slots__ = ("email", "name", "sock", "uid")

    def __init__(self, uid: int | None, name: str | None, email: str | None) -> None:
        self.uid = uid
        self.name = name
        self.email = email
        self.sock = client.socket_of_request()  # its client's, to see whether it hung up


class _Alone(Exception):
    """Its batch could not make this write: its request makes it alone."""


@route(
    bp,
    "POST",
    "",
    summary="Create a user",
    body=NewUser,
    answers={201: Answer("created", User, headers={"Location": _LOCATION})},
    errors=_TAKEN | BUSY,
)
def create_user(body: NewUser):
    user = _write(CREATES, _Write(None, body.name, body.email), _insert_one)
    return user, 201, {"Location": f"/users/{user['id']}"}


@route(
    bp,
    "GET",
    "",
    summary="List users, newest first, with keyset pagination",
    query=PageQuery,
    answers={200: Answer("a page of users", UserPage)},
    errors=BUSY,
)
def list_users(query: PageQuery):
    limit, after = query.limit, query.cursor
    # Ids up to `upto`: the page after the cursor's id, or the newest when there is no cursor.
    upto = BIGINT_MAX if after is None else after - 1
    rows = current_app.extensions[PAGES].get((upto, limit + 1))
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
    return {"users": page, "next_cursor": next_cursor}


@route(
    bp,
    "GET",
    "/<user_id>",
    summary="One user",
    path=_USER_ID,
    answers={200: Answer("the user", User)},
    errors=_NO_USER | BUSY,
)
def get_user(user_id: str):
    uid = _parse_id(user_id)
    return _found(current_app.extensions[LOADER].get(uid))


def batch_loaders(replicas: bool = False, tracing: Tracing | None = None) -> dict[str, BatchLoader]:
    """One worker's batch loaders (service/db/batch.py), by the key `create_app` keeps each
    under in `app.extensions`: users by id, pages, creates and updates. With `replicas`, each
    batch reads at the latest position its requests must see, and hands each the position its
    statement wrote or saw (service/api/consistency.py). With `tracing`, their waits and
    statements are traced (service/db/tracing.py)."""
    options = {"at_least": request_position, "saw": _saw} if replicas else {}
    options["tracing"] = tracing
    # One query at a time for the worker's reads, one for its writes, and the two take turns:
    # each kind collects its requests while the other kinds' queries run. A write waiting for a
    # lock holds up a read by TURN_WAIT_S at most, and a read waiting for a replica holds up a
    # write as long (docs/performance.md, issue 28).
    reads, writes = FairSemaphore(1), FairSemaphore(1)
    options["turns"], options["turn_wait_s"] = FairSemaphore(1), TURN_WAIT_S
    # A read's statement may run once more on another server, in the same block.
    read = {"permits": reads, "answer_timeout": _read_answer_timeout if replicas else None}
    return {
        LOADER: _loader(_users_by_id, metrics.lookups_answered, **read, **options),
        # At most PAGES_PER_QUERY pages of up to MAX_LIMIT + 1 rows each in one query's answer.
        PAGES: _loader(_pages, metrics.pages_answered, max_keys=PAGES_PER_QUERY, **read, **options),
        # A batch of writes counts itself, what went into its statement (metrics.batch_sent).
        CREATES: _loader(_create_users, permits=writes, **options),
        UPDATES: _loader(_update_users, permits=writes, **options),
    }


def _saw(position: int | None, server: str | None) -> None:
    """A batch's statement wrote or saw `position`, a read on `server`: the request's token
    covers it, and its access line names the server (service/api/consistency.py)."""
    seen(position)
    if server is not None:
        logs.add_read_server(server)


def _loader(
    fetch,
    answered: Callable[[int], None] | None = None,
    max_keys: int = MAX_KEYS,
    answer_timeout: Callable[[], float] | None = None,
    **options,
) -> BatchLoader:
    return BatchLoader(
        fetch,
        turn_timeout=_turn_timeout,
        answer_timeout=answer_timeout or _answer_timeout,
        timed_out=_no_connection_in_time,
        waited=logs.add_pool_wait,
        answered=answered,
        max_keys=max_keys,
        **options,
    )


def _turn_timeout() -> float:
    """How long a lookup may wait for its query to hold a connection; PoolTimeout at once
    when DB_POOL_MAX_WAITING requests already wait for one (lookups in batches included)."""
    pool = current_pool()
    refused = pool.waiting_cap_reached()
    if refused is not None:
        raise pool.turned_away(refused)
    return pool.timeout


def _answer_timeout() -> float:
    """How long a lookup waits for the answer to a query that holds a connection: as long as
    the pool lets its sender wait for it, and a second more for the sender to hand it over."""
    return current_pool().statement_deadline_s + 1.0


def _read_answer_timeout() -> float:
    """`_answer_timeout` for reads with replicas: a read whose statement fails on a replica
    runs it once more elsewhere in the same block (service/db/replicas.py's `ReadCursor`), and
    the lookups in its batch wait for that too, as long as its sender may take for it."""
    return current_replicas().read_s(current_pool().timeout) + 1.0


def _no_connection_in_time() -> PoolTimeout:
    pool = current_pool()
    return pool.turned_away(f"no database connection became free within {pool.timeout:g} s")


def _batch_db(waited_s: float, connected: Sending, read_only: bool = False):
    """`get_db()` for a batch's statement: the sender's wait for its turn (`waited_s`) counts
    against its wait for a connection; a read sees what every request in the batch must."""
    timeout = max(0.0, current_pool().timeout - waited_s)
    if read_only:
        return get_db(timeout, read_only=True, at_least=connected.at_least)
    return get_db(timeout, autocommit=True)


def _users_by_id(waited_s: float, connected: Sending) -> dict[int, dict]:
    with _batch_db(waited_s, connected, read_only=True) as db:
        ids = connected()
        db.execute(
            f"SELECT {with_position(db, _COLUMNS)} FROM users WHERE id = ANY(%s)",
            (list(set(ids)),),
        )
        rows = {row["id"]: row for row in fetch_with_position(db)}
    connected.saw(db.position, getattr(db, "server", None))
    return rows


def _pages(waited_s: float, connected: Sending) -> dict:
    """Each page asked for, `(upto, n)`: the newest `n` users whose id is at most `upto`,
    newest first; requests for the same page share its rows. One statement for all: a plain
    query when they all asked for one page (the common case: the newest users), since the
    lateral join costs PostgreSQL more to plan."""
    with _batch_db(waited_s, connected, read_only=True) as db:
        rows = _page_rows(db, list(set(connected())))
    connected.saw(db.position, getattr(db, "server", None))
    return rows


def _page_rows(db: Cursor, pages: list[tuple[int, int]]) -> dict:
    if len(pages) == 1:
        db.execute(
            f"SELECT {with_position(db, _COLUMNS)} FROM users"
            " WHERE id <= %s ORDER BY id DESC LIMIT %s",
            pages[0],
        )
        return {pages[0]: fetch_with_position(db)}
    db.execute(
        f"SELECT {with_position(db, 'p.i AS page_no, u.*')}"
        " FROM unnest(%s::bigint[], %s::int[])"
        " WITH ORDINALITY AS p(upto, n, i) CROSS JOIN LATERAL"
        f" (SELECT {_COLUMNS} FROM users WHERE id <= p.upto ORDER BY id DESC LIMIT p.n) u"
        " ORDER BY p.i, u.id DESC",
        ([upto for upto, _ in pages], [n for _, n in pages]),
    )
    rows: dict[tuple[int, int], list[dict]] = {page: [] for page in pages}
    for row in fetch_with_position(db):
        rows[pages[row.pop("page_no") - 1]].append(row)
    return rows


@route(
    bp,
    "PATCH",
    "/<user_id>",
    summary="Change name and/or email",
    path=_USER_ID,
    body=UserChange,
    answers={200: Answer("the changed user", User)},
    errors=_NO_USER | _TAKEN | BUSY,
)
def update_user(user_id: str, body: UserChange):
    uid = _parse_id(user_id)
    return _found(_write(UPDATES, _Write(uid, body.name, body.email), _update_one))


def _write(loader: str, write: _Write, alone: Callable[[Cursor, _Write], dict | None]):
    """The row `write` left (None: no such user), made in a batch statement of the worker's
    `loader`, or alone when its batch could not make it (module docstring)."""
    asked = time.perf_counter()
    with _unique_email():
        try:
            return current_app.extensions[loader].get(write)
        except _Alone:
            left = current_pool().timeout - (time.perf_counter() - asked)
            if left <= 0:
                raise _no_connection_in_time() from None
            with get_db(left, autocommit=True) as db:
                return alone(db, write)


def _insert_one(db: Cursor, write: _Write) -> dict:
    db.execute(
        f"INSERT INTO users (name, email) VALUES (%s, %s) RETURNING {_COLUMNS}",
        (write.name, write.email),
    )
    return db.fetchone()


def _update_one(db: Cursor, write: _Write) -> dict | None:
    db.execute(
        "UPDATE users SET name = COALESCE(%s, name), email = COALESCE(%s, email)"
        f" WHERE id = %s RETURNING {_COLUMNS}",
        (write.name, write.email, write.uid),
    )
    return db.fetchone()


def _still_wanted(writes: list[_Write]) -> tuple[list[_Write], dict]:
    """The writes whose clients are still there, and `ClientGone` for each of the others."""
    gone = {
        write: ClientGone("the client hung up while its write waited")
        for write in writes
        if client.closed(write.sock)
    }
    return [write for write in writes if write not in gone], gone


def _create_users(waited_s: float, connected: Sending) -> dict:
    with _batch_db(waited_s, connected) as db:
        creates, answers = _still_wanted(connected())
        first: dict[str, _Write] = {}  # the first create of each email; the others are 409
        for write in creates:
            first.setdefault(write.email, write)
        by_email = {}
        if first:
            # Sorted, so that two batches sharing emails take the index's entries in one order.
            ordered = sorted(first.values(), key=lambda write: write.email)
            metrics.batch_sent("create", len(ordered))
            with _alone_on_conflict():
                db.execute(
                    "INSERT INTO users (name, email)"
                    " SELECT * FROM unnest(%s::text[], %s::text[])"
                    f" ON CONFLICT (email) DO NOTHING RETURNING {_COLUMNS}",
                    ([write.name for write in ordered], [write.email for write in ordered]),
                )
            by_email = {row["email"]: row for row in db.fetchall()}
    connected.saw(db.position)
    for write in creates:
        made = first[write.email] is write and write.email in by_email
        answers[write] = by_email[write.email] if made else _email_taken()
    return answers


def _update_users(waited_s: float, connected: Sending) -> dict:
    with _batch_db(waited_s, connected) as db:
        updates, answers = _still_wanted(connected())
        first: dict[int, _Write] = {}  # the first update of each user; the others run alone
        for write in updates:
            first.setdefault(write.uid, write)
        by_id = {}
        if first:
            ordered = list(first.values())
            metrics.batch_sent("update", len(ordered))
            with _alone_on_conflict():
                db.execute(
                    "WITH w AS (SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[])"
                    " AS w(id, name, email)),"
                    " free AS (SELECT id FROM users WHERE id IN (SELECT id FROM w)"
                    " FOR UPDATE SKIP LOCKED)"
                    " UPDATE users AS u SET name = COALESCE(w.name, u.name),"
                    " email = COALESCE(w.email, u.email)"
                    " FROM w WHERE u.id = w.id AND u.id IN (SELECT id FROM free)"
                    " RETURNING u.id, u.name, u.email, u.created_at",
                    (
                        [write.uid for write in ordered],
                        [write.name for write in ordered],
                        [write.email for write in ordered],
                    ),
                )
            by_id = {row["id"]: row for row in db.fetchall()}
    connected.saw(db.position)
    # Not updated: missing, locked elsewhere, or not the first of its user; each alone.
    for write in updates:
        made = first[write.uid] is write and write.uid in by_id
        answers[write] = by_id[write.uid] if made else _Alone()
    return answers


@contextmanager
def _alone_on_conflict() -> Iterator[None]:
    """A batch statement's conflict (`_CONFLICTS`) sends each of its writes to run alone."""
    try:
        yield
    except psycopg2.Error as exc:
        if exc.pgcode in _CONFLICTS:
            raise _Alone() from None
        raise


@route(
    bp,
    "DELETE",
    "/<user_id>",
    summary="Delete a user",
    path=_USER_ID,
    answers={204: Answer("deleted")},
    errors=_NO_USER | BUSY,
)
def delete_user(user_id: str):
    uid = _parse_id(user_id)
    with get_db(autocommit=True) as db:
        db.execute("DELETE FROM users WHERE id = %s", (uid,))
        deleted = db.rowcount
    if not deleted:
        raise _not_found()
    return "", 204


def _parse_id(raw: str) -> int:
    """A user id is 1 to 2**63-1 in plain ASCII digits; anything else names no user (404)."""
    if re.fullmatch(r"[0-9]{1,19}", raw) and 0 < int(raw) <= BIGINT_MAX:
        return int(raw)
    raise _not_found()


def _found(row: dict | None) -> dict:
    if row is None:
        raise _not_found()
    return row


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "no such user")


@contextmanager
def _unique_email() -> Iterator[None]:
    """Turn the unique index's verdict into 409."""
    try:
        yield
    except psycopg2.errors.UniqueViolation as exc:
        raise _email_taken() from exc


def _email_taken() -> ApiError:
    return ApiError(409, "email_taken", "a user with this email already exists")
