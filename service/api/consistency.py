"""Consistency tokens: read-your-writes and monotonic reads across requests, workers and
instances while reads go to streaming replicas, with no store shared between instances.

Registered only when DATABASE_REPLICA_URLS names replicas; without them nothing here runs,
and no token is sent or read.

A response to a request that touched the database carries a token: the WAL position its
writes reached, or the position of what its reads could have seen (service/db/replicas.py),
and never less than the token it presented. It is sent as the `Consistency-Token` header and
as the `consistency_token` cookie (for browsers, which carry it by themselves). A request that
presents a token (the header, the cookie, or both: the later position counts) reads only on a
server that has replayed that far: a replica, or else the primary.

What each client is promised, with replicas:

* A client that presents the token of its last response reads everything it wrote, and
  nothing older than what it read before (read-your-writes, monotonic reads), whichever
  worker or instance answers it, and whichever replica it lands on.
* A read without a token may miss writes made by others, by up to REPLICA_MAX_LAG_S (a
  replica lagging further leaves the rotation), and, by not carrying its token, its own.
* Writes, and the rules of users.py, are as without replicas: they run on the primary.

A token is `1:` and an LSN (`1:16/B374D848`). One the service cannot read (garbled, forged,
from another release) sends that request's reads to the primary, counted in `/metrics`
(`consistency_tokens_unreadable_total`): never an error and never a stale read. Nor can a
token make the service do more than a read on the primary: a position beyond the primary's own
is read there at once, and one a replica has not reached waits for it at most
REPLICA_CATCH_UP_S. Tokens are not secrets, and are not signed: they say only how far to read.
"""

from __future__ import annotations

from contextvars import ContextVar
from functools import lru_cache

from flask import Flask, Response, request

from service import db
from service.db.lsn import format_lsn, parse_lsn
from service.observability import metrics

HEADER = "Consistency-Token"
COOKIE = "consistency_token"
VERSION = "1"
_HEADER_KEY = "HTTP_" + HEADER.upper().replace("-", "_")  # the header in the WSGI environ
_COOKIE_ATTRIBUTES = "; HttpOnly; Path=/; SameSite=Lax"


def register(app: Flask) -> None:
    app.before_request(_read_token)
    app.after_request(_hand_token)
    app.teardown_request(_forget)
    app.extensions[db.READ_POSITION] = _at_least
    app.extensions[db.SEEN_POSITION] = _saw


@lru_cache(maxsize=1024)  # the responses of a batch, and of the reads between two writes, share one
def encode(position: int) -> str:
    return f"{VERSION}:{format_lsn(position)}"


def decode(token: str) -> int | None:
    """The position of a token, or None for one this release cannot read."""
    version, colon, lsn = token.strip().partition(":")
    if not colon or version != VERSION:
        return None
    try:
        return parse_lsn(lsn)
    except ValueError:
        return None


class _Positions:
    """The current request's: what its reads must see, and what it wrote or could have seen."""

    __slots__ = ("at_least", "seen")

    def __init__(self, at_least: int) -> None:
        self.at_least = at_least
        self.seen = 0


# Set by `_read_token` when a request begins and cleared by `_forget` when it ends (Flask tears
# every request down, whatever happened), so a request whose token was not read (an earlier
# hook refused it) neither reads at another request's position nor hands its token, and an
# answer Flask makes again (an after-request hook failed) still gets the token.
# A context variable, not `flask.g`: each greenlet has its own, and a lookup costs no proxy.
_positions: ContextVar[_Positions | None] = ContextVar("consistency_positions", default=None)


def _read_token() -> None:
    environ = request.environ
    # Cookies are parsed only when the client sent some: most API clients send none.
    cookie = request.cookies.get(COOKIE) if "HTTP_COOKIE" in environ else None
    at_least = 0
    for token in (environ.get(_HEADER_KEY), cookie):
        if token is None:
            continue
        position = decode(token)
        if position is None:
            metrics.token_unreadable()
            at_least = db.ON_PRIMARY
            break
        at_least = max(at_least, position)
    _positions.set(_Positions(at_least))


def _at_least() -> int:
    positions = _positions.get()
    return positions.at_least if positions is not None else 0


def _saw(position: int) -> None:
    positions = _positions.get()
    if positions is not None and position > positions.seen:
        positions.seen = position


def _forget(exc: BaseException | None) -> None:
    _positions.set(None)


def _hand_token(response: Response) -> Response:
    positions = _positions.get()
    if positions is None:
        return response
    seen = positions.seen
    if seen:
        presented = positions.at_least
        token = encode(max(seen, presented if presented < db.ON_PRIMARY else 0))
        response.headers.add(HEADER, token)  # no view sets it: nothing to replace
        # What werkzeug's set_cookie writes for it: a token (`1:` and an LSN in hexadecimal)
        # needs no quoting, so the header is written as it is, not built anew each time.
        response.headers.add("Set-Cookie", f"{COOKIE}={token}{_COOKIE_ATTRIBUTES}")
    return response
