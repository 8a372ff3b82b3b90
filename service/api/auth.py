"""Optional bearer-token authentication of the `/users` routes.

With API_TOKENS (or API_TOKENS_FILE) set, every request to a resource route must carry
`Authorization: Bearer <token>` with one of the tokens; anything else is answered `401` with
`WWW-Authenticate: Bearer` and a JSON error, before the request touches the database. The
health probes, `/metrics` and `/openapi.json` stay open. Unset, the API is open to anyone who
can reach it.

The token is compared with every configured token in constant time (`hmac.compare_digest`),
all of them each time, so that neither a token's content nor which token matched shows in the
time of the answer. Tokens are never logged: the access line holds no header, and no message
quotes one.
"""

from __future__ import annotations

import hmac
from functools import partial

from flask import Flask, current_app, request

from service.api.errors import ApiError

SCHEME = "Bearer"
_REALM = 'Bearer realm="service"'


def register(app: Flask, blueprints: frozenset[str]) -> None:
    """Guard every route of `blueprints` with the app's tokens, when it has any. Registered
    before anything reads a body, so that a stranger's body is never read."""
    app.before_request(partial(_check_token, blueprints))


def _check_token(blueprints: frozenset[str]) -> None:
    tokens: tuple[str, ...] = current_app.config["SETTINGS"].api_tokens
    if not tokens or request.blueprint not in blueprints:
        return
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != SCHEME.lower() or not presented.strip():
        raise ApiError(
            401,
            "unauthorized",
            "send Authorization: Bearer <token>",
            {"WWW-Authenticate": _REALM},
        )
    candidate = presented.strip().encode()
    matched = False
    for token in tokens:  # every one, whatever matched: the time says nothing of which
        matched |= hmac.compare_digest(candidate, token.encode())
    if not matched:
        raise ApiError(
            401,
            "invalid_token",
            "the bearer token is not valid",
            {"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
        )
