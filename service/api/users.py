"""The users resource: `/users` and `/users/<id>`.

Input is checked completely before any SQL runs, so bad input stores nothing. Every request
is one statement, so each uses `get_db(autocommit=True)`: one round trip, no BEGIN or COMMIT.

`GET /users/<id>`, `POST /users` and `PATCH /users/<id>` go through batch loaders of the
worker (service/db/batch.py), so that under load concurrent requests of one kind share a
statement: reads one `WHERE id = ANY(...)`, creates one `INSERT ... SELECT FROM unnest(...)`,
updates one `UPDATE ... FROM unnest(...)`. A request never joins a statement already sent, so
it sees every write committed before it was asked. A page (`GET /users`) and a delete are a
statement of their own. A statement is one transaction, so a batch of
writes is stored whole or not at all, and each request is answered only once it committed.
Concurrent requests have no order among them, so a batch may make its writes in any order; it
makes each exactly once:

* a batch statement that fails with a conflict (a unique violation: two creates of one email
  in one batch, or an email already taken; a deadlock) has stored nothing, and then each of
  its writes runs alone, in its own request, with its own answer (201, 409, 404, ...);
* an update of a user that an earlier update in the same batch changes runs alone, after
  that batch, so that each update's answer is the row as it left it;
* a batch never waits for another transaction's lock on a row (`SKIP LOCKED`): an update of
  a row locked elsewhere runs alone and waits for that lock by itself, so one locked row
  holds up its own update only (an update of a missing user also runs alone, to its 404);
* a request that gives up before its batch's statement holds a connection (its wait ran out)
  is not in the statement, nor is one whose client hung up by then (499, as `get_db()` does
  it): what it asked is not done.

A write that runs alone may wait for a connection only what is left of DB_POOL_TIMEOUT.
Uniqueness of email is the database's job (a unique index): a race between two creators ends
in one 201 and one 409, never in two rows.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import psycopg2.errors
import psycopg2.extensions
from flask import Blueprint, current_app, request

from service.api import client
from service.api.errors import ApiError
from service.api.pagination import BIGINT_MAX, decode_cursor, encode_cursor, parse_limit
from service.db import ClientGone, Cursor, PoolTimeout, current_pool, get_db
from service.db.batch import BatchLoader
from service.observability import logs, metrics

bp = Blueprint("users", __name__, url_prefix="/users")
LOADER = "service.api.users.loader"
CREATES = "service.api.users.creates"
UPDATES = "service.api.users.updates"

NAME_MAX = 200
EMAIL_MAX = 254
FIELDS = ("name", "email")
_COLUMNS = "id, name, email, created_at"
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+")
_CONTROL_CHARS = r"\x00-\x1f\x7f-\x9f"  # C0, DEL and C1
_CONTROL = re.compile(f"[{_CONTROL_CHARS}]")
# What _read_fields() accepts as a name, as a regular expression for the OpenAPI document: no
# control character, and something besides white space.
NAME_PATTERN = rf"^[^{_CONTROL_CHARS}]*[^\s{_CONTROL_CHARS}][^{_CONTROL_CHARS}]*$"


# A batch statement that fails with one of these stored nothing: each write then runs alone.
_CONFLICTS = (
    psycopg2.IntegrityError,
    psycopg2.extensions.TransactionRollbackError,  # a deadlock between two batches
    psycopg2.errors.LockNotAvailable,
)


class _Write:
    """One request's create or update, a key of a batch loader: equal to itself alone."""

    __slots__ = ("email", "name", "sock", "uid")

    def __init__(self, uid: int | None, fields: dict[str, str]) -> None:
        self.uid = uid
        self.name = fields.get("name")
        self.email = fields.get("email")
        self.sock = client.socket_of_request()  # its client's, to see whether it hung up


class _Alone(Exception):
    """Its batch could not make this write: its request makes it alone."""


@bp.post("")
def create_user():
    fields = _read_fields(required=True)
    user = _write(CREATES, _Write(None, fields), _insert_one)
    return _public(user), 201, {"Location": f"/users/{user['id']}"}


@bp.get("")
def list_users():
    limit = parse_limit(request.args.get("limit"))
    after = decode_cursor(request.args.get("cursor"))
    with get_db(autocommit=True) as db:
        if after is None:
            db.execute(f"SELECT {_COLUMNS} FROM users ORDER BY id DESC LIMIT %s", (limit + 1,))
        else:
            db.execute(
                f"SELECT {_COLUMNS} FROM users WHERE id < %s ORDER BY id DESC LIMIT %s",
                (after, limit + 1),
            )
        rows = db.fetchall()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
    return {"users": [_public(row) for row in page], "next_cursor": next_cursor}


@bp.get("/<user_id>")
def get_user(user_id: str):
    uid = _parse_id(user_id)
    return _public(_found(current_app.extensions[LOADER].get(uid)))


def batch_loaders() -> dict[str, BatchLoader]:
    """One worker's batch loaders (service/db/batch.py), by the key `create_app` keeps each
    under in `app.extensions`: users by id, creates and updates."""
    return {
        LOADER: _loader(_users_by_id, metrics.lookups_answered),
        CREATES: _loader(_create_users, metrics.batch_answered("create")),
        UPDATES: _loader(_update_users, metrics.batch_answered("update")),
    }


def _loader(fetch, answered: Callable[[int], None]) -> BatchLoader:
    return BatchLoader(
        fetch,
        turn_timeout=_turn_timeout,
        answer_timeout=_answer_timeout,
        timed_out=_no_connection_in_time,
        waited=logs.add_pool_wait,
        answered=answered,
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


def _no_connection_in_time() -> PoolTimeout:
    pool = current_pool()
    return pool.turned_away(f"no database connection became free within {pool.timeout:g} s")


def _users_by_id(waited_s: float, connected: Callable[[], Sequence[int]]) -> dict[int, dict]:
    # The wait for its turn counts against the wait for a connection.
    with get_db(max(0.0, current_pool().timeout - waited_s), autocommit=True) as db:
        ids = connected()
        db.execute(f"SELECT {_COLUMNS} FROM users WHERE id = ANY(%s)", (list(set(ids)),))
        return {row["id"]: row for row in db.fetchall()}


@bp.patch("/<user_id>")
def update_user(user_id: str):
    uid = _parse_id(user_id)
    fields = _read_fields(required=False)
    return _public(_found(_write(UPDATES, _Write(uid, fields), _update_one)))


def _write(loader: str, write: _Write, alone: Callable[[Cursor, _Write], dict | None]):
    """The row `write` left (None: no such user), made in a batch statement of the worker's
    `loader`, or alone when its batch could not make it (module docstring)."""
    asked = time.perf_counter()
    with _unique_email():
        try:
            return current_app.extensions[loader].get(write)
        except _Alone:
            left = current_pool().timeout - (time.perf_counter() - asked)
            with get_db(max(0.0, left), autocommit=True) as db:
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


def _create_users(waited_s: float, connected: Callable[[], list[_Write]]) -> dict:
    with get_db(max(0.0, current_pool().timeout - waited_s), autocommit=True) as db:
        creates, answers = _still_wanted(connected())
        if len(creates) <= 1:
            answers.update({write: _insert_one(db, write) for write in creates})
        else:
            # Sorted, so that two batches sharing emails take the index's entries in one order.
            ordered = sorted(creates, key=lambda write: write.email)
            try:
                db.execute(
                    "INSERT INTO users (name, email)"
                    f" SELECT * FROM unnest(%s::text[], %s::text[]) RETURNING {_COLUMNS}",
                    ([write.name for write in ordered], [write.email for write in ordered]),
                )
            except _CONFLICTS:
                raise _Alone() from None
            by_email = {row["email"]: row for row in db.fetchall()}
            answers.update({write: by_email[write.email] for write in creates})
    return answers


def _update_users(waited_s: float, connected: Callable[[], list[_Write]]) -> dict:
    with get_db(max(0.0, current_pool().timeout - waited_s), autocommit=True) as db:
        updates, answers = _still_wanted(connected())
        if len(updates) <= 1:
            answers.update({write: _update_one(db, write) for write in updates})
            return answers
        first: dict[int, _Write] = {}  # the first update of each user; the others run alone
        for write in updates:
            first.setdefault(write.uid, write)
        ordered = list(first.values())
        try:
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
        except _CONFLICTS:
            raise _Alone() from None
        by_id = {row["id"]: row for row in db.fetchall()}
    # Not updated: missing, locked elsewhere, or not the first of its user; each alone.
    for write in updates:
        made = first[write.uid] is write and write.uid in by_id
        answers[write] = by_id[write.uid] if made else _Alone()
    return answers


@bp.delete("/<user_id>")
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


def _read_fields(required: bool) -> dict[str, str]:
    """The validated fields of the JSON body: all of them to create, at least one to update."""
    try:
        body = request.get_json()  # 415 when not JSON, 400 when malformed, 413 when over 1 MiB
    except RecursionError:  # valid JSON nested deeper than the parser goes: still the client's
        raise ApiError(400, "bad_request", "the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_body", "the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown field(s): {', '.join(unknown)}")
    missing = [name for name in FIELDS if name not in body]
    if required and missing:
        raise ApiError(422, "missing_field", f"missing field(s): {', '.join(missing)}")
    if not body:
        raise ApiError(422, "missing_field", "give name, email or both")
    fields = {}
    if "name" in body:
        fields["name"] = _text(body["name"], "name", NAME_MAX).strip()
        if not fields["name"]:
            raise ApiError(422, "invalid_name", "name must not be blank")
    if "email" in body:
        fields["email"] = _text(body["email"], "email", EMAIL_MAX)
        if not _EMAIL.fullmatch(fields["email"]):
            raise ApiError(422, "invalid_email", "email must look like name@example.com")
    return fields


def _text(value, field: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise ApiError(422, f"invalid_{field}", f"{field} must be a string")
    if not 1 <= len(value) <= max_len:
        raise ApiError(422, f"invalid_{field}", f"{field} must be 1 to {max_len} characters")
    if _CONTROL.search(value):
        raise ApiError(422, f"invalid_{field}", f"{field} must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800" cannot be stored
        raise ApiError(422, f"invalid_{field}", f"{field} is not valid Unicode text") from None
    return value


@contextmanager
def _unique_email() -> Iterator[None]:
    """Turn the unique index's verdict into 409."""
    try:
        yield
    except psycopg2.errors.UniqueViolation as exc:
        raise ApiError(409, "email_taken", "a user with this email already exists") from exc


def _public(user: dict) -> dict:
    return {**user, "created_at": user["created_at"].isoformat()}
